"""llama.cpp's RPC backend (ggml-rpc): serve this machine's devices to other llava clients, or
use other machines' devices for a model's layers.

Everything goes through ggml's backend registry (``ggml_backend_reg_by_name("RPC")`` and its
``get_proc_address``), as llama.cpp's own ``--rpc`` and ``rpc-server`` do; the transport is
ggml's. The protocol has no authentication and no encryption: whoever reaches a server's port
can run computations on it and read the tensors it holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import math
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, EngineError, UsageError
from .native import ABORTS, LOGS, ggml_function, init, max_devices

DEFAULT_PORT = 50052
CONNECT_TIMEOUT_S = 5.0  # a server that does not answer within this is not there

# ggml_backend_dev_type
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "integrated GPU", 3: "accelerator"}

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
)
_registered: dict[str, int] = {}  # endpoint: its registry, once per process


def _rpc_registry() -> int | None:
    init(LOGS.verbose)  # as the command set it
    by_name = ggml_function("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    return by_name(b"RPC") or None


def available() -> bool:
    """Whether this llama.cpp build has the RPC backend (built with -DGGML_RPC=ON)."""
    return _rpc_registry() is not None


def require() -> int:
    """The RPC backend's registry, or one line saying this build lacks it."""
    registry = _rpc_registry()
    if registry is None:
        raise EngineError(
            "this llama.cpp build has no RPC backend",
            "reinstall llava with `make install` (it builds llama.cpp with -DGGML_RPC=ON)",
        )
    return registry


def _proc(name: str) -> int:
    registry = require()
    get = ggml_function(
        "ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    )
    address = get(registry, name.encode())
    if not address:
        raise EngineError(f"llama.cpp's RPC backend has no {name}", "reinstall llava")
    return int(address)


@dataclass(frozen=True)
class Device:
    name: str  # ggml's: CPU, CUDA0, RPC0…
    description: str  # for an RPC device: its server's address
    kind: str  # DEVICE_TYPES
    free: int
    total: int
    handle: int = 0


def devices() -> list[Device]:
    """Every device ggml knows in this process, RPC servers' included once added."""
    init(LOGS.verbose)  # as the command set it
    count = ggml_function("ggml_backend_dev_count", ctypes.c_size_t, [])
    get = ggml_function("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
    name = ggml_function("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
    text = ggml_function("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p])
    kind = ggml_function("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])
    memory = ggml_function(
        "ggml_backend_dev_memory",
        None,
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
    )
    found = []
    for i in range(count()):
        dev = get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                (name(dev) or b"").decode("utf-8", "replace"),
                (text(dev) or b"").decode("utf-8", "replace"),
                DEVICE_TYPES.get(kind(dev), "other"),
                free.value,
                total.value,
                int(dev),
            )
        )
    return found


def buffer_devices() -> dict[str, str]:
    """A weights buffer's name, ``RPC<i>[host:port]`` (the i-th device of that server): the
    name ggml gave that device (RPC0, RPC1… across all servers)."""
    seen: dict[str, int] = {}
    names = {}
    for device in devices():
        if device.name.startswith("RPC"):
            index = seen.get(device.description, 0)
            seen[device.description] = index + 1
            names[f"RPC{index}[{device.description}]"] = device.name
    return names


def parse_endpoint(text: str, *, what: str = "--rpc") -> tuple[str, int]:
    """``HOST:PORT`` as ggml reads it (the port after the last colon)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"{what} {text!r} is not HOST:PORT",
            f"name a server as 127.0.0.1:{DEFAULT_PORT} (several: comma-separated)",
        )
    return host, int(port)


def endpoints(text: str | Sequence[str] | None) -> list[str]:
    """The servers of ``--rpc``/``LLAVA_RPC`` (comma-separated) or config.toml's list."""
    if not text:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    found = []
    for part in parts:
        host, port = parse_endpoint(part)
        endpoint = f"{host}:{port}"
        if endpoint not in found:
            found.append(endpoint)
    return found


def tensor_split(text: str | None) -> tuple[float, ...]:
    """``--tensor-split 3,1``: each device's share of the layers, in the devices' order."""
    if not text:
        return ()
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        shares = ()
    if (
        not shares
        or len(shares) > max_devices()
        or not all(math.isfinite(x) and x >= 0 for x in shares)
        or not any(shares)
    ):
        raise UsageError(
            f"--tensor-split {text!r} is not a list of shares",
            f"give up to {max_devices()} numbers, not all 0, one per device: e.g. 3,1",
        )
    return shares


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail with one line, before anything loads, when nothing answers at ``endpoint``: ggml's
    own client would abort the process there."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError) or "timed out" in str(exc):
            reason = f"no answer within {timeout:g} s"
        raise EngineError(
            f"no RPC server answers at {endpoint} ({reason})",
            f"start `llava rpc-server --port {port}` there, or check the address, the firewall "
            "or the SSH tunnel",
        ) from None


def add_servers(servers: Sequence[str]) -> list[Device]:
    """Register the RPC servers with ggml, so the model's layers can go to their devices (as
    --gpu-layers allows); their devices, in order. Each server is checked first."""
    if not servers:
        return []
    add = _ADD_SERVER(_proc("ggml_backend_rpc_add_server"))
    register = ggml_function("ggml_backend_register", None, [ctypes.c_void_p])
    for endpoint in servers:
        if endpoint in _registered:
            continue
        check_reachable(endpoint)
        ABORTS.rpc_servers.append(endpoint)  # ggml aborts on a failed handshake: name it
        registry = add(endpoint.encode())
        if not registry:
            raise EngineError(f"the RPC server at {endpoint} offers no device", "")
        register(registry)
        _registered[endpoint] = int(registry)
    return [d for d in devices() if d.name.startswith("RPC") and d.description in servers]


# A server that vanishes without closing its connections (a host switched off, a cable or
# tunnel cut) would leave ggml's client waiting in recv() for good: it sets no timeout. TCP
# keepalive probes are answered by the peer's kernel even while it computes for minutes, so
# they fail only when the peer is gone: about IDLE + INTERVAL * COUNT seconds after it went.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
USER_TIMEOUT_MS = 30_000  # data sent and never acknowledged: the peer is gone


def keep_alive(endpoint: str) -> int:
    """Turn on keepalive and TCP_USER_TIMEOUT on ggml's connections to ``endpoint``, found
    among this process's file descriptors (Linux only; elsewhere ggml's defaults stay). ggml
    keeps a connection while buffers on the server use it: call once the model is loaded.
    How many connections were set."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return 0
    host, port = parse_endpoint(endpoint)
    try:
        wanted = {info[4][:2] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return 0
    done = 0
    for entry in fd_dir.iterdir():
        try:
            fd = int(entry.name)
            kind = os.readlink(entry)
        except (ValueError, OSError):
            continue
        if not kind.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[:2] not in wanted:
                    continue
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
                done += 1
            except OSError:
                continue
    return done


def local_device(wanted: str | None) -> Device:
    """The device a server offers: ``wanted`` by name (case-insensitive), else the best one
    (a GPU where there is one, else the CPU)."""
    local = [d for d in devices() if not d.name.startswith("RPC")]
    if wanted:
        for device in local:
            if device.name.lower() == wanted.lower():
                return device
        names = ", ".join(d.name for d in local) or "none"
        raise UsageError(f"no device named {wanted!r} here", f"choose one of: {names}")
    for kind in ("GPU", "integrated GPU", "CPU"):
        for device in local:
            if device.kind == kind:
                return device
    raise EngineError("llama.cpp found no device to serve", "")


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise EngineError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                "another server holds the port? choose another with --port",
            ) from None


@contextlib.contextmanager
def _native_stdout(verbose: bool) -> Iterator[None]:
    """ggml's server prints its banner and a line per client connection with printf: stdout
    carries only data, so fd 1 points at stderr while it runs (--verbose), else nowhere."""
    sys.stdout.flush()
    saved = os.dup(1)
    target = os.dup(2) if verbose else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 1)
    os.close(target)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def serve(host: str, port: int, device: Device, threads: int, cache: Path | None) -> None:
    """Serve ``device`` at host:port until the process ends (ggml's server loop, on a thread, so
    Ctrl-C reaches Python). Returns only if ggml's server stops by itself."""
    start = _START_SERVER(_proc("ggml_backend_rpc_start_server"))
    handles = (ctypes.c_void_p * 1)(device.handle)
    endpoint = f"{host}:{port}".encode()
    cache_dir = str(cache).encode() if cache is not None else None

    def run() -> None:
        start(endpoint, cache_dir, threads, 1, handles)

    with _native_stdout(LOGS.verbose):
        thread = threading.Thread(target=run, name="llava-rpc-server", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
        except KeyboardInterrupt:
            # ggml's server loop cannot be stopped, and tearing the process down around it
            # can abort in its C++ destructors: leave at once, as Ctrl-C asked
            sys.stderr.write("\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)

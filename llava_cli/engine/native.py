"""The process-wide side of llama.cpp: log routing, Ctrl-C around native calls, build info.

llama.cpp, ggml and libmtmd all print unless told otherwise; their lines go to stderr only when
verbose, and the last warnings are kept to explain failures.

A failed internal check in ggml (GGML_ASSERT, GGML_ABORT) aborts the process, after a backtrace
that ggml prints through gdb on stdout, where only the answer belongs. Backtraces are off unless
verbose, and an abort callback turns what checks before loading did not foresee into one
``Error:`` line and exit code 1 (LLAVA_DEBUG=1 keeps ggml's own report).

A SIGINT that arrives while C code runs is delivered by CPython inside the next ctypes callback
(a log line, an abort check), where a KeyboardInterrupt would be swallowed with a traceback.
While native work is under way the handler therefore only records the interrupt; the abort
callback stops a long decode early, and the interrupt is raised once back in Python.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from ..config import environment
from ..errors import EXIT_RUNTIME
from ..text import escaped

_LOG_DEBUG, _LOG_WARN, _LOG_CONT = 1, 3, 5  # ggml_log_level
# Debug lines --verbose shows all the same: an RPC server's line per graph it computed (with
# GGML_RPC_DEBUG set, as `llava rpc-server -v` does)
SHOWN_DEBUG = ("[graph_compute]",)


class _LogRouter:
    def __init__(self) -> None:
        self.verbose = False
        self.debug = False  # LLAVA_DEBUG: llama.cpp's debug lines too (set by init)
        self._level = 0
        self.recent: deque[str] = deque(maxlen=64)
        self.placement: list[str] | None = None  # while a model loads: where its parts went
        self.callback = llama_cpp.llama_log_callback(self._on_log)
        self.installed = False

    def _on_log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        try:
            if level != _LOG_CONT:
                self._level = level
            message = text.decode("utf-8", errors="replace") if text else ""
            if self.verbose and (
                self._level != _LOG_DEBUG or self.debug or message.startswith(SHOWN_DEBUG)
            ):
                # GGUF metadata (a model's name, its template) is quoted in these lines
                sys.stderr.write(escaped(message, keep="\n\t"))
                sys.stderr.flush()
            if self._level >= _LOG_WARN and message.strip():
                self.recent.append(message.strip())
            if self.placement is not None and (
                "assigned to device" in message or "model buffer size" in message
            ):
                self.placement.append(message)
        except BaseException:  # never let an exception escape into C
            INTERRUPTS.pending = True

    def note(self, message: str) -> None:
        """A line of our own among the logs: on stderr with --verbose, else silent."""
        if self.verbose:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def forget_last(self) -> None:
        """Drop the last recorded warning (one we handled), so it is not blamed later."""
        if self.recent:
            self.recent.pop()

    def last_error(self) -> str:
        for line in reversed(self.recent):
            if "error" in line.lower() or "fail" in line.lower() or "mismatch" in line:
                return line.split(": ", 1)[-1] if ": " in line else line
        return self.recent[-1] if self.recent else ""


def _never() -> bool:
    return False


class _Interrupts:
    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.previous: Any = None
        self.abort_callback = llama_cpp.ggml_abort_callback(self._should_abort)
        self.progress_callback = llama_cpp.llama_progress_callback(self._keep_loading)
        self.give_up: Callable[[], bool] = _never  # a model load stops when it says so

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGINT)
        if current != self._handler:  # (a bound method: compare with ==, not is)
            self.previous = current
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.depth:
            self.pending = True
            return
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        return self.pending

    def _keep_loading(self, _progress: float, _data: ctypes.c_void_p) -> bool:
        return not self.pending and not self.give_up()

    @contextmanager
    def loading_unless(self, give_up: Callable[[], bool]) -> Iterator[None]:
        """A model loaded in here stops (fails) as soon as ``give_up()`` is true: the image
        decoded beside it turned out bad, and its error is the one to say."""
        self.give_up = give_up
        try:
            yield
        finally:
            self.give_up = _never

    @contextmanager
    def native(self) -> Iterator[None]:
        """Native work: Ctrl-C is recorded, then raised as KeyboardInterrupt on the way out."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0:
            self.check()

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class _Aborts:
    """ggml's abort hook (ggml_set_abort_callback): one line and exit 1 instead of SIGABRT."""

    # ggml.c reads it at each abort (and when the library loads, for its terminate handler)
    NO_BACKTRACE = "GGML_NO_BACKTRACE"
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def __init__(self) -> None:
        self.callback = self.callback_type(self._on_abort)
        self.first = threading.Lock()  # several threads can fail at once: one line
        self.installed = False
        self.rpc_servers: list[str] = []  # registered RPC servers: an abort in ggml-rpc names them
        # the user's own, read before llava first sets it (once per process)
        self.users_setting = environment().ggml_no_backtrace

    def configure(self, verbose: bool, debug: bool) -> None:
        if verbose:
            if self.users_setting is None:
                os.environ.pop(self.NO_BACKTRACE, None)
        else:
            os.environ[self.NO_BACKTRACE] = "1"
        if self.installed or debug:
            return
        try:
            set_callback = llama_cpp.llama_cpp._lib.ggml_set_abort_callback
        except AttributeError:  # a build without it: ggml's own report stays
            return
        set_callback.argtypes = [self.callback_type]
        set_callback.restype = ctypes.c_void_p  # the previous hook: not needed
        set_callback(self.callback)
        self.installed = True

    def _on_abort(self, message: bytes | None) -> None:
        """Runs in whichever thread failed, inside C: write, flush and leave, nothing else."""
        self.first.acquire()  # never released: the process ends below
        text = (message or b"").decode("utf-8", errors="replace")
        where, _, what = text.partition(": ")
        where = where.replace("\\", "/").rsplit("/", 1)[-1]  # ggml.c:3758, not the build path
        check = escaped(" ".join(f"{where}: {what}".split()))[:300]
        line = (
            f"Error: llama.cpp stopped on a failed internal check ({check}) — the model or "
            "projector may be damaged or unsupported: try another GGUF, or see --verbose\n"
        )
        if where.startswith("ggml-rpc") and self.rpc_servers:  # the network, not the model
            servers = ", ".join(self.rpc_servers)
            line = (
                f"Error: lost the RPC server {servers} ({check}) — check that `llava "
                "rpc-server` still runs there, and the network or SSH tunnel\n"
            )
            if "handshake failed" in what:
                said = " ".join(LOGS.recent[-1].split()) if LOGS.recent else check
                line = (
                    f"Error: the RPC server at {what.rsplit(' ', 1)[-1].strip()} speaks another "
                    f"protocol version ({escaped(said)[:200]}) — run the same llava version on "
                    "every machine\n"
                )
        with suppress(BaseException):
            sys.stdout.flush()  # what the answer printed so far stays
        try:
            os.write(2, line.encode("utf-8", errors="replace"))
        finally:
            os._exit(EXIT_RUNTIME)


LOGS = _LogRouter()
INTERRUPTS = _Interrupts()
ABORTS = _Aborts()


def init(verbose: bool) -> None:
    """Route logs (and Ctrl-C); idempotent. Call before any other llama.cpp function."""
    LOGS.verbose = verbose
    LOGS.debug = environment().debug
    ABORTS.configure(verbose, LOGS.debug)
    INTERRUPTS.install()
    if not LOGS.installed:
        llama_cpp.llama_log_set(LOGS.callback, None)
        mtmd.mtmd_log_set(LOGS.callback, None)
        mtmd.mtmd_helper_log_set(LOGS.callback, None)
        llama_cpp.llama_backend_init()
        LOGS.installed = True


def ggml_function(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """A function of libggml (its backend registry), reached through libllama, which links it
    and whose bindings llama-cpp-python does not wrap."""
    function = getattr(llama_cpp.llama_cpp._lib, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


def system_info() -> str:
    """llama.cpp's line of backends and the CPU features this build uses."""
    return (llama_cpp.llama_print_system_info() or b"").decode("utf-8", "replace")


def local_gpu() -> bool:
    """Whether this machine has a GPU for ggml (an RPC server's device does not count)."""
    by_type = ggml_function("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int])
    reg_of = ggml_function("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p])
    reg_name = ggml_function("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p])
    for kind in (1, 2):  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU: the first of each type
        device = by_type(kind)
        registry = reg_of(device) if device else None
        if registry and not (reg_name(registry) or b"").startswith(b"RPC"):
            return True
    return False


def max_devices() -> int:
    """How many devices a model's layers can be shared over (llama_max_devices)."""
    return int(llama_cpp.llama_max_devices())


def backend_info() -> dict[str, Any]:
    """What this llama.cpp build can do, for ``llava doctor`` and the chat header."""
    init(LOGS.verbose)
    system = system_info()
    # "CUDA : ARCHS = 890 | … | CPU : SSE3 = 1 | AVX2 = 1 | …": one section per backend.
    sections: dict[str, list[str]] = {}
    current = "CPU"
    for field_text in system.split("|"):
        entry = field_text
        if " : " in entry:
            header, _, entry = entry.partition(" : ")
            current = header.strip()
            sections.setdefault(current, [])
        key, _, value = entry.partition("=")
        if value.strip() == "1":
            sections.setdefault(current, []).append(key.strip())
    backends = [name for name in sections if name != "CPU"] or ["CPU"]
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "backend": backends[0],
        "gpu_offload": local_gpu(),
        "system_info": system.strip(),
        "cpu_features": sections.get("CPU", []),
    }


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)

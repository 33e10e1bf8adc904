"""llama.cpp's RPC backend through llava: `llava rpc-server` on loopback ports, clients with
`--rpc`. Every client is a subprocess: once a process registers a server, ggml keeps its
devices for good, and they must not outlive the server in a test worker."""

from __future__ import annotations

import ast
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llava_cli import synthetic

from .conftest import llava

pytestmark = pytest.mark.slow


def rpc_built() -> bool:
    from llava_cli.engine import rpc

    return rpc.available()


needs_rpc = pytest.mark.skipif(
    "not rpc_built()", reason="this llama.cpp build has no RPC backend (make install builds it)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def rpc_server(tmp_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `llava rpc-server` on a free loopback port, until the block ends (Ctrl-C)."""
    port = free_port()
    log = (tmp_path / f"server-{port}.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "llava_cli", "rpc-server", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=log,
        env={**dict(__import__("os").environ), "GGML_RPC_DEBUG": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # listening?
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / f"server-{port}.log").read_text()) from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()


def server_log(tmp_path: Path, endpoint: str) -> str:
    return (tmp_path / f"server-{endpoint.rsplit(':', 1)[1]}.log").read_text()


def test_a_non_loopback_host_needs_allow_remote() -> None:
    done = llava("rpc-server", "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 2 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "no authentication or encryption" in lines[0], lines
    assert "--allow-remote" in lines[0] and "SSH tunnel" in lines[0]


def test_a_server_that_is_not_there_fails_before_loading(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = llava(
        "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj, "-p", "Q",
        "--rpc", endpoint,
    )  # fmt: skip
    assert time.monotonic() - started < 30  # no hang
    assert done.returncode == 1 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and f"no RPC server answers at {endpoint}" in lines[0], lines


def test_an_address_that_is_not_host_and_port_is_a_usage_error(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    done = llava(
        "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj, "-p", "Q",
        "--rpc", "localhost",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--rpc 'localhost' is not HOST:PORT" in done.stderr.decode()


@needs_rpc
def test_the_layers_go_to_the_server_and_the_answer_holds(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    with rpc_server(tmp_path, "-v") as (endpoint, _):
        done = llava(
            "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj,
            "-p", "What colour?", "--rpc", endpoint, "--gpu-layers", "99", "-v",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout == b"red\n"
    err = done.stderr.decode()
    assert re.search(r"RPC0\S* model buffer size", err), err[-3000:]
    assert "graph_compute" in server_log(tmp_path, endpoint)  # the server did the work


@needs_rpc
def test_two_servers_share_the_layers_and_the_answer_is_the_same(
    images: Path, tmp_path: Path
) -> None:
    """A four-layer random model: its layers split over two servers, its answer the one a
    local run gives, token for token."""
    pair = synthetic.build_random(tmp_path / "model", seed=3, layers=4)
    ask = [
        "ask", images / "blue.png", "-m", pair.model, "--mmproj", pair.mmproj, "-p", "Go on",
        "--max-tokens", "12", "--temperature", "0", "--no-cache", "--json",
    ]  # fmt: skip
    local = llava(*ask)
    assert local.returncode == 0, local.stderr.decode()
    with rpc_server(tmp_path) as (first, _), rpc_server(tmp_path) as (second, _):
        done = llava(*ask, "--rpc", f"{first},{second}")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    remote, here = json.loads(done.stdout), json.loads(local.stdout)
    assert remote["answer"] == here["answer"] and here["usage"]["completion_tokens"] == 12
    devices = {d["device"]: d for d in remote["devices"]}
    assert devices["RPC0"]["layers"] > 0 and devices["RPC1"]["layers"] > 0, devices
    assert devices["RPC0"]["bytes"] > 0 and devices["RPC1"]["bytes"] > 0, devices
    assert "devices" in here  # a local run says where its layers are too
    with rpc_server(tmp_path) as (first, _), rpc_server(tmp_path) as (second, _):
        weighted = llava(*ask, "--rpc", f"{first},{second}", "--tensor-split", "1,0")
    assert weighted.returncode == 0, weighted.stderr.decode()[-2000:]
    assert json.loads(weighted.stdout)["answer"] == here["answer"]
    split = {d["device"]: d["layers"] for d in json.loads(weighted.stdout)["devices"]}
    assert split.get("RPC0", 0) > 0 and split.get("RPC1", 0) == 0, split


@pytest.mark.parametrize("shares", ["0,0", "a,b", "-1,2", "1,nan"])
def test_a_tensor_split_that_shares_nothing_is_a_usage_error(
    oracle: synthetic.ModelPair, images: Path, shares: str
) -> None:
    done = llava(
        "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj, "-p", "Q",
        "--tensor-split", shares,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--tensor-split {shares!r} is not a list of shares" in done.stderr.decode()


@needs_rpc
def test_a_chat_keeps_its_cache_on_the_server_across_turns(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    with rpc_server(tmp_path) as (endpoint, _):
        done = llava(
            "chat", images / "green.png", "-m", oracle.model, "--mmproj", oracle.mmproj,
            "--rpc", endpoint,
            stdin=b"What colour?\n/stats\nAnd now?\n/stats\n",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["green", "green"]
    stats = re.findall(r"evaluated (\d+) text and (\d+) image tokens", done.stderr.decode())
    assert len(stats) == 2, done.stderr.decode()
    assert int(stats[1][1]) == 0  # the second turn evaluated no image: the KV cache stayed
    assert int(stats[1][0]) < int(stats[0][0])  # and only its own text


@needs_rpc
def test_the_prefix_cache_keeps_remote_and_local_states_apart(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """A state computed with the layers on an RPC server is never restored into a local run,
    nor the other way round; the same setting reuses its own."""
    ask = [
        "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj,
        "-p", "What colour?", "--json",
    ]  # fmt: skip

    def cached(*args: str) -> int:
        done = llava(*ask, *args)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        record = json.loads(done.stdout)
        assert record["answer"] == "red"
        return int(record["usage"]["cached_tokens"])

    with rpc_server(tmp_path) as (endpoint, _):
        assert cached() == 0
        assert cached("--rpc", endpoint) == 0  # another computation: nothing restored
        assert cached("--rpc", endpoint) > 0
        assert cached() > 0


@needs_rpc
def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with rpc_server(tmp_path) as (endpoint, _):
        port = endpoint.rsplit(":", 1)[1]
        done = llava("rpc-server", "--port", port)
    assert done.returncode == 1 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines


@needs_rpc
def test_ctrl_c_stops_the_server_cleanly(tmp_path: Path) -> None:
    with rpc_server(tmp_path) as (endpoint, server):
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=10) == 130
        assert server.stdout is not None and server.stdout.read() == b""
    log = server_log(tmp_path, endpoint)
    assert "serving CPU" in log and endpoint in log


@needs_rpc
def test_doctor_checks_a_server(tmp_path: Path) -> None:
    with rpc_server(tmp_path) as (endpoint, _):
        done = llava("doctor", "--rpc", endpoint)
    assert done.returncode == 0, done.stderr
    assert re.search(
        rf"rpc {re.escape(endpoint)}\s+reachable, protocol compatible; RPC0", done.stdout.decode()
    )


@needs_rpc
def test_a_server_killed_mid_answer_is_one_line_and_no_hang(
    random_pair: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    with rpc_server(tmp_path) as (endpoint, server):
        client = subprocess.Popen(
            [sys.executable, "-m", "llava_cli", "ask", str(images / "red.png"), "-m",
             str(random_pair.model), "--mmproj", str(random_pair.mmproj), "-p", "Go on",
             "--rpc", endpoint, "--max-tokens", "100000", "--ctx", "4096"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert client.stdout is not None
        client.stdout.read(1)  # the answer has begun
        server.kill()
        _, err = client.communicate(timeout=60)
    assert client.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: lost the RPC server {endpoint} ("), (
        lines
    )
    cache = tmp_path / "llava-home"
    assert list(cache.rglob("*.tmp")) == []
    assert [p.name for p in cache.rglob("*") if p.is_file()], "the prefix cache kept nothing"


def test_config_toml_names_servers_and_the_flag_wins(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """`rpc = [...]` in config.toml is used when --rpc names none; `--rpc ""` turns it off."""
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = tmp_path / "llava-home"  # LLAVA_HOME: config.toml lives right in it
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text(f'rpc = ["{endpoint}"]\n')
    ask = ["ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj, "-p", "Q"]
    done = llava(*ask)
    assert done.returncode == 1 and f"no RPC server answers at {endpoint}" in done.stderr.decode()
    assert llava(*ask, "--rpc", "").stdout == b"red\n"


def test_a_server_of_another_protocol_version_is_one_line(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    """A stand-in for a server of another llava (llama.cpp) version: it answers the HELLO as
    ggml-rpc.h lays it out (rpc_msg_hello_rsp: major, minor, patch, padding, 24 bytes of
    connection capabilities), with major version 6 where this build speaks 7."""
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while len(request) < 1 + 8 + 24:  # cmd, size, the request's capabilities
                    if not (part := conn.recv(64)):
                        break
                    request += part
                if request[:1] == bytes([14]):  # RPC_CMD_HELLO
                    conn.sendall(struct.pack("<Q", 28) + bytes([6, 0, 0, 0]) + bytes(24))
                    while conn.recv(64):  # until the client hangs up
                        pass

    threading.Thread(target=answer, daemon=True).start()
    try:
        done = llava(
            "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj,
            "-p", "Q", "--rpc", f"127.0.0.1:{port}",
        )  # fmt: skip
    finally:
        listener.close()
    assert done.returncode == 1 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: the RPC server at 127.0.0.1:{port} speaks another "), lines
    assert "6.0.0" in lines[0], lines


@needs_rpc
@pytest.mark.skipif(sys.platform != "linux", reason="keepalive is set through /proc/self/fd")
def test_connections_to_a_server_give_up_on_a_vanished_peer(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    """ggml's client sets no timeout; llava turns on keepalive and TCP_USER_TIMEOUT on its
    connections, so a server host that vanishes silently ends the wait within seconds."""
    script = textwrap.dedent(
        """
        import os, socket, sys
        from pathlib import Path
        from llava_cli.engine.model import Engine, LoadOptions
        model, mmproj = Path(sys.argv[2]), Path(sys.argv[3])
        engine = Engine.load(LoadOptions(model=model, mmproj=mmproj, rpc=(sys.argv[1],)))
        host, port = sys.argv[1].rsplit(":", 1)
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=os.dup(int(name)))
            except OSError:
                continue
            with sock:
                try:
                    if sock.getpeername()[:2] != (host, int(port)):
                        continue
                except OSError:
                    continue
                found.append((
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                ))
        print(found)
        """
    )
    with rpc_server(tmp_path) as (endpoint, _):
        done = subprocess.run(
            [sys.executable, "-c", script, endpoint, str(oracle.model), str(oracle.mmproj)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    found = ast.literal_eval(done.stdout)  # a list of (keepalive, user timeout) per connection
    assert found and all(keepalive and timeout == 30_000 for keepalive, timeout in found), found


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--port", "0"], "--port': must be at least 1"),
        (["--port", "70000"], "--port': must be at most 65535"),
        (["--port", "x"], "--port': must be a whole number"),
    ],
)
def test_a_port_out_of_range_is_one_line(args: list[str], said: str) -> None:
    done = llava("rpc-server", *args)
    assert done.returncode == 2 and done.stdout == b""
    assert said in done.stderr.decode() and len(done.stderr.splitlines()) == 1

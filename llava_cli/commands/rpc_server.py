"""``llava rpc-server``: this machine's device, served to other llava clients over llama.cpp's
RPC protocol, until Ctrl-C."""

from __future__ import annotations

import os
from pathlib import Path

from .. import render
from ..config import environment
from ..errors import EXIT_RUNTIME, UsageError
from ..units import human_bytes

RISK = (
    "the RPC protocol has no authentication or encryption: anyone who reaches this port can "
    "run computations here and read the model's tensors"
)


def run(
    *, host: str, port: int, device: str | None, threads: int, cache: str | None,
    allow_remote: bool, verbose: bool,
) -> int:  # fmt: skip
    if verbose:  # read by ggml's RPC library as it loads: a line per graph computed
        os.environ["GGML_RPC_DEBUG"] = "1"
    from ..engine import rpc
    from ..engine.native import default_threads, init

    if not rpc.is_loopback(host) and not allow_remote:
        raise UsageError(
            f"--host {host} would serve this machine to the network, and {RISK}",
            "use it only on a trusted network or through an SSH tunnel: add --allow-remote, "
            "or keep the default 127.0.0.1",
        )
    init(verbose)
    rpc.require()
    chosen = rpc.local_device(device)
    rpc.check_port_free(host, port)
    folder = environment().paths.cache_dir / "rpc" if cache is None else Path(cache).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if not rpc.is_loopback(host):
        render.info(f"warning: serving on {host}: {RISK}")
    memory = f", {human_bytes(chosen.free)} free" if chosen.total else ""
    render.info(
        f"serving {chosen.name} ({chosen.description}{memory}) on {host}:{port} — Ctrl-C stops"
    )
    rpc.serve(host, port, chosen, threads or default_threads(), folder)
    render.error(f"the RPC server on {host}:{port} stopped — run it with -v for llama.cpp's logs")
    return EXIT_RUNTIME

"""``llava doctor``: what is installed, what the build can do, and an offline self-test.

The self-test builds the colour-oracle model pair in a temporary directory and asks it about a
red and a blue image through the same engine ``llava ask`` uses: if the image does not reach
the decoder, the answers come out wrong.
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .. import __version__, render
from ..config import environment
from ..errors import UsageError
from ..units import human_bytes

_LABELS = 18  # the longest label, "models (hub cache)": the values start after it and a space


def _line(label: str, value: object) -> None:
    render.fields([(label, value)], width=_LABELS, gap=1)


def _free(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 1e9:.1f} GB free at {probe}"
    except OSError as exc:
        return f"unknown ({exc.strerror})"


def _repacking(system: str) -> str:
    """Whether llava repacks quantized weights by default on this build, and why."""
    from ..engine.model import repack_default

    if repack_default(system):
        return "on by default (--no-repack or LLAVA_REPACK=0 turns it off)"
    return (
        "off by default: slower prompts on AVX-512 builds, as measured "
        "(--repack or LLAVA_REPACK=1 turns it on)"
    )


def _rpc_available() -> str:
    from ..engine import rpc

    if rpc.available():
        return "available (llava rpc-server; --rpc HOST:PORT)"
    return "not in this build (make install builds it with -DGGML_RPC=ON)"


def check_rpc(servers: str, *, verbose: bool = False) -> int:
    """``doctor --rpc``: each server reachable, through llama.cpp's handshake (its protocol
    version checked there), with its devices and their memory."""
    from ..engine import rpc
    from ..engine.native import init

    init(verbose)
    wanted = rpc.endpoints(servers)
    if not wanted:
        raise UsageError("--rpc names no server", "give HOST:PORT, e.g. 127.0.0.1:50052")
    for endpoint in wanted:
        found = rpc.add_servers([endpoint])
        shown = ", ".join(
            f"{d.name} ({human_bytes(d.free)} free of {human_bytes(d.total)})" for d in found
        )
        _line(f"rpc {endpoint}", f"reachable, protocol compatible; {shown or 'no device'}")
    return 0


def run(*, verbose: bool = False) -> int:
    from ..engine import backend_info, default_threads

    settings = environment()
    info = backend_info()
    where = settings.paths
    _line("llava", __version__)
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("llama-cpp-python", info["llama_cpp_python"])
    _line("platform", f"{platform.system()} {platform.machine()}")
    _line("backend", f"{info['backend']} (GPU offload: {'yes' if info['gpu_offload'] else 'no'})")
    _line("cpu features", " ".join(info["cpu_features"]) or "none reported")
    _line("threads", default_threads())
    _line("weight repacking", _repacking(info["system_info"]))
    _line("rpc", _rpc_available())
    _line("config dir", where.config_dir)
    _line("data dir", where.data_dir)
    _line("cache dir", where.cache_dir)
    _line("models (hub cache)", settings.hub_cache)
    _line("offline", "yes (HF_HUB_OFFLINE)" if settings.hub_offline else "no")
    _line("disk", _free(where.data_dir))
    return 0 if self_test(verbose=verbose) else 1


def self_test(*, verbose: bool = False) -> bool:
    from ..errors import LlavaError

    try:
        return _self_test(verbose=verbose)
    except LlavaError as exc:
        _line("self-test", f"FAIL: {exc.one_line()}")
        return False


def _self_test(*, verbose: bool) -> bool:
    from ..conversation import Conversation, open_model
    from ..images import prepare
    from ..options import RuntimeOptions, SamplingParams
    from ..synthetic import build_colour_oracle

    with tempfile.TemporaryDirectory(prefix="llava-doctor-") as tmp:
        t0 = time.perf_counter()
        pair = build_colour_oracle(Path(tmp))
        built = time.perf_counter() - t0
        t1 = time.perf_counter()
        loaded = open_model(
            pair.model, pair.mmproj, RuntimeOptions(ctx=512, verbose=verbose, cache=False)
        )
        ok = True
        try:
            conversation = Conversation(loaded)
            sampling = SamplingParams(temperature=0.0, max_tokens=4, seed=0)
            for colour, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
                image = prepare(f"{colour}.png", _png(rgb))
                start = time.perf_counter()
                conversation.reset()
                answer = "".join(conversation.ask("What colour is this?", [image], sampling))
                passed = answer == colour
                ok &= passed
                took = (time.perf_counter() - start) * 1000
                _line(
                    "self-test",
                    f"{colour} image -> {answer!r}: {'PASS' if passed else 'FAIL'} ({took:.0f} ms)",
                )
        finally:
            loaded.close()
        total = time.perf_counter() - t1
    _line(
        "self-test",
        f"{'PASS' if ok else 'FAIL'} "
        f"(model built in {built * 1000:.0f} ms, load + 2 answers in {total * 1000:.0f} ms)",
    )
    return ok


def _png(rgb: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 48), rgb).save(buf, "PNG")
    return buf.getvalue()

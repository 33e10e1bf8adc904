"""llama.cpp's own binaries as the bench's anchors: ``llama-mtmd-cli`` and ``llama-bench``,
built once from the llama.cpp vendored in the pinned llama-cpp-python sdist, with the flags
of ``scripts/llama-cmake-args.sh`` (what ``make install`` builds the wheel with), into the
bench cache. A wrapper cannot beat the engine: these say how close llava comes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("llama-mtmd-cli", "llama-bench")
# Only the two tools: no tests, examples, server, web UI, network or TLS.
BUILD_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


@dataclass(frozen=True)
class Tools:
    mtmd_cli: Path
    bench: Path
    flags: str  # the CMake flags they were built with


def pinned_version() -> str:
    """The llama-cpp-python version the Makefile pins (LLAMA_CPP_VERSION)."""
    text = (ROOT / "Makefile").read_text()
    found = re.search(r"^LLAMA_CPP_VERSION\s*:=\s*(\S+)", text, re.M)
    if not found:
        raise RuntimeError("Makefile has no LLAMA_CPP_VERSION")
    return found.group(1)


def cmake_flags(*args: str) -> str:
    """scripts/llama-cmake-args.sh's flags for this machine (``--portable``: the AVX2 ones)."""
    script = ROOT / "scripts" / "llama-cmake-args.sh"
    done = subprocess.run([str(script), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def build(cache: Path, flags: str | None = None) -> Tools:
    """The two binaries for ``flags`` (default: this machine's, as ``make install`` uses),
    built on first use: about 5 minutes on 2 cores, then cached."""
    version = pinned_version()
    flags = cmake_flags() if flags is None else flags
    key = hashlib.sha256(f"{version}\n{flags}".encode()).hexdigest()[:12]
    folder = cache / f"native-{version}-{key}"
    tools = Tools(folder / "bin" / TARGETS[0], folder / "bin" / TARGETS[1], flags)
    if tools.mtmd_cli.is_file() and tools.bench.is_file():
        return tools
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    source = _vendored_source(cache, version)
    work = folder / "build"
    log = folder / "build.log"
    print(f"building {', '.join(TARGETS)} from llama-cpp-python {version}'s llama.cpp "
          f"(log: {log})", file=sys.stderr)  # fmt: skip
    with log.open("w") as out:
        for cmd in (
            ["cmake", "-S", str(source), "-B", str(work), *flags.split(), *BUILD_OPTIONS],
            ["cmake", "--build", str(work), f"-j{os.cpu_count() or 1}", "--target", *TARGETS],
        ):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
                raise RuntimeError(f"native build failed: {' '.join(cmd[:3])}…; see {log}")
    (folder / "bin").mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(work / "bin" / target, folder / "bin" / target)
    shutil.rmtree(work)
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return tools


def _vendored_source(cache: Path, version: str) -> Path:
    """vendor/llama.cpp of the pinned sdist, downloaded by pip (PyPI only) and unpacked."""
    unpacked = cache / f"llama_cpp_python-{version}"
    source = unpacked / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"llama-cpp-python=={version}", "-d", str(cache)],
            check=True,
        )  # fmt: skip
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return source


@dataclass(frozen=True)
class NativeRun:
    wall_s: float
    rss_mb: float
    prompt_tokens: int  # as llama.cpp's perf counters report them (text + image)
    encode_s: float  # the image slice through CLIP
    prompt_s: float  # the prompt (image tokens included) through the text model
    decode_s: float  # the answer's tokens
    answer: str

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else float("nan")


def mtmd_cli_args(
    tools: Tools, model: Path, mmproj: Path, image: Path, prompt: str, n: int, *, repack: bool,
    warmup: bool, threads: int, ctx: int,
) -> list[str]:  # fmt: skip
    """One-shot ``llama-mtmd-cli``: the bench model has no chat template, and llava reads
    such a model in the LLaVA-1.5 (vicuna) format, so the binary is told the same."""
    return [
        str(tools.mtmd_cli), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image),
        "-p", prompt, "-n", str(n), "--temp", "0", "-c", str(ctx), "-t", str(threads),
        "--chat-template", "vicuna", "--perf", "-lv", "4",  # llama.cpp's timings, on stderr
        *([] if repack else ["--no-repack"]), *([] if warmup else ["--no-warmup"]),
    ]  # fmt: skip


def parse_log(log: str) -> dict[str, float]:
    """llama.cpp's own timings from the binary's stderr (llama_perf_context_print, and
    mtmd-helper's line per image slice)."""

    def number(pattern: str) -> float:
        found = re.findall(pattern, log)
        return float(found[-1]) if found else float("nan")

    # Every image batch or slice encoded (a tiled image has several).
    encodes = re.findall(r"(?:batch encoding done|slice encoded) in (\d+) ms", log)
    encode_s = sum(float(ms) for ms in encodes) / 1000 if encodes else float("nan")
    # llama.cpp's prompt clock starts at the first text decode and stops at the next
    # synchronisation, which comes after the CLIP encode that follows it: the prompt
    # figure holds the encode too, taken out here.
    prompt_s = number(r"prompt eval time =\s+([\d.]+) ms") / 1000 - encode_s
    return {
        "prompt_tokens": number(r"prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens"),
        "prompt_s": prompt_s,
        # n - 1 decode steps (the first token comes with the prompt), sampling left out
        "decode_s": number(r"\s eval time =\s+([\d.]+) ms /\s+\d+ runs") / 1000,
        "encode_s": encode_s,
    }


@dataclass(frozen=True)
class Process:
    wall_s: float
    rss_mb: float  # the child's own peak resident set, in MB (10^6 bytes)
    stdout: str
    stderr: str


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Process:
    """Run a child to its end: wall seconds, its peak RSS, and what it wrote."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        log = err.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {log[-400:]}")
    rss_mb = rusage.ru_maxrss * 1024 / 1e6  # ru_maxrss: KiB on Linux
    return Process(wall, rss_mb, out.decode("utf-8", "replace"), log)


def run_mtmd_cli(args: list[str]) -> NativeRun:
    """One whole process: wall, peak RSS, and llama.cpp's own split of the work."""
    done = measure(args)
    timings = parse_log(done.stderr)
    return NativeRun(
        wall_s=done.wall_s,
        rss_mb=done.rss_mb,
        prompt_tokens=int(timings["prompt_tokens"]),
        encode_s=timings["encode_s"],
        prompt_s=timings["prompt_s"],
        decode_s=timings["decode_s"],
        answer=done.stdout.strip(),
    )


@dataclass(frozen=True)
class RepackRow:
    repack: bool
    prompt_tps: float
    decode_tps: float


def repack_bench(tools: Tools, model: Path, threads: int) -> list[RepackRow]:
    """llama-bench's prompt (512 tokens) and decode (32 tokens) speed, repacking off and on."""
    cmd = [
        str(tools.bench), "-m", str(model), "-p", "512", "-n", "32", "-r", "3",
        "-t", str(threads), "--repack", "0,1", "-o", "json",
    ]  # fmt: skip
    done = measure(cmd)
    rows: dict[bool, dict[str, float]] = {}
    for test in json.loads(done.stdout):
        kind = "prompt_tps" if test["n_gen"] == 0 else "decode_tps"
        rows.setdefault(bool(test["repack"]), {})[kind] = float(test["avg_ts"])
    return [RepackRow(repack, r["prompt_tps"], r["decode_tps"]) for repack, r in rows.items()]

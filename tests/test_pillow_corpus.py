"""Pillow's own test images (truncated, broken, fuzzer crash repros, bombs, odd encodings)
through ``images.load``: each must give a PreparedImage or an ImageError — never another
exception, a crash, a hang, output on stderr, or more than 1 GiB of memory.

One child process walks all the files under a memory limit (RLIMIT_AS) and a per-file alarm,
and reports each outcome as a JSON line; the parent gives the whole walk a deadline, so a hang
in native code (where no alarm reaches) names the file it hung on.

Run as a module (``python -m tests.test_pillow_corpus < list``), this file is that child.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
KEPT = Path(__file__).parent / "pillow_images"
MEMORY_HEADROOM = 1 << 30  # bytes of address space beyond the child's start, Pillow loaded
PER_FILE_SECONDS = 10
CORPUS_SECONDS = 300  # the whole sdist corpus, for the walk's deadline


def walk_corpus(files: list[Path], deadline: float) -> tuple[dict[str, dict[str, Any]], str]:
    """Each file's outcome, by path, and what the child wrote to stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_pillow_corpus"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listing = "".join(f"{f}\n" for f in files).encode()
    try:
        out, err = proc.communicate(listing, timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    outcomes: dict[str, dict[str, Any]] = {}
    for line in out.decode().splitlines():
        record = json.loads(line)
        outcomes[record["file"]] = record
    if proc.returncode != 0:  # killed, crashed, or out of time: blame the file it was on
        started = [r for r in outcomes.values() if r["outcome"] == "started"]
        for record in started:
            record["outcome"] = f"child ended with status {proc.returncode} here"
    return outcomes, err.decode(errors="replace")


def failures(outcomes: dict[str, dict[str, Any]], files: list[Path]) -> list[str]:
    bad = []
    for f in files:
        record = outcomes.get(str(f))
        if record is None:
            bad.append(f"{f.name}: never reached")
        elif record["outcome"] not in ("image", "refused"):
            bad.append(f"{f.name}: {record['outcome']} {record.get('detail', '')}".strip())
    return bad


@pytest.mark.slow
def test_kept_selection() -> None:
    files = sorted(p for p in KEPT.rglob("*") if p.is_file() and p.name != "README.md")
    assert len(files) > 200
    started = time.monotonic()
    outcomes, stderr = walk_corpus(files, deadline=120)
    elapsed = time.monotonic() - started
    assert failures(outcomes, files) == []
    assert stderr == ""  # libtiff's warnings included: nothing reaches the user
    by_name = {Path(k).name: v for k, v in outcomes.items()}
    # Spot checks that the walk really decodes and really refuses.
    assert by_name["hopper.tif"]["outcome"] == "image"
    assert by_name["hopper_webp.tif"]["outcome"] == "refused"
    assert "WEBP compression" in by_name["hopper_webp.tif"]["detail"]
    # A 15-megapixel fax page is scaled to the longest side a vision model looks at.
    assert by_name["g4-multi.tiff"]["detail"] == "3307x4677 TIFF 1, scaled to 2896x4096"
    decoded = sum(r["outcome"] == "image" for r in outcomes.values())
    assert 20 < decoded < len(files)
    assert elapsed < 60


@pytest.mark.slow
def test_whole_pillow_sdist_corpus() -> None:
    images = pillow_sdist_images()
    files = sorted(p for p in images.rglob("*") if p.is_file())
    assert len(files) > 500
    outcomes, stderr = walk_corpus(files, deadline=CORPUS_SECONDS)
    assert failures(outcomes, files) == []
    assert stderr == ""


MUTATED = [  # kept files, one per decoder path worth damaging
    "hopper.tif",
    "hopper_lzw.tif",
    "hopper_g4.tif",
    "tiff_16bit_RGBa.tiff",
    "tiff_strip_ycbcr_jpeg_2x2_sampling.tif",
    "pil_sample_cmyk.jpg",
    "hopper_orientation_6.jpg",
    "hopper.gif",
    "hopper.webp",
    "apng/mode_16bit.png",
    "bmp/q/pal8rletrns.bmp",
]


@pytest.mark.slow
def test_damaged_images(tmp_path: Path) -> None:
    """Seeded truncations and byte flips of the kept images: damaged LZW strips make libtiff
    print a line per strip; none of it may reach stderr, and nothing but ImageError escapes."""
    rng = random.Random(10)
    files = []
    for name in MUTATED:
        original = (KEPT / name).read_bytes()
        for i in range(40):
            damaged = bytearray(original)
            if i % 3 == 0:
                del damaged[rng.randrange(1, len(damaged)) :]
            else:
                for _ in range(rng.randrange(1, 8)):
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path = tmp_path / f"{name.replace('/', '_')}-{i}{Path(name).suffix}"
            path.write_bytes(damaged)
            files.append(path)
    outcomes, stderr = walk_corpus(files, deadline=120)
    assert failures(outcomes, files) == []
    assert stderr == ""
    kinds = {r["outcome"] for r in outcomes.values()}
    assert kinds == {"image", "refused"}


def pillow_sdist_images() -> Path:
    """Tests/images from the sdist of the Pillow we run, downloaded once into the user's cache
    (``~/.cache/llava-cli/pillow-sdist/<version>``); skips when the index cannot be reached."""
    import PIL

    version = PIL.__version__
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache_home / "llava-cli" / "pillow-sdist" / version
    images = root / "images"
    if images.is_dir():
        return images
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            got = subprocess.run(
                [
                    *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"),
                    *("--retries", "0", "--timeout", "15", "--disable-pip-version-check"),
                    *("--quiet", "-d", tmp, f"pillow=={version}"),
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"downloading the Pillow {version} sdist took over 300 s")
        sdists = list(Path(tmp).glob("pillow-*.tar.gz"))
        if got.returncode != 0 or not sdists:
            last = (got.stderr.strip().splitlines() or ["no sdist"])[-1]
            pytest.skip(f"cannot download the Pillow {version} sdist from the index: {last}")
        staged = Path(tmp) / "images"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) > 3 and parts[1:3] == ("Tests", "images") and member.isfile():
                    member.name = str(Path(*parts[3:]))
                    tar.extract(member, staged, filter="data")
        try:
            staged.rename(images)
        except OSError:  # another worker got there first
            shutil.rmtree(staged, ignore_errors=True)
    return images


# The child: walks the files named on stdin, one JSON line per file on stdout.


class _Overtime(BaseException):
    """Raised by the per-file alarm; a BaseException, so no ``except Exception`` swallows it."""


def _child() -> None:
    import resource
    import signal

    from PIL import Image

    from llava_cli.errors import ImageError
    from llava_cli.images import load

    Image.init()  # every plugin imported before the limit is measured

    def overtime(signum: int, frame: object) -> None:
        raise _Overtime

    signal.signal(signal.SIGALRM, overtime)
    baseline = _address_space()
    if baseline:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (baseline + MEMORY_HEADROOM, hard))
    for line in sys.stdin:
        path = line.rstrip("\n")
        _report(file=path, outcome="started")
        began = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, PER_FILE_SECONDS)
        try:
            image = load(path)
            outcome, detail = "image", image.describe()
        except ImageError as exc:
            ran_out = isinstance(exc.__context__, MemoryError)
            outcome, detail = ("memory" if ran_out else "refused"), exc.one_line()
        except _Overtime:
            outcome, detail = "overtime", f"over {PER_FILE_SECONDS} s"
        except BaseException as exc:  # the point of the walk: report it, go on
            outcome, detail = "exception", f"{type(exc).__name__}: {exc}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = round(time.monotonic() - began, 3)
        _report(file=path, outcome=outcome, detail=detail, seconds=seconds)


def _address_space() -> int:
    """This process's virtual memory size in bytes (0 where /proc does not say)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _report(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _child()

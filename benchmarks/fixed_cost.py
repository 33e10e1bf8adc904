"""What a whole ``llava ask`` pays besides llama.cpp's work: the tiny test model (the colour
oracle, ~330 KB for both files) answering about a 64x64 PNG, as a user runs it, end to end.

``measure(runs)`` builds the pair in a temporary folder and returns the median wall time of
``llava ask IMAGE --model M --mmproj P -p Q --no-cache --threads 1`` in a fresh process, with
what it is made of: interpreter start-up (``python -c pass``), ``llava --version`` (start-up
plus the command line's imports), the imports an ``ask`` makes (``-X importtime``), and
llava's own ``--json`` timings (load, encode, prefill, decode). Bytecode is cached (in a
temporary ``PYTHONPYCACHEPREFIX``, filled by a first run), as in any installation, even where
``PYTHONDONTWRITEBYTECODE`` is set. Run alone: ``python benchmarks/fixed_cost.py [RUNS]``.

One thread, because the tiny model's own work is a few milliseconds: with the default (one
per core) on a 2-core machine that is busy with anything else, llama.cpp's threads wait for
each other at every step of the graph and the run takes 1-2 s, which measures the neighbours,
not llava. The default's median is reported beside it (``ask_default_threads_s``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 0.30
QUESTION = "What colour?"


def _environment(home: Path, pycache: Path) -> dict[str, str]:
    env = dict(os.environ, LLAVA_HOME=str(home), PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for name in list(env):  # the defaults, not this shell's choices
        if name.startswith("LLAVA_") and name != "LLAVA_HOME":
            del env[name]
    return env


def _wall(
    command: list[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done


def _import_ms(stderr: str) -> float:
    """The sum of ``-X importtime``'s own-time column: every import of the run, in ms."""
    total = 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            total += int(line.split("|")[0].removeprefix("import time:"))
    return total / 1000


def measure(runs: int = 10) -> dict[str, Any]:
    """Median seconds of a whole ``ask`` on the tiny model, and its breakdown (seconds)."""
    from PIL import Image

    from llava_cli import synthetic

    with tempfile.TemporaryDirectory(prefix="llava-fixed-cost-") as folder:
        root = Path(folder)
        pair = synthetic.build_colour_oracle(root / "model")
        image = root / "red.png"
        Image.new("RGB", (64, 64), (230, 30, 30)).save(image)
        env = _environment(root / "home", root / "pycache")
        python = [sys.executable]
        ask = [
            *python,
            "-m",
            "llava_cli",
            "ask",
            str(image),
            "--model",
            str(pair.model),
            "--mmproj",
            str(pair.mmproj),
            "-p",
            QUESTION,
            "--no-cache",
        ]
        default_threads = list(ask)
        ask = [*ask, "--threads", "1"]
        _, first = _wall(ask, env)  # fills the bytecode cache
        if first.returncode != 0 or first.stdout != "red\n":
            raise RuntimeError(f"the tiny model did not answer: {first.stderr.strip()}")
        walls: dict[str, list[float]] = {"ask": [], "default": [], "python": [], "version": []}
        timings: list[dict[str, float]] = []
        for _ in range(runs):  # interleaved, so that a busy moment touches each alike
            walls["ask"].append(_wall(ask, env)[0])
            walls["default"].append(_wall(default_threads, env)[0])
            walls["python"].append(_wall([*python, "-c", "pass"], env)[0])
            walls["version"].append(_wall([*python, "-m", "llava_cli", "--version"], env)[0])
            _, as_json = _wall([*ask, "--json"], env)
            timings.append(json.loads(as_json.stdout)["timings"])
        _, traced = _wall([*python, "-X", "importtime", *ask[1:]], env)
        median = {name: statistics.median(values) for name, values in walls.items()}
        parts = {
            key: statistics.median(t[key] for t in timings)
            for key in ("load_s", "image_encode_s", "prefill_s", "decode_s")
        }
        return {
            "ask_s": median["ask"],
            "ask_default_threads_s": median["default"],
            "runs": runs,
            "target_s": TARGET_S,
            "python_startup_s": median["python"],
            "version_s": median["version"],
            "imports_s": _import_ms(traced.stderr) / 1000,
            **parts,
        }


def row(m: dict[str, Any]) -> str:
    return f"whole ask on the tiny test model: {m['ask_s']:.2f} s (target ≤ {TARGET_S:.2f} s)"


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    m = measure(runs)
    print(row(m))
    print(
        f"  of which: python start-up {m['python_startup_s']:.3f} s, `llava --version` "
        f"{m['version_s']:.3f} s, imports of an ask {m['imports_s']:.3f} s; llama.cpp: load "
        f"{m['load_s']:.3f} s, encode {m['image_encode_s']:.3f} s, prefill {m['prefill_s']:.3f} s, "
        f"decode {m['decode_s']:.3f} s (medians of {m['runs']}); with the default threads "
        f"{m['ask_default_threads_s']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

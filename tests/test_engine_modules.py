"""How the engine's modules fit together: no import cycle among them, the pure ones free of
llama.cpp (so they can be tested without it), and records that need no model."""

from __future__ import annotations

import graphlib
import subprocess
import sys
from dataclasses import fields

from llava_cli import engine
from llava_cli.engine import Counters

from .test_layering import MODULES, imports_of

PURE = ("prefix_match", "records")


def engine_modules_imported_by(stem: str) -> set[str]:
    """The engine modules one imports (lazy and TYPE_CHECKING imports included)."""
    prefix = "llava_cli.engine."
    return {
        imp.name.removeprefix(prefix).partition(".")[0]
        for imp in imports_of(prefix + stem)
        if imp.name.startswith(prefix)
    }


def test_the_engine_modules_import_each_other_without_a_cycle() -> None:
    stems = [
        m.removeprefix("llava_cli.engine.") for m in MODULES if m.startswith("llava_cli.engine.")
    ]
    graph = {stem: engine_modules_imported_by(stem) for stem in stems}
    assert graph["session"] >= {"model", "prefix_match"}  # the walk sees what it should
    graphlib.TopologicalSorter(graph).prepare()  # CycleError names the modules of a cycle


def test_the_pure_modules_work_without_llama_cpp() -> None:
    """Imported, and used, in a process where llama_cpp cannot be imported at all."""
    script = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from llava_cli.engine.prefix_match import Span, first_difference\n"
        "from llava_cli.engine.records import Counters\n"
        "cached = [Span('text', 0, 3, [1, 2, 3])]\n"
        "print(first_difference(cached, [[1, 2, 9]]), Counters(2) - Counters(1))\n"
        "print(sorted(m for m, v in sys.modules.items() if m.startswith('llama_cpp') and v))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    kept, rest = result.stdout.split("\n", 1)
    assert kept.startswith(
        "FirstDifference(keep_spans=0, keep_tokens=2, rest=[[9]]) Counters(text_tokens_evaluated=1"
    )
    assert rest.strip() == "[]"


def test_the_package_names_load_on_first_use() -> None:
    assert sorted(engine.__all__) == sorted(engine._HOMES)
    for name in engine.__all__:
        assert getattr(engine, name) is not None


def test_counters_subtract_field_by_field() -> None:
    n = len(fields(Counters))
    before = Counters(*range(n))
    now = Counters(*(3 * i + 1 for i in range(n)))
    assert now - before == Counters(*(2 * i + 1 for i in range(n)))
    assert now - now == Counters()


def test_a_snapshot_does_not_follow_the_counters() -> None:
    counters = Counters()
    before = counters.snapshot()
    counters.text_tokens_evaluated += 4
    assert counters - before == Counters(text_tokens_evaluated=4)

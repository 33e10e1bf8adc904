"""How the engine's modules fit together: no import cycle among them, the pure ones free of
llama.cpp (so they can be tested without it), and records that need no model."""

from __future__ import annotations

import ast
import graphlib
from dataclasses import fields
from pathlib import Path

from llava_cli import engine
from llava_cli.engine import Counters

ENGINE = Path(engine.__file__).parent
PURE = ("prefix_match", "records")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, name) of every import in a module, lazy and TYPE_CHECKING ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(node.level, name) for name in names]
    return found


def test_the_engine_modules_import_each_other_without_a_cycle() -> None:
    graph = {
        path.stem: {name.split(".")[0] for level, name in imports_of(path) if level == 1}
        for path in ENGINE.glob("*.py")
    }
    assert graph["session"] >= {"model", "prefix_match"}  # the walk sees what it should
    graphlib.TopologicalSorter(graph).prepare()  # CycleError names the modules of a cycle


def test_the_pure_modules_import_no_llama_cpp() -> None:
    for stem in PURE:
        top = {name.split(".")[0] for level, name in imports_of(ENGINE / f"{stem}.py") if not level}
        assert "llama_cpp" not in top, stem
        assert all(
            name in PURE for level, name in imports_of(ENGINE / f"{stem}.py") if level == 1
        ), stem


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

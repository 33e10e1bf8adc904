"""Modules stay small enough to read: one over ~400 lines says at its top why it is whole."""

from __future__ import annotations

import ast
from pathlib import Path

import llava_cli

PACKAGE = Path(llava_cli.__file__).parent
LONGEST_WITHOUT_REASON = 420  # "~400": a few lines of slack before a reason is owed
REASON_WORDS = ("over our ~400 lines", "longer than our ~400 lines")


def test_a_long_module_says_why_it_is_whole() -> None:
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines <= LONGEST_WITHOUT_REASON:
            continue
        docstring = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").lower()
        if not any(words in docstring for words in REASON_WORDS):
            unexplained.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
    assert not unexplained, (
        "split these by responsibility, or say at the top why they are whole "
        f"('longer than our ~400 lines on purpose: ...'): {', '.join(unexplained)}"
    )

"""All terminal output. stdout carries only answers and requested data; the rest goes to stderr.

Model text is written as-is, never through Rich markup (an answer containing ``[red]`` prints
literally). Colour only when stderr is a terminal and ``NO_COLOR`` is unset.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO


def _color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def error(message: str) -> None:
    """One line on stderr: ``Error: <what> — <fix>``."""
    prefix = "\x1b[1;31mError:\x1b[0m " if _color(sys.stderr) else "Error: "
    sys.stderr.write(prefix + message + "\n")
    sys.stderr.flush()


def info(message: str) -> None:
    """A progress or diagnostic line on stderr."""
    line = f"\x1b[2m{message}\x1b[0m" if _color(sys.stderr) else message
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def stream_answer(chunks: Iterable[str], out: TextIO | None = None) -> None:
    """Write text chunks to stdout as they come, then a newline (also after a cut-off one)."""
    out = out or sys.stdout
    wrote = False
    try:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            wrote = True
    finally:
        if wrote or sys.exc_info()[0] is None:
            out.write("\n")
            out.flush()


def json_line(record: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()

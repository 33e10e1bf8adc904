"""What the terminal can take: escape sequences (not under ``TERM=dumb``), colour (not under
``NO_COLOR``), characters (the locale's encoding), and a width. Also the transient status line
shown while nothing else shows. ``render`` is the public face of all of it.
"""

from __future__ import annotations

import atexit
import codecs
import io
import os
import sys
import threading
import time
from typing import TextIO

from .config import environment
from .text import cell_width, cut_to_width, escaped


def escapes_allowed(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr by default) may be sent escape sequences: it is a terminal,
    and not one that says it understands none (``TERM=dumb``). Without them, everything is
    written plainly: no colour, no cursor moves, no live views, lines read without an editor."""
    stream = stream or sys.stderr
    return stream.isatty() and not environment().dumb_terminal


def color_allowed(stream: TextIO | None = None) -> bool:
    """Escape sequences allowed, and ``NO_COLOR`` unset."""
    return escapes_allowed(stream) and not environment().no_color


def output_width(out: TextIO) -> int | None:
    """How many columns a line on ``out`` may take: ``COLUMNS`` when it is a positive number,
    else the terminal's width when ``out`` is one, else no limit (a pipe, a file)."""
    columns = environment().columns
    if columns is not None:
        return columns
    if not out.isatty():
        return None
    try:
        return os.get_terminal_size(out.fileno()).columns or None
    except (OSError, ValueError):
        return None


# -- characters the encoding cannot carry ------------------------------------------------------

# The typography of our own messages, in ASCII. What is not here becomes ``?`` on stdout (model
# text, data: a readable answer, as ``iconv //TRANSLIT`` would give) and ``<U+XXXX>`` on stderr
# (a file name: which character it was is worth knowing), as ``text.escaped`` writes others.
_ASCII_FOR = {
    "…": "...",
    "—": "--",
    "–": "-",
    "·": "-",
    "×": "x",
    "‘": "'",
    "’": "'",
    "“": '"',
    "”": '"',
    "→": "->",
    "←": "<-",
    "≈": "~",
    "≥": ">=",
    "≤": "<=",
    "•": "*",
    "\u00a0": " ",
}


def _ascii_or(unknown: str) -> object:
    def handler(exc: UnicodeError) -> tuple[str, int]:
        if not isinstance(exc, UnicodeEncodeError):
            raise exc
        bad = exc.object[exc.start : exc.end]
        out = "".join(_ASCII_FOR.get(c, unknown.format(ord(c))) for c in bad)
        return out, exc.end

    return handler


STDOUT_ERRORS, STDERR_ERRORS = "llava-stdout", "llava-stderr"
codecs.register_error(STDOUT_ERRORS, _ascii_or("?"))  # type: ignore[arg-type]
codecs.register_error(STDERR_ERRORS, _ascii_or("<U+{:04X}>"))  # type: ignore[arg-type]


def _utf(encoding: str | None) -> bool:
    try:
        return codecs.lookup(encoding or "ascii").name.startswith("utf")
    except LookupError:
        return False


def fit_to_encoding(stream: TextIO | None, errors: str) -> None:
    """Under a locale whose encoding cannot carry every character (``LC_ALL=C`` without
    UTF-8 mode, ``PYTHONIOENCODING=latin-1``), write what it cannot carry as ASCII (``…`` as
    ``...``) or a mark, instead of failing with ``UnicodeEncodeError``: once, where the
    standard streams are set up. The same for a terminal and a pipe: a program reading the
    pipe expects the locale's encoding, and UTF-8 bytes would reach it as mojibake; a
    program that wants every character asks for ``--json`` (escaped, so nothing is lost) or
    runs under a UTF-8 locale."""
    if isinstance(stream, io.TextIOWrapper) and not _utf(stream.encoding):
        stream.reconfigure(errors=errors)


def can_encode(stream: TextIO, text: str) -> bool:
    """Whether ``stream`` can write ``text`` as it is (one with no encoding, a StringIO, can)."""
    encoding = getattr(stream, "encoding", None)
    if encoding is None or _utf(encoding):
        return True
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def ellipsis(stream: TextIO) -> str:
    return "…" if can_encode(stream, "…") else "..."


# -- the status line ---------------------------------------------------------------------------


class Status:
    """A transient line on stderr (``⠋ loading model… 3 s``), redrawn by a daemon thread:
    llama.cpp's long calls release the GIL, so the spinner turns while they run. Every other
    writer clears it first (``clear``), so lines never interleave; so does the exit."""

    FRAMES, ASCII_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏", "|/-\\"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._text: str | None = None
        self._since = 0.0
        self._stream: TextIO | None = None
        self._shown = False
        self._frame = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def show(self, text: str) -> None:
        stream = sys.stderr
        if not escapes_allowed(stream):
            return
        with self._lock:
            if self._stream is not stream:
                self._erase()
            self._text, self._since, self._stream = escaped(text), time.monotonic(), stream
            self._draw()
            if self._thread is None:
                self._stop = threading.Event()  # each thread its own: an old one may linger
                self._thread = threading.Thread(
                    target=self._spin, args=(self._stop,), name="llava-status", daemon=True
                )
                self._thread.start()

    def clear(self) -> None:
        with self._lock:
            if self._text is None and not self._shown:
                return
            self._erase()
            self._text = None
            self._thread = None  # it sees the stop and ends; a new status starts another
            self._stop.set()

    def _spin(self, stop: threading.Event) -> None:
        while not stop.wait(0.1):
            with self._lock:
                if stop.is_set() or self._text is None:
                    return
                self._frame += 1
                self._draw()

    def _draw(self) -> None:
        stream, text = self._stream, self._text
        if stream is None or text is None:
            return
        seconds = int(time.monotonic() - self._since)
        utf = can_encode(stream, self.FRAMES + "…")
        frames = self.FRAMES if utf else self.ASCII_FRAMES
        line = f"{frames[self._frame % len(frames)]} {text}" + (f" {seconds} s" if seconds else "")
        if not utf:
            line = line.encode(stream.encoding, STDERR_ERRORS).decode(stream.encoding)
        width = output_width(stream) or 80
        if cell_width(line) >= width:  # a line that wraps cannot be taken back with \r
            line = cut_to_width(line, width - 1, ellipsis(stream))
        try:
            stream.write("\r\x1b[2K" + line)
            stream.flush()
            self._shown = True
        except (OSError, ValueError):  # stderr went away: this status ends, a next may start
            self._text = None
            self._thread = None
            self._stop.set()

    def _erase(self) -> None:
        if self._shown and self._stream is not None:
            try:
                self._stream.write("\r\x1b[2K")
                self._stream.flush()
            except (OSError, ValueError):
                pass
        self._shown = False


STATUS = Status()
atexit.register(STATUS.clear)

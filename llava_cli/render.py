"""All terminal output. stdout carries only answers and requested data; the rest goes to stderr.

Model text is written as-is, never through Rich markup (an answer containing ``[red]`` prints
literally). Colour only when stderr is a terminal, ``TERM`` is not ``dumb`` and ``NO_COLOR``
is unset; under ``TERM=dumb`` no escape sequence at all (``escapes_allowed``). Characters the
locale's encoding cannot carry are written as ASCII or a mark (``terminal.fit_to_encoding``).

Longer than our ~400 lines on purpose: it is the one module that writes to the terminal and
the only importer of rich, so every output rule (escaping, colour, width, encoding, stdout
vs stderr) is kept and checked in one place.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO, cast

from .terminal import (
    STATUS,
    STDERR_ERRORS,
    STDOUT_ERRORS,
    can_encode,
    color_allowed,
    ellipsis,
    escapes_allowed,
    fit_to_encoding,
    output_width,
)
from .text import TERMINAL_DROPS, cell_width, cut_to_width, escaped, json_escaped, redacted
from .units import human_bytes

# re-exported for the commands, the chat's line reader and the tests
__all__ = [  # re-exported for the commands: the terminal is reached through render
    "can_encode",
    "color_allowed",
    "ellipsis",
    "escapes_allowed",
    "human_bytes",
    "output_width",
]

_color = color_allowed


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def status(text: str) -> None:
    """Show (or replace) a transient status line on stderr (``⠋ loading model… 3 s``), what is
    happening while nothing else shows. Only on a terminal that takes escape sequences (not a
    pipe, not ``TERM=dumb``); a no-op otherwise. Every writer here erases it first."""
    STATUS.show(text)


def status_clear() -> None:
    """Erase the status line, if one shows (at exit too)."""
    STATUS.clear()


class _GuardedOutput:
    """Standard output that remembers why it failed: a full disk (``>/dev/full``), an I/O
    error, or a descriptor the shell closed (``>&-``, where every write fails as writing to a
    closed descriptor does, so an answer is never silently lost). Everything else is the
    real stream's."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self.failure: str | None = None
        self.encoding = stream.encoding if stream is not None else "utf-8"

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self) -> int:
        return 1

    def write(self, text: str) -> int:
        if self._stream is None:
            self.failure = "standard output is closed"
            raise OSError(errno.EBADF, self.failure)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failure = exc.strerror or str(exc)
            raise

    def flush(self) -> None:
        if self._stream is None or self.failure is not None:
            return  # what failed once is not retried (nor at exit)
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failure = exc.strerror or str(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def guard_standard_streams() -> None:
    """Put /dev/null on descriptors 0-2 where the shell closed them, before anything is
    opened: otherwise the first file opened becomes "standard output" and the answer is
    written into it. A closed stderr stays silent (the exit code still tells); standard
    output remembers a failed write (``stdout_failed``). Under a locale that is not UTF-8,
    what its encoding cannot carry is replaced, not fatal (``terminal.fit_to_encoding``):
    ``?`` on stdout, ``<U+XXXX>`` on stderr, ASCII for our own punctuation on both."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if 0 in closed:
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    if 2 in closed:
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    stream = None if 1 in closed or sys.stdout is None else sys.stdout
    fit_to_encoding(stream, STDOUT_ERRORS)
    fit_to_encoding(sys.stderr, STDERR_ERRORS)
    sys.stdout = cast(TextIO, _GuardedOutput(stream))


def stdout_failed() -> str | None:
    """Why standard output could not take what was written (a full disk, a closed
    descriptor), or ``None``: asked after an OSError, to tell it apart from other failures."""
    return sys.stdout.failure if isinstance(sys.stdout, _GuardedOutput) else None


def error(message: str) -> None:
    """One line on stderr: ``Error: <what> — <fix>`` (whatever came from files, escaped)."""
    status_clear()
    prefix = "\x1b[1;31mError:\x1b[0m " if _color(sys.stderr) else "Error: "
    sys.stderr.write(prefix + escaped(_without_secrets(message)) + "\n")
    sys.stderr.flush()


def traceback(exc: BaseException) -> None:
    """``LLAVA_DEBUG``'s report: the whole traceback on stderr, plain, with no local variables
    and no secret in it (a server may have echoed the token into an exception's text)."""
    import traceback as tb

    status_clear()
    text = "".join(tb.format_exception(exc))
    sys.stderr.write(escaped(_without_secrets(text), keep="\n"))
    sys.stderr.flush()


def _without_secrets(text: str) -> str:
    from .config import secrets

    return redacted(text, secrets())


def info(message: str) -> None:
    """A progress or diagnostic line on stderr."""
    status_clear()
    message = escaped(_without_secrets(message))
    line = f"\x1b[2m{message}\x1b[0m" if _color(sys.stderr) else message
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def stream_answer(chunks: Iterable[str], out: TextIO | None = None) -> None:
    """Write text chunks to stdout as they come, then a newline (also after a cut-off one).
    A terminal gets no control characters (a model's escape sequences); a pipe gets every
    character the model wrote, in the locale's encoding (what it cannot carry becomes ASCII
    or ``?``: see ``terminal.fit_to_encoding``). The status line goes when the answer starts."""
    out = out or sys.stdout
    terminal = out.isatty()
    wrote = False
    try:
        for chunk in chunks:
            if not wrote:
                status_clear()
            out.write(chunk.translate(TERMINAL_DROPS) if terminal else chunk)
            out.flush()
            wrote = True
    finally:
        status_clear()
        if wrote or sys.exc_info()[0] is None:
            out.write("\n")
            out.flush()


class ThinkingEcho:
    """Where a reasoning model's thinking goes: dimmed on stderr when that is a terminal,
    nowhere otherwise. ``answer(stream)`` passes the answer through, after a blank line that
    closes the thinking."""

    def __init__(self) -> None:
        self._err = sys.stderr  # held: a live view may stand in for sys.stderr later
        self.enabled = self._err.isatty()
        self._dim = ("\x1b[2m", "\x1b[0m") if _color(self._err) else ("", "")
        self._open = False

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        status_clear()
        if not self._open and not self._dim[0]:  # no colour to set it apart: say what it is
            self._err.write("thinking: ")
        self._err.write(self._dim[0] + text.translate(TERMINAL_DROPS) + self._dim[1])
        self._err.flush()
        self._open = True

    def close(self) -> None:
        if self._open:
            self._err.write("\n\n")
            self._err.flush()
            self._open = False

    def answer(self, chunks: Iterable[str]) -> Iterator[str]:
        for chunk in chunks:
            self.close()
            yield chunk
        self.close()


def exact_text(text: str, out: TextIO | None = None) -> None:
    """Text on stdout byte for byte in a pipe (a prompt, for a file or a diff). A terminal
    is shown control characters escaped, and gets a final newline so that the shell prompt
    starts on a line of its own."""
    out = out or sys.stdout
    status_clear()
    if out.isatty():  # a terminal is shown what would act on it, escaped (<U+001B>)
        text = escaped(text, keep="\n\t")
    out.write(text)
    if out.isatty() and not text.endswith("\n"):
        out.write("\n")
    out.flush()


def json_value(value: Any, out: TextIO | None = None) -> None:
    """One JSON document on stdout, indented for people, valid for ``jq``."""
    _json(value, out, indent=2)


def json_line(record: dict[str, Any], out: TextIO | None = None) -> None:
    _json(record, out, indent=None)


def _json(value: Any, out: TextIO | None, indent: int | None) -> None:
    """Characters as they are where the output's encoding carries them all (UTF-8), as
    ``\\uXXXX`` escapes otherwise: the same data either way, nothing lost to the locale."""
    out = out or sys.stdout
    status_clear()
    ascii_only = not can_encode(out, "\U0010ffff")
    out.write(json_escaped(json.dumps(value, ensure_ascii=ascii_only, indent=indent)) + "\n")
    out.flush()


def can_ask() -> bool:
    """Whether a question can be answered here: standard input is a terminal, or (the
    question piped in, ``echo … | llava ask``) the controlling terminal can be read."""
    if sys.stdin is not None and sys.stdin.isatty():
        return True
    try:
        with open("/dev/tty", "rb"):
            return True
    except OSError:
        return False


def confirm(question: str) -> bool:
    """Ask on the terminal (the question on stderr, the answer from standard input, or from
    the controlling terminal when standard input is a pipe); anything but y/yes is no."""
    status_clear()
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            answer = sys.stdin.readline()
        else:
            with open("/dev/tty", encoding="utf-8", errors="replace") as tty:
                answer = tty.readline()
    except (OSError, ValueError):
        answer = ""
    if not answer.endswith("\n"):  # Ctrl-D: the next line starts on a line of its own
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


def table(rows: list[list[str]], out: TextIO | None = None, *, shrink: Sequence[int] = ()) -> None:
    """Plain aligned columns on stdout (the first row is the header); no colour, easy to cut.

    Each line fits the output's width (``terminal.output_width``: ``COLUMNS``, else the
    terminal's; a pipe has no limit): the columns named in ``shrink`` (indexes) give up
    room, the widest first, down to ``_MIN_SHRUNK`` columns each, their cells cut with an
    ellipsis; the others keep their width."""
    out = out or sys.stdout
    status_clear()
    rows = [[escaped(cell) for cell in row] for row in rows]
    if not rows:
        return
    widths = [max(cell_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    limit = output_width(out)
    if limit is not None and shrink:
        widths = _shrunk(widths, limit, shrink)
    mark = ellipsis(out)
    for row in rows:
        cells = [
            _pad(cut_to_width(cell, width, mark), width)
            for cell, width in zip(row, widths, strict=True)
        ]
        out.write("  ".join(cells).rstrip() + "\n")
    out.flush()


_MIN_SHRUNK = 10


def _shrunk(widths: list[int], limit: int, shrink: Sequence[int]) -> list[int]:
    """Column widths whose line (two spaces between columns) fits ``limit``, taking from the
    widest of the ``shrink`` columns first."""
    widths = list(widths)
    excess = sum(widths) + 2 * (len(widths) - 1) - limit
    while excess > 0:
        room = [i for i in shrink if widths[i] > _MIN_SHRUNK]
        if not room:
            break
        widest = max(room, key=lambda i: widths[i])
        others = [widths[i] for i in room if i != widest]
        step = min(excess, widths[widest] - max([_MIN_SHRUNK, *others]) or 1)
        widths[widest] -= step
        excess -= step
    return widths


def _pad(cell: str, width: int) -> str:
    return cell + " " * (width - cell_width(cell))


def fields(
    rows: Sequence[tuple[str, object]], out: TextIO | None = None, *, width: int = 0, gap: int = 2
) -> None:
    """``label  value`` lines on stdout (``llava show``, ``doctor``), the values in one column:
    labels padded to ``width`` or to the longest of them, then ``gap`` spaces. Both escaped:
    they quote GGUF metadata and paths."""
    out = out or sys.stdout
    status_clear()
    width = max([width, *(len(label) for label, _ in rows)])
    for label, value in rows:
        out.write(f"{escaped(label):<{width}}{' ' * gap}{escaped(str(value))}\n")
    out.flush()


class PlainTransfer:
    """Progress for a log: a line when a file starts, at each quarter, and when it is done."""

    def __init__(self) -> None:
        self._label, self._total, self._done, self._quarter = "", 0, 0, 0

    def __enter__(self) -> PlainTransfer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self, label: str, total: int, done: int) -> None:
        self._label, self._total, self._done = label, total, done
        self._quarter = 4 * done // max(total, 1)
        info(f"downloading {label} ({human_bytes(total)})")

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        quarter = 4 * self._done // max(self._total, 1)
        if quarter > self._quarter and quarter < 4:
            info(f"{self._label}: {25 * quarter}% of {human_bytes(self._total)}")
        self._quarter = quarter

    def finish(self, message: str) -> None:
        info(message)

    def note(self, message: str) -> None:
        info(message)


class RichTransfer:
    """A Rich progress bar per file on stderr: bytes, speed and time left."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._console = Console(stderr=True, highlight=False)
        self._progress = Progress(
            TextColumn("{task.fields[label]}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> RichTransfer:
        status_clear()
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, label: str, total: int, done: int) -> None:
        self._task = self._progress.add_task("", label=label, total=total, completed=done)

    def advance(self, nbytes: int) -> None:
        self._progress.update(self._task, advance=nbytes)

    def finish(self, message: str) -> None:
        self.note(message)

    def note(self, message: str) -> None:
        """A line above the bars, as ``info`` writes one: escaped, without secrets."""
        self._console.print(escaped(_without_secrets(message)), markup=False, style="dim")


def transfer_progress() -> PlainTransfer | RichTransfer:
    """A progress bar on a terminal that takes escape sequences; lines otherwise."""
    return RichTransfer() if escapes_allowed(sys.stderr) else PlainTransfer()


def stream_markdown(chunks: Iterable[str], *, max_fps: float = 8.0) -> None:
    """Stream an answer to a terminal as Markdown (code blocks, lists) in a Rich Live view.

    The text is parsed as Markdown only: never as Rich markup, and HTML in it stays text.
    The live view shows the answer's last screenful, re-rendered at most ``max_fps`` times a
    second (no flicker, and nothing drawn twice when the answer outgrows the screen); when
    the answer ends, or is stopped, it is printed once in full. A terminal that takes no
    escape sequences (``TERM=dumb``) gets the plain stream.
    """
    import time

    if sys.stdout.isatty() and not escapes_allowed(sys.stdout):
        stream_answer(chunks)
        return

    from rich.console import Console
    from rich.live import Live

    console = Console(highlight=False)
    text, last = "", 0.0
    stream = iter(chunks)
    try:
        # The live view opens with the answer's first text, so that whatever comes before it
        # (a reasoning model's thinking, on stderr) is never caught in it; stderr is left
        # alone (Rich would otherwise send it to stdout while the view is live).
        first = next(stream, None)
        status_clear()
        if first is None:
            return
        text = first
        with Live(
            console=console, auto_refresh=False, transient=True, redirect_stderr=False
        ) as live:
            live.update(_Tail(_answer_markdown(text)), refresh=True)
            last = time.monotonic()
            for chunk in stream:
                text += chunk
                now = time.monotonic()
                if now - last >= 1.0 / max_fps:
                    live.update(_Tail(_answer_markdown(text)), refresh=True)
                    last = now
    finally:
        if text:
            console.print(_answer_markdown(text))


def _answer_markdown(text: str) -> Any:
    """Rich Markdown for model text: HTML is not interpreted, control characters are dropped."""
    from markdown_it import MarkdownIt
    from rich.markdown import Markdown

    clean = text.translate(TERMINAL_DROPS)
    md = Markdown(clean)
    parser = MarkdownIt().enable("strikethrough").enable("table")
    md.parsed = parser.disable(["html_inline", "html_block"]).parse(clean)
    return md


class _Tail:
    """The last screenful of a renderable, so a live view never outgrows the terminal."""

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Any, options: Any) -> Iterable[Any]:
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-max(1, console.size.height - 2) :]:
            yield from line
            yield Segment.line()


def image_preview(width: int, height: int, rgb: bytes) -> None:
    """A few lines of coloured half blocks on stderr: two pixel rows per character row."""
    if not _color(sys.stderr):
        return
    status_clear()
    lines = []
    for y in range(0, height - 1, 2):
        cells = []
        for x in range(width):
            top = rgb[(y * width + x) * 3 : (y * width + x) * 3 + 3]
            bottom = rgb[((y + 1) * width + x) * 3 : ((y + 1) * width + x) * 3 + 3]
            cells.append("\x1b[38;2;{};{};{}m\x1b[48;2;{};{};{}m\u2580".format(*top, *bottom))
        lines.append("".join(cells) + "\x1b[0m")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()

"""The chat's input line (prompt-toolkit): history, key bindings, completion.

Enter sends; Alt-Enter (or Esc then Enter) starts a new line, and pasted text keeps its
newlines. Tab completes slash commands, and file paths after the commands that take them
(images after /image), quoted as the commands split them. Ctrl-C clears the line; Ctrl-D on
an empty line ends the chat. The slash commands live in ``slash.py`` (the table)
and ``commands/chat.py``; this module only reads lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from .slash import FILE_ARGUMENTS, IMAGE_ARGUMENTS, last_word, split_words


class ChatCompleter(Completer):
    """Slash commands at the start of the line; after /image the images and folders, after
    /save and /load any file. A path is completed as the commands split it (``shlex``): a name
    with a space or a quote comes out quoted, and a file's quote is closed."""

    def __init__(self, commands: Mapping[str, str]) -> None:
        self.commands = commands

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for name, help_text in self.commands.items():
                if name.startswith(text):
                    yield Completion(name, -len(text), display_meta=help_text)
            return
        command, _, rest = text.partition(" ")
        if command not in IMAGE_ARGUMENTS | FILE_ARGUMENTS:
            return
        start, quote = last_word(rest)
        raw = rest[start:]
        words = split_words(raw)
        typed = words[0] if words else ""
        images_only = command in IMAGE_ARGUMENTS
        style = quote or (raw[0] if raw[:1] in ("'", '"') else None)  # the user's quotes
        for path, is_dir in _paths_starting_with(typed, images_only=images_only):
            name = os.path.basename(path.rstrip("/")) + ("/" if is_dir else "")
            word = _quoted_word(path, style, is_dir)
            yield Completion(word, -len(raw), display=name)


def _paths_starting_with(typed: str, *, images_only: bool) -> Iterator[tuple[str, bool]]:
    """Paths that complete ``typed`` (a folder part as typed, ``~`` kept): folders, and the
    files (only images, if asked) in the folder ``typed`` names, sorted by name."""
    from .images import IMAGE_SUFFIXES

    folder, prefix = os.path.split(typed)
    where = os.path.expanduser(folder) if folder else "."
    try:
        names = sorted(n for n in os.listdir(where) if n.startswith(prefix))
    except (OSError, ValueError):
        return
    for name in names:
        if name.startswith(".") and not prefix.startswith("."):
            continue  # hidden, unless asked for
        try:
            is_dir = os.path.isdir(os.path.join(where, name))
        except (OSError, ValueError):
            continue
        if not is_dir and images_only and os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        yield os.path.join(folder, name) + ("/" if is_dir else ""), is_dir


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./-_~")


def _quoted_word(path: str, quote: str | None, is_dir: bool) -> str:
    """``path`` written so that ``shlex`` reads it back whole: as it is when it needs no
    quotes and none was opened, else in double quotes (a single-quoted word without a single
    quote in it stays in single quotes). A file's quote is closed, so Enter sends it; a
    folder's stays open, to go on typing inside it."""
    if quote is None and all(c in _PLAIN for c in path):
        return path
    if quote == "'" and "'" not in path:
        body, quote = path, "'"
    else:
        body, quote = path.replace("\\", "\\\\").replace('"', '\\"'), '"'
    return quote + body + ("" if is_dir else quote)


def _bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return kb


class PlainReader:
    """Lines from a pipe or file (``llava chat < script.txt``): no prompt, no screen, so stdout
    keeps nothing but the answers. On a terminal that takes no escape sequences
    (``TERM=dumb``) lines are read the same way, after a plain ``prompt`` on stderr."""

    def __init__(self, stream: Any = None, *, prompt: str = "") -> None:
        self.stream = stream or sys.stdin
        self.prompt = prompt

    def lines(self) -> Iterable[str]:
        """Each line, up to PROMPT_MAX_BYTES; a longer one is skipped, with an error line."""
        from .options import PROMPT_MAX_BYTES
        from .render import error

        source = getattr(self.stream, "buffer", self.stream)
        while True:
            if self.prompt:
                sys.stderr.write(self.prompt)
                sys.stderr.flush()
            raw = source.readline(PROMPT_MAX_BYTES + 1)
            if not raw:
                return
            if len(raw) > PROMPT_MAX_BYTES and raw[-1:] not in (b"\n", "\n"):
                while (rest := source.readline(1 << 20)) and rest[-1:] not in (b"\n", "\n"):
                    pass  # the rest of the line, read and dropped a megabyte at a time
                error(f"a line of more than {PROMPT_MAX_BYTES >> 20} MiB was skipped")
                continue
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            yield line.rstrip("\r\n")


def reader(commands: Mapping[str, str], history_file: Path | None) -> LineReader | PlainReader:
    """The interactive line editor on a terminal; plain lines when stdin is not one, or when
    the terminal takes no escape sequences (``TERM=dumb``: the editor's cursor codes would show
    as text)."""
    from .render import escapes_allowed

    if not sys.stdin.isatty():
        return PlainReader()
    if not escapes_allowed(sys.stdin):
        return PlainReader(prompt="> ")
    return LineReader(commands, history_file)


HISTORY_MAX_BYTES = 16 << 20  # prompt-toolkit reads the whole file when the chat starts


def _usable_history(path: Path) -> bool:
    """Whether ``path`` can be the chat's input history: a regular file of bounded size, or
    none yet, which is created readable only by its owner (0600, as saved chats are; one
    left readable by others by an earlier version is narrowed to that). A FIFO there would
    hang the start, a huge file fill memory, a link lead elsewhere: such a history is left
    alone and this chat keeps its history in memory."""
    import stat

    from .transcript import private_folder

    try:
        private_folder(path.parent)
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError:
        return False
    if info is not None and not (stat.S_ISREG(info.st_mode) and info.st_size <= HISTORY_MAX_BYTES):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & 0o700)
    except OSError:
        pass  # someone else's file, or a file system without modes: used as it is
    finally:
        os.close(fd)
    return True


@contextmanager
def keys_unechoed() -> Iterator[None]:
    """While an answer streams, what is typed is not echoed (it waits for the next prompt),
    nor is Ctrl-C's ``^C``. Echoed, they land in the answer's live view: its last line fills
    the width, so ``^C`` wraps to a new row, the view's redraw starts a row too low, and its
    top line is left on the screen above the answer printed in full (the partial answer
    twice). Ctrl-C still interrupts: only the echo is off."""
    stdin = sys.stdin
    try:
        import termios

        fd = stdin.fileno()
        before = termios.tcgetattr(fd) if stdin.isatty() else None
    except (ImportError, AttributeError, ValueError, OSError):  # no terminal: nothing to do
        before = None
    if before is None:
        yield
        return
    quiet = list(before)
    quiet[3] &= ~termios.ECHO  # the local modes
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except termios.error:
        yield
        return
    try:
        yield
    finally:
        with suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, before)


class LineReader:
    """Reads one message or command at a time; ``None`` at the end (Ctrl-D, end of input)."""

    def __init__(
        self,
        commands: Mapping[str, str],
        history_file: Path | None = None,
        *,
        input: Any = None,  # prompt-toolkit Input/Output: pipes and a dummy screen in tests
        output: Any = None,
    ) -> None:
        if output is None and not sys.stdout.isatty():  # the prompt stays off piped answers
            from prompt_toolkit.output import create_output

            output = create_output(stdout=sys.stderr)
        history: History = InMemoryHistory()
        if history_file is not None and _usable_history(history_file):
            history = FileHistory(str(history_file))
        self.session: PromptSession[str] = PromptSession(
            history=history,
            completer=ChatCompleter(commands),
            complete_while_typing=False,
            key_bindings=_bindings(),
            input=input,
            output=output,
            prompt_continuation=lambda width, line, soft: "… ".rjust(width),
        )

    def read(self) -> str | None:
        while True:
            try:
                return self.session.prompt("> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh, empty line
                continue
            except EOFError:
                return None

    def lines(self) -> Iterable[str]:
        while (line := self.read()) is not None:
            yield line

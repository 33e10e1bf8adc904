"""The chat's input line (prompt-toolkit): history, key bindings, completion.

Enter sends; Alt-Enter (or Esc then Enter) starts a new line, and pasted text keeps its
newlines. Tab completes slash commands, and file paths after the commands that take them.
Ctrl-C clears the line; Ctrl-D on an empty line ends the chat. The slash commands themselves
live in ``commands/chat.py``; this module only reads lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

PATH_COMMANDS = ("/image", "/save", "/load")


class ChatCompleter(Completer):
    """Slash commands at the start of the line; file paths after /image, /save and /load."""

    def __init__(self, commands: Mapping[str, str]) -> None:
        self.commands = commands
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for name, help_text in self.commands.items():
                if name.startswith(text):
                    yield Completion(name, -len(text), display_meta=help_text)
            return
        command, _, rest = text.partition(" ")
        if command not in PATH_COMMANDS:
            return
        word, quoted = _last_word(rest)
        for found in self.paths.get_completions(Document(word, len(word)), event):
            path = word[: len(word) + found.start_position] + found.text
            if quoted or " " not in path:
                yield found
            else:  # a name with a space: rewrite the word, quoted, as the commands split it
                yield Completion('"' + path, -len(word), display=found.display)


def _last_word(rest: str) -> tuple[str, bool]:
    """The word being typed, and whether it is inside quotes (an odd number of '"')."""
    if rest.count('"') % 2:
        return rest[rest.rindex('"') + 1 :], True
    return rest.rsplit(" ", 1)[-1], False


def _bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return kb


class PlainReader:
    """Lines from a pipe or file (``llava chat < script.txt``): no prompt, no screen, so stdout
    keeps nothing but the answers."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdin

    def lines(self) -> Iterable[str]:
        """Each line, up to PROMPT_MAX_BYTES; a longer one is skipped, with an error line."""
        from .options import PROMPT_MAX_BYTES
        from .render import error

        source = getattr(self.stream, "buffer", self.stream)
        while raw := source.readline(PROMPT_MAX_BYTES + 1):
            if len(raw) > PROMPT_MAX_BYTES and raw[-1:] not in (b"\n", "\n"):
                while (rest := source.readline(1 << 20)) and rest[-1:] not in (b"\n", "\n"):
                    pass  # the rest of the line, read and dropped a megabyte at a time
                error(f"a line of more than {PROMPT_MAX_BYTES >> 20} MiB was skipped")
                continue
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            yield line.rstrip("\r\n")


def reader(commands: Mapping[str, str], history_file: Path | None) -> LineReader | PlainReader:
    """The interactive line editor on a terminal; plain lines when stdin is not one."""
    if not sys.stdin.isatty():
        return PlainReader()
    return LineReader(commands, history_file)


HISTORY_MAX_BYTES = 16 << 20  # prompt-toolkit reads the whole file when the chat starts


def _usable_history(path: Path) -> bool:
    """Whether ``path`` can be the chat's input history: a regular file of bounded size (or
    none yet). A FIFO there would hang the start, a huge file fill memory: such a history is
    left alone and this chat keeps its history in memory."""
    import os
    import stat

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= HISTORY_MAX_BYTES


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

"""The chat's slash commands: names, what they take, one line of help each, and the
settings ``/set`` changes; how a command line is split into words.

Imports nothing heavy: ``llava chat --help`` lists them, the line editor completes them, and
``commands/chat.py`` runs them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .errors import UsageError
from .options import OPTIONS, SETTINGS, SamplingParams

COMMANDS: dict[str, str] = {
    "/image": "PATH... attach images to the next message",
    "/images": "the images and their token cost; '/images clear' detaches those not sent yet",
    "/clear": "start a new conversation (same model)",
    "/system": "TEXT set the system prompt; '/system' shows it, '/system -' resets it",
    "/retry": "answer the last message again",
    "/undo": "drop the last message and its answer",
    "/save": "FILE save the chat (.json for programs, else Markdown)",
    "/load": "FILE resume a saved chat",
    "/set": "KEY VALUE " + ", ".join(SETTINGS),
    "/stats": "context use, and the last turn's work and speed",
    "/prompt": "[TEXT] the prompt as the model reads it: so far, or with TEXT as the next message",
    "/help": "this list",
    "/exit": "end the chat (also /bye, /quit, Ctrl-D)",
}

# Other names people type out of habit (Ollama's /bye), with the command they mean.
ALIASES: dict[str, str] = {"/bye": "/exit", "/quit": "/exit"}

# Commands whose arguments are file paths, completed as such: images only, or any file.
IMAGE_ARGUMENTS = frozenset({"/image"})
FILE_ARGUMENTS = frozenset({"/save", "/load"})

KEYS = "Alt-Enter: new line · Ctrl-C: stop an answer, or clear the line · //: send /"


def canonical(name: str) -> str:
    """The command a typed name means (``/bye`` is ``/exit``)."""
    return ALIASES.get(name, name)


def help_lines() -> list[str]:
    """The table as aligned lines, then the keys: for ``/help``."""
    width = max(len(name) for name in COMMANDS)
    return [f"{name:<{width}}  {text}" for name, text in COMMANDS.items()] + [KEYS]


def help_epilog() -> str:
    """chat --help's list of slash commands, from the table the chat itself uses: each with
    what it takes (``/image PATH...``), its help wrapped within 80 columns."""
    import re
    import textwrap

    rows = []
    for name, text in COMMANDS.items():
        # what the command takes leads its help: upper-case words, [optional] ones, "..."
        taken = re.match(r"((?:\[?[A-Z]+\]?(?:\.\.\.)?\s)*)(.*)", text)
        assert taken is not None
        rows.append((f"{name} {taken.group(1).strip()}".strip(), taken.group(2)))
    width = max(len(usage) for usage, _ in rows)
    lines = []
    for usage, text in rows:
        wrapped = textwrap.wrap(text, 80 - width - 4, break_on_hyphens=False) or [""]
        lines.append(f"  {usage:<{width}}  {wrapped[0]}")
        lines += [" " * (width + 4) + more for more in wrapped[1:]]
    return "In the chat (Tab completes them):\n" + "\n".join(lines)


def split_words(text: str) -> list[str]:
    """A command's arguments, split as a shell would (``shlex``: quotes, backslashes), with
    a quote left open at the end of the line taken as closed there and a lone backslash at
    the end dropped: what was meant, rather than an error."""
    import shlex

    _, quote, escaping = _scan(text)
    if escaping:
        text = text[:-1]
    return shlex.split(text + (quote or ""))


def last_word(text: str) -> tuple[int, str | None]:
    """Where the last word of ``text`` starts (``len(text)`` after a space: a new, empty
    word), and the quote left open at the end (``'``, ``"`` or ``None``)."""
    start, quote, _ = _scan(text)
    return start, quote


def _scan(text: str) -> tuple[int, str | None, bool]:
    """``text`` read as ``shlex`` (POSIX mode) reads it: the start of its last word, the
    quote open at the end, and whether the last character is a backslash still waiting for
    the character it escapes."""
    start, quote, escaping, in_word = len(text), None, False, False
    for i, char in enumerate(text):
        if not in_word:  # between words: no quote is open, nothing is escaped
            if char.isspace():
                continue
            start, in_word = i, True
        if escaping:
            escaping = False
        elif quote == "'":
            quote = None if char == "'" else quote
        elif quote == '"':
            if char == "\\":
                escaping = True
            elif char == '"':
                quote = None
        elif char.isspace():
            in_word = False
        elif char == "\\":
            escaping = True
        elif char in "'\"":
            quote = char
    return (start if in_word else len(text)), quote, escaping


def with_setting(sampling: SamplingParams, key: str, value: str) -> SamplingParams:
    """``sampling`` with one setting changed, as ``/set KEY VALUE`` (and a saved chat) names
    it: parsed and range-checked as options.OPTIONS says."""
    key = key.lower().replace("_", "-")
    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}", "one of: " + ", ".join(SETTINGS))
    option = OPTIONS[key]
    changes: dict[str, Any] = {option.field_name: option.parse(value)}
    return replace(sampling, **changes)


def settings_of(sampling: SamplingParams) -> dict[str, Any]:
    """The settings /set changes, by their names: for /set alone, and for a saved chat."""
    return {key: getattr(sampling, OPTIONS[key].field_name) for key in SETTINGS}

"""The chat's slash commands: names, what they take, one line of help each, and the
settings ``/set`` changes; how a command line is split into words.

Imports nothing heavy: ``llava chat --help`` lists them, the line editor completes them, and
``commands/chat.py`` runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .options import SamplingParams

COMMANDS: dict[str, str] = {
    "/image": "PATH... attach images to the next message",
    "/images": "the images and their token cost; '/images clear' detaches those not sent yet",
    "/clear": "start a new conversation (same model)",
    "/system": "TEXT set the system prompt; '/system' shows it, '/system -' resets it",
    "/retry": "answer the last message again",
    "/undo": "drop the last message and its answer",
    "/save": "FILE save the chat (.json for programs, else Markdown)",
    "/load": "FILE resume a saved chat",
    "/set": "KEY VALUE temperature, top-p, top-k, min-p, repeat-penalty, max-tokens, seed",
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
    """The table as aligned lines, then the keys: for ``/help`` and ``llava chat --help``."""
    width = max(len(name) for name in COMMANDS)
    return [f"{name:<{width}}  {text}" for name, text in COMMANDS.items()] + [KEYS]


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


# The settings /set changes: their names are the command-line options', their ranges
# options.LIMITS.
SETTINGS = ("temperature", "top-p", "top-k", "min-p", "repeat-penalty", "max-tokens", "seed")


def with_setting(sampling: SamplingParams, key: str, value: str) -> SamplingParams:
    """``sampling`` with one setting changed, as ``/set KEY VALUE`` (and a saved chat) names
    it; checked against its range."""
    from dataclasses import replace

    from .options import parse_number

    key = key.lower().replace("_", "-")
    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}", "one of: " + ", ".join(SETTINGS))
    field_name = key.replace("-", "_")
    if key in ("max-tokens", "seed") and value.lower() in ("none", "random", "default"):
        unset: dict[str, Any] = {field_name: None}
        return replace(sampling, **unset)
    changes: dict[str, Any] = {field_name: parse_number(key, value)}
    return replace(sampling, **changes)


def settings_of(sampling: SamplingParams) -> dict[str, Any]:
    """The settings /set changes, by their names: for /set alone, and for a saved chat."""
    return {key: getattr(sampling, key.replace("-", "_")) for key in SETTINGS}

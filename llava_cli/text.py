"""Text from files and the network, made safe to print.

File names, GGUF metadata, registry entries and server replies can hold control characters
(terminal escape sequences, newlines that forge a second line) and bidirectional controls that
make text read otherwise than it is ("Trojan Source"). Such characters are refused where names
are read (``registry``, ``hub``) and escaped wherever text is printed (``render``).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from os import PathLike

# Controls (Cc), format characters (Cf: the bidi embeddings, overrides, isolates and marks,
# zero-width characters), line and paragraph separators, and lone surrogates.
UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


def unsafe_character(text: str) -> str | None:
    """The first control, bidi or other invisible character in ``text``, described by its code
    point (``U+202E (RIGHT-TO-LEFT OVERRIDE)``); None when the text is plain."""
    for char in text:
        if unicodedata.category(char) in UNSAFE_CATEGORIES:
            name = unicodedata.name(char, "") or "control character"
            return f"U+{ord(char):04X} ({name})"
    return None


# A Hugging Face access token, wherever it came from (HF_TOKEN, or the token file that
# huggingface_hub reads): "hf_" and 34 letters and digits today, a word of its own. A name like
# "hf_vision_model" is none.
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
REDACTED = "<hidden>"


def redacted(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with each of ``secrets``, and anything shaped like a hub token, blotted out:
    a server may echo a request's Authorization header in its error text."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return _HUB_TOKEN.sub(REDACTED, text)


def escaped(text: str, keep: str = "") -> str:
    """``text`` with each unsafe character (but those in ``keep``, say line breaks) written as
    ``<U+XXXX>``: safe to print."""
    if text.isascii() and text.isprintable():  # the common case, without a loop in Python
        return text
    return "".join(
        f"<U+{ord(c):04X}>" if c not in keep and unicodedata.category(c) in UNSAFE_CATEGORIES else c
        for c in text
    )


# What an answer shown on a terminal loses: controls (but tab and line feed), including the
# C1 range (U+009B opens an escape sequence too), and the bidi embeddings, overrides and
# isolates. Joiners and marks stay: emoji and scripts need them.
TERMINAL_DROPS = {
    **dict.fromkeys(c for c in range(0x20) if chr(c) not in "\t\n"),
    **dict.fromkeys(range(0x7F, 0xA0)),
    **dict.fromkeys(range(0x202A, 0x202F)),
    **dict.fromkeys(range(0x2066, 0x206A)),
}


def json_escaped(document: str) -> str:
    """A JSON document with every unsafe character written as a ``\\uXXXX`` escape: the same
    data for a program, and nothing that acts on a terminal (``json.dumps`` escapes only
    C0 controls). Beyond the layout's own whitespace, unsafe characters occur only inside
    JSON strings, where escapes are valid."""
    import json

    return "".join(
        json.dumps(c)[1:-1]
        if c not in "\n\t\r " and unicodedata.category(c) in UNSAFE_CATEGORIES
        else c
        for c in document
    )


def cell_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: two for wide (East Asian) characters, none for
    combining marks and other zero-width ones."""
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def cut_to_width(text: str, width: int, ellipsis: str = "…") -> str:
    """``text`` in at most ``width`` columns: cut, and the cut marked with ``ellipsis``."""
    if cell_width(text) <= width:
        return text
    room = width - cell_width(ellipsis)
    if room <= 0:
        return ellipsis[: max(width, 0)]
    kept, used = [], 0
    for char in text:
        used += _char_width(char)
        if used > room:
            break
        kept.append(char)
    return "".join(kept) + ellipsis


def display_path(path: str | PathLike[str]) -> str:
    """A path as people write it: the home directory as ``~`` (``~/.cache/llava/x.gguf``)."""
    text = os.fspath(path)
    home = os.path.expanduser("~")
    if home in ("", "/", "~") or not os.path.isabs(text):
        return text
    home = home.rstrip("/")
    if text == home:
        return "~"
    if text.startswith(home + "/"):
        return "~" + text[len(home) :]
    return text

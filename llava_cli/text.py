"""Text from files and the network, made safe to print.

File names, GGUF metadata, registry entries and server replies can hold control characters
(terminal escape sequences, newlines that forge a second line) and bidirectional controls that
make text read otherwise than it is ("Trojan Source"). Such characters are refused where names
are read (``registry``, ``hub``) and escaped wherever text is printed (``render``).
"""

from __future__ import annotations

import unicodedata

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


def escaped(text: str) -> str:
    """``text`` with each unsafe character written as ``<U+XXXX>``: safe to print."""
    if text.isascii() and text.isprintable():  # the common case, without a loop in Python
        return text
    return "".join(
        f"<U+{ord(c):04X}>" if unicodedata.category(c) in UNSAFE_CATEGORIES else c for c in text
    )

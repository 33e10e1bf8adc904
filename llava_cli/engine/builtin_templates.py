"""llama.cpp's built-in chat formats (``llama_chat_builtin_templates``), rendered by llama.cpp.

No model is needed: ``llama_chat_apply_template`` takes the format's name. It also accepts
a whole Jinja source and guesses a built-in format from it, which :func:`detect` uses to name
the format llama.cpp would read a template as.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache

import llama_cpp


@cache
def names() -> tuple[str, ...]:
    """Every built-in format name, in llama.cpp's order."""
    n = int(llama_cpp.llama_chat_builtin_templates(None, 0))
    out = (ctypes.c_char_p * max(n, 1))()
    n = int(llama_cpp.llama_chat_builtin_templates(out, n))
    return tuple((out[i] or b"").decode() for i in range(n) if out[i])


def apply(template: str, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` as (role, content) rendered by llama.cpp; ValueError if it cannot."""
    raw = [(role.encode(), content.encode("utf-8", "replace")) for role, content in messages]
    chat = (llama_cpp.llama_chat_message * max(len(raw), 1))()
    for i, (role, content) in enumerate(raw):
        chat[i].role, chat[i].content = role, content
    size = 2 * sum(len(c) + len(r) for r, c in raw) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = int(
            llama_cpp.llama_chat_apply_template(
                template.encode(), chat, len(raw), add_generation_prompt, buf, size
            )
        )
        if n < 0:
            raise ValueError("llama.cpp does not support this template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n
    raise ValueError("the rendered prompt kept growing")


_DETECT_PROBE = (("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"))


def detect(source: str) -> str | None:
    """The built-in format llama.cpp reads a Jinja template as (by its own heuristics)."""
    try:
        wanted = apply(source, _DETECT_PROBE, True)
    except ValueError:
        return None
    for name in names():
        try:
            if apply(name, _DETECT_PROBE, True) == wanted:
                return name
        except ValueError:
            continue
    return None

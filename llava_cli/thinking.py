"""Split a reasoning model's streamed output into its thinking and its answer.

The thinking sits between an opening and a closing text (``<think>`` … ``</think>``, Gemma 4's
``<|channel>thought`` … ``<channel|>``). Either may arrive cut across chunks, so text that could
still become a delimiter is held back until the next chunk decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ThinkingSplitter:
    open: str
    close: str
    inside: bool = False  # the prompt already opened the block
    thinking: str = ""
    answer: str = ""
    _held: str = ""
    _seen_block: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._seen_block = self.inside

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Pieces as (is_thinking, text), in order; a delimiter itself is never returned."""
        out: list[tuple[bool, str]] = []
        buf = self._held + text
        self._held = ""
        while buf:
            tag = self.close if self.inside else self.open
            if not self.inside and (self._seen_block or self.answer.strip()):
                self._emit(out, buf)  # one block per answer, at its start
                return out
            at = buf.find(tag)
            if at >= 0 and not self.inside and buf[:at].strip():
                self._emit(out, buf)  # text before it: an answer that mentions the tag
                return out
            if at >= 0:
                self._emit(out, buf[:at])
                buf = buf[at + len(tag) :]
                self.inside = not self.inside
                self._seen_block = True
                continue
            keep = _partial_suffix(buf, tag)
            if not self.inside and not buf[: len(buf) - keep].strip() and keep:
                self._held = buf  # nothing but whitespace before what may be the opening tag
                return out
            self._emit(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            break
        return out

    def finish(self) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    def _emit(self, out: list[tuple[bool, str]], text: str) -> None:
        if self.inside:
            if not self.thinking:
                text = text.lstrip()
            self.thinking += text
        else:
            if not self.answer:
                text = text.lstrip()
            self.answer += text
        if text:
            out.append((self.inside, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0

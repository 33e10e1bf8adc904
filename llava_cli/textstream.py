"""Turn a stream of token bytes into clean answer text, incrementally.

* Multi-byte UTF-8 characters split across tokens (byte-fallback tokens) are assembled before
  anything is emitted; invalid bytes become U+FFFD instead of vanishing.
* Stop strings end the answer; text that might be the start of a stop string is held back, so
  no part of a stop string is ever emitted.
* Leading whitespace is dropped and trailing whitespace held back until more text follows, so
  the streamed text equals the final answer exactly.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # decoded, not yet emitted: a possible stop-string start
        self._started = False  # non-whitespace text has been emitted
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush what is held back (minus trailing whitespace)."""
        if not self.stopped:
            self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self._pending
        if not self._started:
            text = text.lstrip()
        cut = self._stop_at(text)
        if cut is not None:
            text, self.stopped, final = text[:cut], True, True
            self._pending = ""
        if final:
            out = text.rstrip()
            self._pending = ""
        else:
            head = text[: len(text) - self._partial_stop(text)]
            out = head.rstrip()
            self._pending = text[len(out) :]
        if out:
            self._started = True
        self.text += out
        return out

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best

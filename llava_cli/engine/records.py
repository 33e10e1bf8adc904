"""What a Session takes (``Bitmap``) and what it reports (``Completion`` with its ``Usage`` and
``Timings``, measured over a ``Turn``; the cumulative ``Counters``): plain records, no llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol


class Bitmap(Protocol):
    """An image ready for libmtmd: 8-bit RGB pixels and a key identifying their content."""

    @property
    def key(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def rgb(self) -> bytes: ...


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the whole prompt, image tokens included
    image_tokens: int  # of those, from images
    cached_tokens: int  # of those, reused from the KV cache instead of evaluated
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    load_s: float
    image_encode_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of answer or stop string), "length", or "interrupted"
    seed: int
    usage: Usage
    timings: Timings


@dataclass
class Counters:
    """Cumulative work done by a session; tests read these to prove what was (not) redone.
    ``now - before`` is the work done in between."""

    text_tokens_evaluated: int = 0
    image_tokens_evaluated: int = 0
    image_chunks_encoded: int = 0
    prefixes_restored: int = 0  # from the prefix cache, instead of encoding and prefilling

    def snapshot(self) -> Counters:
        return Counters(**vars(self))

    def __sub__(self, before: Counters) -> Counters:
        return Counters(
            **{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)}
        )


@dataclass
class Turn:
    """What evaluating one prompt took, measured as it goes; ``completion`` adds the answer."""

    started: float  # time.perf_counter() when the evaluation began
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0

    def completion(
        self,
        text: str,
        finish_reason: str,
        seed: int,
        *,
        n_generated: int,
        load_s: float,
        first_token_at: float,
        ended_at: float,
    ) -> Completion:
        decode_s = ended_at - first_token_at
        n = n_generated
        return Completion(
            text=text,
            finish_reason=finish_reason,
            seed=seed,
            usage=Usage(self.prompt_tokens, self.image_tokens, self.cached_tokens, n),
            timings=Timings(
                load_s=load_s,
                image_encode_s=self.image_encode_s,
                prefill_s=self.prefill_s,
                ttft_s=first_token_at - self.started,
                decode_s=decode_s,
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s else 0.0,
            ),
        )

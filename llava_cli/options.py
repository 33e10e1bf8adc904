"""Plain option records shared by the commands and the engine (no heavy imports here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed, reported in the result
    max_tokens: int | None = None  # None: until end of sequence or a full context
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF text the answer must match (``structured.Constraint``)


@dataclass(frozen=True)
class RuntimeOptions:
    ctx: int | None = None  # None: DEFAULT_CTX, or the model's training context if smaller
    threads: int = 0  # 0: one per available CPU
    gpu_layers: int = -1  # -1: all layers, where the build supports offload
    image_on_cpu: bool = False
    chat_format: str = "auto"  # "auto" | "gguf" | "llava"
    verbose: bool = False
    cache: bool = True  # keep and reuse image prefixes between runs (the prefix cache)


INT32_MAX = 2**31 - 1
DEFAULT_MAX_PIXELS = 100_000_000
# Measured: decoding the worst image within DEFAULT_MAX_PIXELS (10000x10000 RGBA, CMYK or
# float; the pixels alone are 400 MB as Pillow holds them) peaks at 0.69 GB over the process's
# baseline. The source bytes are let go once decoded, so they only add while the decoder runs:
# 256 MiB + 400 MB = 0.66 GB, under that peak and the 1 GB an image may cost. A 100-megapixel
# camera JPEG is 30-60 MB; noise at JPEG quality 100 is 156 MiB.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
PROMPT_MAX_BYTES = 16 << 20  # a prompt on stdin, or a chat line: far beyond any context
MAX_TOKEN_CHARS = 256  # no vocabulary has a longer token: a longer text cannot fit a context
LONG_TEXT_CHARS = 16_384  # shorter texts are tokenized whole without a second thought


@dataclass(frozen=True)
class Limit:
    """The accepted range of a numeric option: the one source for the command-line options,
    chat's ``/set`` and saved chats. Integers stay inside what llama.cpp's C types hold."""

    kind: type
    low: float
    high: float

    def allows(self, value: float) -> bool:
        return self.low <= value <= self.high  # NaN fails every comparison, so it fails here


LIMITS: dict[str, Limit] = {
    "temperature": Limit(float, 0.0, 100.0),
    "top-p": Limit(float, 0.0, 1.0),
    "top-k": Limit(int, 0, INT32_MAX),
    "min-p": Limit(float, 0.0, 1.0),
    "repeat-penalty": Limit(float, 0.0, 100.0),
    "seed": Limit(int, 0, 2**32 - 2),  # llama.cpp's seed is a uint32; 2^32-1 means "random"
    "max-tokens": Limit(int, 1, INT32_MAX),
    "ctx": Limit(int, 64, INT32_MAX),  # and at most the model's training context
    "threads": Limit(int, 0, 512),  # GGML_MAX_N_THREADS
    "gpu-layers": Limit(int, -1, INT32_MAX),
    # Decoding 100 MP (the default) peaks at 0.65 GB: 150 MP stays within the 1 GB an input
    # may cost, whatever the file (a 30000x30000 PNG took 3.7 GB at 10^9).
    "max-pixels": Limit(int, 1, 150_000_000),
    "max-image-bytes": Limit(int, 1, 1 << 32),
}


def parse_number(name: str, text: str) -> int | float:
    """``text`` as option ``name`` takes it, range-checked (``/set top-p 0.9``)."""
    from .errors import UsageError

    limit = LIMITS[name]
    try:
        value = limit.kind(text)
    except (ValueError, OverflowError):
        kind = "a whole number" if limit.kind is int else "a number"
        raise UsageError(f"{name} must be {kind}, not {text!r}") from None
    if not limit.allows(value):
        bounds = (limit.low, limit.high)
        low, high = (f"{limit.kind(n):,}" if limit.kind is int else f"{n:g}" for n in bounds)
        raise UsageError(f"{name} must be between {low} and {high}, not {text}")
    return value  # type: ignore[no-any-return]

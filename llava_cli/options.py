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


@dataclass(frozen=True)
class RuntimeOptions:
    ctx: int | None = None  # None: DEFAULT_CTX, or the model's training context if smaller
    threads: int = 0  # 0: one per available CPU
    gpu_layers: int = -1  # -1: all layers, where the build supports offload
    image_on_cpu: bool = False
    chat_format: str = "auto"  # "auto" | "gguf" | "llava"
    verbose: bool = False
    cache: bool = True  # keep and reuse image prefixes between runs (the prefix cache)

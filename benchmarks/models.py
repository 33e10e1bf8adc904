"""Realistic synthetic model pairs for ``make bench``, built once and cached outside the repo.

``full``: a TinyLlama-shaped text model (E=2048, 22 layers, FFN 5632, 32 heads / 4 KV heads,
vocab 32000) quantized to Q4_K_M, and a CLIP ViT-L/14-336 projector (576 image tokens), as in
shared/FIXTURES.md. ``quick``: the same architecture, small, for a fast run. Weights are random:
these measure speed, not answers.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.engine.model import quantize
from llava_cli.synthetic import (
    ModelPair,
    TextShape,
    VisionShape,
    Vocab,
    build_vocab,
    is_norm_weight,
    text_tensor_shapes,
    vision_tensor_shapes,
    write_mmproj,
    write_text_model,
)

CLIP_MEAN = (0.48, 0.46, 0.41)  # about OpenAI CLIP's preprocessing, as real projectors ship
CLIP_STD = (0.27, 0.26, 0.28)


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    text: TextShape
    vision: VisionShape


SHAPES = {
    "full": Shape(
        "full",
        vocab=32000,
        text=TextShape(embd=2048, layers=22, ffn=5632, heads=32, kv_heads=4, context=4096),
        vision=VisionShape(
            projection_dim=2048, image_size=336, patch=14, embd=1024, ffn=4096, heads=16,
            blocks=24, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        ),
    ),
    "quick": Shape(
        "quick",
        vocab=8000,
        text=TextShape(embd=512, layers=4, ffn=1408, heads=8, kv_heads=2, context=4096),
        vision=VisionShape(
            projection_dim=512, image_size=224, patch=14, embd=256, ffn=1024, heads=4,
            blocks=4, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        ),
    ),
}  # fmt: skip


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llava-cli" / "bench"


def build(shape: Shape) -> ModelPair:
    """The pair for this shape, built on first use (F16, then quantized to Q4_K_M)."""
    folder = cache_dir() / shape.name
    model, mmproj = folder / "text-Q4_K_M.gguf", folder / "mmproj-f16.gguf"
    if model.is_file() and mmproj.is_file():
        return ModelPair(model, mmproj)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    f16 = folder / "text-f16.gguf"
    _write_text(f16, shape)
    quantize(f16, model, "Q4_K_M")
    f16.unlink()
    _write_mmproj(mmproj, shape)
    print(f"built the {shape.name} pair in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return ModelPair(model, mmproj)


def _random(rng: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Normal weights (std 0.02; the token embedding 1.0), norms ones, biases zeros. Matrices
    are kept as F16 as soon as drawn: the full model is 2 GB in F16, twice that in F32."""
    import numpy as np

    weights: dict[str, Any] = {}
    for name, dims in shapes.items():
        if is_norm_weight(name):
            weights[name] = np.ones(dims, dtype=np.float32)
        elif name.endswith(".bias"):
            weights[name] = np.zeros(dims, dtype=np.float32)
        else:
            std = 1.0 if name == "token_embd.weight" else 0.02
            drawn = rng.standard_normal(dims, dtype=np.float32) * std
            weights[name] = drawn.astype(np.float16) if len(dims) > 1 else drawn
    return weights


def _write_text(path: Path, s: Shape) -> None:
    import gguf
    import numpy as np

    base = build_vocab()
    tokens = base.tokens + [f"\u2581w{i}" for i in range(s.vocab - len(base.tokens))]
    types = base.types + [int(gguf.TokenType.NORMAL)] * (s.vocab - len(base.types))
    weights = _random(np.random.default_rng(0), text_tensor_shapes(s.vocab, s.text))
    weights["output.weight"][:3] = 0  # never <unk>, <s>, </s>: every answer runs to max_tokens
    vocab = Vocab(tokens, types)
    write_text_model(path, vocab, weights, chat_template=None, name=f"bench-{s.name}", shape=s.text)


def _write_mmproj(path: Path, s: Shape) -> None:
    import numpy as np

    weights = _random(np.random.default_rng(1), vision_tensor_shapes(s.vision))
    write_mmproj(path, weights, shape=s.vision)

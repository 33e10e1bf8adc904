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

from llava_cli.synthetic import ModelPair, build_vocab, finish_gguf


@dataclass(frozen=True)
class Shape:
    name: str
    embd: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    v_embd: int
    v_layers: int
    v_ffn: int
    v_heads: int
    image: int
    patch: int


SHAPES = {
    "full": Shape("full", 2048, 22, 5632, 32, 4, 32000, 1024, 24, 4096, 16, 336, 14),
    "quick": Shape("quick", 512, 4, 1408, 8, 2, 8000, 256, 4, 1024, 4, 224, 14),
}


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
    _quantize(f16, model)
    f16.unlink()
    _write_mmproj(mmproj, shape)
    print(f"built the {shape.name} pair in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return ModelPair(model, mmproj)


def _normal(rng: Any, shape: tuple[int, ...], std: float) -> Any:
    import numpy as np

    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


def _write_text(path: Path, s: Shape) -> None:
    import gguf
    import numpy as np

    vocab = build_vocab()
    tokens = vocab.tokens + [f"\u2581w{i}" for i in range(s.vocab - len(vocab.tokens))]
    types = vocab.types + [int(gguf.TokenType.NORMAL)] * (s.vocab - len(vocab.types))
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"bench-{s.name}")
    w.add_context_length(4096)
    w.add_embedding_length(s.embd)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(s.embd // s.heads)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([float(len(t)) for t in tokens])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    kv = s.embd // s.heads * s.kv_heads
    ones = np.ones(s.embd, dtype=np.float32)
    embd = _normal(rng, (s.vocab, s.embd), 1.0)
    output = _normal(rng, (s.vocab, s.embd), 0.02)
    output[:3] = 0  # never <unk>, <s>, </s>: every answer runs to max_tokens
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", output)
    for i in range(s.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", _normal(rng, (s.embd, s.embd), 0.02))
        w.add_tensor(f"blk.{i}.attn_k.weight", _normal(rng, (kv, s.embd), 0.02))
        w.add_tensor(f"blk.{i}.attn_v.weight", _normal(rng, (kv, s.embd), 0.02))
        w.add_tensor(f"blk.{i}.attn_output.weight", _normal(rng, (s.embd, s.embd), 0.02))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", _normal(rng, (s.ffn, s.embd), 0.02))
        w.add_tensor(f"blk.{i}.ffn_up.weight", _normal(rng, (s.ffn, s.embd), 0.02))
        w.add_tensor(f"blk.{i}.ffn_down.weight", _normal(rng, (s.embd, s.ffn), 0.02))
    finish_gguf(w)


def _write_mmproj(path: Path, s: Shape) -> None:
    import gguf
    import numpy as np

    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", False)
    w.add_uint32("clip.vision.image_size", s.image)
    w.add_uint32("clip.vision.patch_size", s.patch)
    w.add_uint32("clip.vision.embedding_length", s.v_embd)
    w.add_uint32("clip.vision.feed_forward_length", s.v_ffn)
    w.add_uint32("clip.vision.projection_dim", s.embd)
    w.add_uint32("clip.vision.attention.head_count", s.v_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.block_count", s.v_layers)
    w.add_array("clip.vision.image_mean", [0.48, 0.46, 0.41])
    w.add_array("clip.vision.image_std", [0.27, 0.26, 0.28])
    n_pos = (s.image // s.patch) ** 2 + 1

    def bias(n: int) -> Any:
        return np.zeros(n, dtype=np.float32)

    w.add_tensor("v.patch_embd.weight", _normal(rng, (s.v_embd, 3, s.patch, s.patch), 0.02))
    w.add_tensor("v.class_embd", rng.standard_normal(s.v_embd, dtype=np.float32) * 0.02)
    w.add_tensor("v.position_embd.weight", _normal(rng, (n_pos, s.v_embd), 0.02))
    for i in range(s.v_layers):
        p = f"v.blk.{i}"
        for part, (rows, cols) in {
            "attn_q": (s.v_embd, s.v_embd),
            "attn_k": (s.v_embd, s.v_embd),
            "attn_v": (s.v_embd, s.v_embd),
            "attn_out": (s.v_embd, s.v_embd),
            "ffn_up": (s.v_ffn, s.v_embd),
            "ffn_down": (s.v_embd, s.v_ffn),
        }.items():
            w.add_tensor(f"{p}.{part}.weight", _normal(rng, (rows, cols), 0.02))
            w.add_tensor(f"{p}.{part}.bias", bias(rows))
        for norm in ("ln1", "ln2"):
            w.add_tensor(f"{p}.{norm}.weight", np.ones(s.v_embd, dtype=np.float32))
            w.add_tensor(f"{p}.{norm}.bias", bias(s.v_embd))
    w.add_tensor("mm.0.weight", _normal(rng, (s.embd, s.v_embd), 0.02))
    w.add_tensor("mm.0.bias", bias(s.embd))
    w.add_tensor("mm.2.weight", _normal(rng, (s.embd, s.embd), 0.02))
    w.add_tensor("mm.2.bias", bias(s.embd))
    finish_gguf(w)


def _quantize(source: Path, target: Path) -> None:
    import llama_cpp

    from llava_cli.engine.native import init

    init(verbose=False)  # llama.cpp's logs stay quiet

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")

"""Tiny LLaVA-shaped GGUF pairs, built in milliseconds, for the self-test and the test suite.

Two kinds:

* ``random``: seeded random weights. Meaningless but deterministic output; proves that loading,
  image encoding, prefill, decoding and streaming all run.
* ``colour oracle``: weights set by hand so that the answer depends on the image: a mostly red
  image gives ``red``, green ``green``, blue ``blue``, anything without a dominant primary
  ``none``, each followed by end-of-sequence. It proves the image really reaches the decoder.

Signal path of the oracle (dimension numbers are indices into the text embedding):

1. The CLIP preprocessor maps pixels to [-1, 1] (mean = std = 0.5).
2. The patch convolution averages each colour channel over the patch into vision dims 0..2;
   everything else in the vision tower is zero, so each patch embedding is its mean colour.
3. Projector unit c of ``mm.0`` computes ``A*(2*x_c - (x_r + x_g + x_b)) - A``: about ``+2A``
   for a pure colour c and negative otherwise, so after GELU it is a one-hot colour detector.
   ``mm.2`` copies it into text dim c and sets the constant "image" dim.
4. Text layer 0 has Q = K = 0, so attention is uniform over earlier positions; V copies the
   colour dims and O amplifies them. Every later position sees the image's average colour.
5. The output head reads: ``red``/``green``/``blue`` from dims 0/1/2, ``none`` from the "bias"
   dim that every token embedding carries. Answer words carry a large "answered" dim that the
   ``</s>`` row reads, so end-of-sequence follows the answer.

Only ``numpy`` and ``gguf`` are needed; nothing here touches llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.float32]

EMBD = 64
HEADS = 4
FFN = 128
LAYERS = 2
CONTEXT = 4096

IMAGE_SIZE = 32
PATCH = 8
V_EMBD = 32
V_HEADS = 2
V_FFN = 48  # must differ from V_EMBD: clip.cpp takes a square ffn_down for legacy naming
V_BLOCKS = 2  # the LLaVA path runs block_count - 1 layers

ANSWERS = ("red", "green", "blue", "none")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text-embedding dims used by the oracle.
_DIM_BIAS = 4  # present in every token embedding
_DIM_IMAGE = 3  # set on image embeddings by the projector bias
_DIM_ANSWERED = 5  # carried by the answer words; read by </s>


@dataclass(frozen=True)
class TextShape:
    """A llama-architecture text model's size, as written to its GGUF metadata."""

    embd: int = EMBD
    layers: int = LAYERS
    ffn: int = FFN
    heads: int = HEADS
    kv_heads: int = HEADS
    context: int = CONTEXT


@dataclass(frozen=True)
class VisionShape:
    """A CLIP ViT with a LLaVA-1.5 ``mlp`` projector: its size and image preprocessing."""

    projection_dim: int = EMBD  # the text model's embedding length
    image_size: int = IMAGE_SIZE
    patch: int = PATCH
    embd: int = V_EMBD
    ffn: int = V_FFN
    heads: int = V_HEADS
    blocks: int = V_BLOCKS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # [-1, 1], as the oracle reads it
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelPair:
    model: Path
    mmproj: Path


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]

    def index(self, piece: str) -> int:
        return self.tokens.index(piece)


def build_vocab(extra_control: tuple[str, ...] = ()) -> Vocab:
    """A SentencePiece-style vocab: controls, the 256 byte tokens, single characters, words.

    Every prefix of the answer words is a token too, so that SentencePiece's pairwise merges
    can reach the whole word: " red" tokenizes to the same single token the model generates.
    """
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>", *extra_control]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.CONTROL] * len(extra_control)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    chars = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)] + ["é", "ü", "日", "本", "語"]
    words: list[str] = []
    for word in (*ANSWERS, *("\u2581" + w for w in ANSWERS)):
        words += [word[:n] for n in range(2, len(word) + 1) if word[:n] not in words]
    tokens += chars + words
    types += [TokenType.NORMAL] * (len(chars) + len(words))
    return Vocab(tokens=tokens, types=[int(t) for t in types])


def _f16(a: Array) -> Any:
    import numpy as np

    return np.ascontiguousarray(a, dtype=np.float16)


def _f32(a: Array) -> Any:
    import numpy as np

    return np.ascontiguousarray(a, dtype=np.float32)


def write_text_model(
    path: Path,
    vocab: Vocab,
    weights: dict[str, Array],
    *,
    chat_template: str | None,
    name: str = "llava-synthetic",
    shape: TextShape = TextShape(),
) -> None:
    """Write a llama-architecture GGUF with the given tensors (numpy ``[out, in]`` shapes)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.embd)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(shape.embd // shape.heads)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores([float(len(t)) for t in vocab.tokens])  # prefer longer merges
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.index("<s>"))
    w.add_eos_token_id(vocab.index("</s>"))
    w.add_unk_token_id(vocab.index("<unk>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    _add_tensors(w, weights)
    finish_gguf(w)


def write_mmproj(
    path: Path,
    weights: dict[str, Array],
    *,
    projector_type: str | None = "mlp",
    use_gelu: bool = False,
    shape: VisionShape = VisionShape(),
) -> None:
    """Write a CLIP ViT + LLaVA-1.5 ``mlp`` projector GGUF."""
    import gguf

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    if projector_type is not None:
        w.add_string("clip.projector_type", projector_type)
    w.add_bool("clip.use_gelu", use_gelu)
    w.add_uint32("clip.vision.image_size", shape.image_size)
    w.add_uint32("clip.vision.patch_size", shape.patch)
    w.add_uint32("clip.vision.embedding_length", shape.embd)
    w.add_uint32("clip.vision.feed_forward_length", shape.ffn)
    w.add_uint32("clip.vision.projection_dim", shape.projection_dim)
    w.add_uint32("clip.vision.attention.head_count", shape.heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.block_count", shape.blocks)
    w.add_array("clip.vision.image_mean", list(shape.image_mean))
    w.add_array("clip.vision.image_std", list(shape.image_std))
    _add_tensors(w, weights)
    finish_gguf(w)


def _add_tensors(w: Any, weights: dict[str, Array]) -> None:
    """Matrices as F16, vectors (norms, biases) as F32."""
    for tensor_name, value in weights.items():
        w.add_tensor(tensor_name, _f16(value) if value.ndim > 1 else _f32(value))


def finish_gguf(w: Any) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def text_tensor_shapes(n_vocab: int, shape: TextShape = TextShape()) -> dict[str, tuple[int, ...]]:
    """Every tensor of a llama text model, in writing order, as numpy ``[out, in]`` shapes."""
    embd, ffn = shape.embd, shape.ffn
    kv = embd // shape.heads * shape.kv_heads
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab, embd),
        "output_norm.weight": (embd,),
        "output.weight": (n_vocab, embd),
    }
    for i in range(shape.layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (embd,),
            f"blk.{i}.attn_q.weight": (embd, embd),
            f"blk.{i}.attn_k.weight": (kv, embd),
            f"blk.{i}.attn_v.weight": (kv, embd),
            f"blk.{i}.attn_output.weight": (embd, embd),
            f"blk.{i}.ffn_norm.weight": (embd,),
            f"blk.{i}.ffn_gate.weight": (ffn, embd),
            f"blk.{i}.ffn_up.weight": (ffn, embd),
            f"blk.{i}.ffn_down.weight": (embd, ffn),
        }
    return shapes


def vision_tensor_shapes(
    shape: VisionShape = VisionShape(), *, embd_out: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor of the vision tower and projector, in writing order. ``embd_out`` (the
    projector's output width) defaults to the shape's projection_dim; another makes a pair
    whose widths disagree."""
    out = shape.projection_dim if embd_out is None else embd_out
    v_embd, patch = shape.embd, shape.patch
    n_pos = (shape.image_size // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (v_embd, 3, patch, patch),
        "v.class_embd": (v_embd,),
        "v.position_embd.weight": (n_pos, v_embd),
    }
    for i in range(shape.blocks):
        p = f"v.blk.{i}"
        for part, (rows, cols) in {
            "attn_q": (v_embd, v_embd),
            "attn_k": (v_embd, v_embd),
            "attn_v": (v_embd, v_embd),
            "attn_out": (v_embd, v_embd),
            "ffn_up": (shape.ffn, v_embd),
            "ffn_down": (v_embd, shape.ffn),
        }.items():
            shapes[f"{p}.{part}.weight"] = (rows, cols)
            shapes[f"{p}.{part}.bias"] = (rows,)
        for norm in ("ln1", "ln2"):
            shapes[f"{p}.{norm}.weight"] = (v_embd,)
            shapes[f"{p}.{norm}.bias"] = (v_embd,)
    shapes |= {
        "mm.0.weight": (out, v_embd),
        "mm.0.bias": (out,),
        "mm.2.weight": (out, out),
        "mm.2.bias": (out,),
    }
    return shapes


def is_norm_weight(name: str) -> bool:
    return name.endswith(("norm.weight", "ln1.weight", "ln2.weight"))


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> dict[str, Any]:
    """Normal weights; embeddings and the output head at unit scale so the output varies."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, shape in shapes.items():
        if is_norm_weight(name):
            out[name] = np.ones(shape, dtype=np.float32)
        else:
            std = 1.0 if name in ("token_embd.weight", "output.weight") else scale
            out[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return out


def build_random(
    directory: Path,
    *,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    mmproj_embd: int = EMBD,
    projector_type: str | None = "mlp",
    context: int = CONTEXT,
    layers: int = LAYERS,
) -> ModelPair:
    """A random pair. ``mmproj_embd`` != 64 or ``projector_type=None`` make a mismatched pair;
    ``context`` is the training context it claims."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(extra_control=("<|im_start|>", "<|im_end|>"))
    n_vocab = len(vocab.tokens)
    shape = TextShape(context=context, layers=layers)
    text = _random_weights(text_tensor_shapes(n_vocab, shape), seed, 0.05)
    # Every embedding carries a constant dim that the end-of-generation rows read negatively,
    # so random text runs to max_tokens instead of stopping at an arbitrary point.
    text["token_embd.weight"][:, 0] = 4.0
    for eog in ("</s>", "<|im_end|>", "<|im_start|>", "<s>", "<unk>"):
        text["output.weight"][vocab.index(eog), :] = 0.0
        text["output.weight"][vocab.index(eog), 0] = -40.0
    vision = _random_weights(vision_tensor_shapes(embd_out=mmproj_embd), seed + 1, 0.1)
    model = directory / "random-model.gguf"
    mmproj = directory / "random-mmproj.gguf"
    write_text_model(
        model,
        vocab,
        text,
        chat_template=chat_template,
        name="llava-random",
        shape=shape,
    )
    write_mmproj(mmproj, vision, projector_type=projector_type)
    return ModelPair(model, mmproj)


def build_colour_oracle(
    directory: Path, *, chat_template: str | None = None, gain: float = 4.0
) -> ModelPair:
    """The colour oracle pair; ``chat_template=None`` means the legacy LLaVA/Vicuna format."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    extra = ("<|im_start|>", "<|im_end|>") if chat_template else ()
    vocab = build_vocab(extra_control=extra)
    n_vocab = len(vocab.tokens)

    text: dict[str, Any] = {
        n: (np.ones(s, np.float32) if is_norm_weight(n) else np.zeros(s, np.float32))
        for n, s in text_tensor_shapes(n_vocab).items()
    }
    emb = text["token_embd.weight"]
    emb[:, _DIM_BIAS] = 1.0
    for word in ANSWERS:
        for piece in (word, "\u2581" + word):
            emb[vocab.index(piece), _DIM_ANSWERED] = 100.0
    # Layer 0: uniform attention (Q = K = 0); V copies the colour dims of head 0, O amplifies.
    for c in range(3):
        text["blk.0.attn_v.weight"][c, c] = 1.0
        text["blk.0.attn_output.weight"][c, c] = 32.0
    out = text["output.weight"]
    # Answer with the word-initial pieces ("\u2581red" -> " red"), as real SentencePiece models do.
    for c, word in enumerate(("red", "green", "blue")):
        out[vocab.index("\u2581" + word), c] = 10.0
    out[vocab.index("\u2581none"), _DIM_BIAS] = 10.0
    out[vocab.index("</s>"), _DIM_ANSWERED] = 20.0

    vision: dict[str, Any] = {
        n: (np.ones(s, np.float32) if is_norm_weight(n) else np.zeros(s, np.float32))
        for n, s in vision_tensor_shapes().items()
    }
    for c in range(3):
        vision["v.patch_embd.weight"][c, c, :, :] = 1.0 / (PATCH * PATCH)
        vision["mm.0.weight"][c, :3] = -gain
        vision["mm.0.weight"][c, c] = gain
        vision["mm.0.bias"][c] = -gain
        vision["mm.2.weight"][c, c] = 1.0
    vision["mm.2.bias"][_DIM_IMAGE] = 1.0

    model = directory / "oracle-model.gguf"
    mmproj = directory / "oracle-mmproj.gguf"
    write_text_model(model, vocab, text, chat_template=chat_template, name="llava-colour-oracle")
    write_mmproj(mmproj, vision)
    return ModelPair(model, mmproj)

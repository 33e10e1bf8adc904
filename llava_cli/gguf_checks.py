"""Whether llama.cpp can run a model and projector, judged from their GGUF headers.

``gguf_file.check_model`` and ``check_pair`` call in here. Besides the projector types and
widths libmtmd knows, this holds what llama.cpp and libmtmd would stop the *process* on rather
than fail with an error: some of llama.cpp's checks are ``GGML_ASSERT``s (SIGABRT, and a
backtrace), its SentencePiece tokenizer throws out of a C function (std::terminate), libmtmd
dereferences the optional projector tensors its type needs (SIGSEGV), and ggml asserts on the
vision graph's shapes, which nobody checks, while the first image is encoded. Each check
mirrors the vendored llama.cpp of llama-cpp-python 0.3.36 (the source named beside it); what
llama.cpp refuses with an error of its own is left to it.

Longer than our ~400 lines on purpose: each check mirrors one place in the vendored
llama.cpp and names it, and kept together they are the one list of what would stop the process.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from .errors import ModelFileError

if TYPE_CHECKING:
    from .gguf_file import GGUFInfo

_HINT = "the file is damaged or not made for this llama.cpp: download it again or use another GGUF"

# src/llama-hparams.h
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
# src/llama-model.cpp, LLAMA_ROPE_SCALING_TYPES: any other name fails an assert
ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})
# ggml types that cannot be a weight: no vec_dot in ggml-cpu (Q8_1 and Q8_K only ever hold
# activations), and the integer and f64 types, which no matrix product or norm takes.
_NOT_WEIGHT_TYPES = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
_F32, _F16 = 0, 1

# Projector output width, as libmtmd computes it: (tensor, ggml dim) per projector type.
_PROJECTOR_WIDTH: dict[str, tuple[str, int]] = {
    "mlp": ("mm.2.weight", 1),
    "pixtral": ("mm.2.weight", 1),
    "lightonocr": ("mm.2.weight", 1),
    "phi4": ("mm.2.weight", 1),
    "qwen2vl_merger": ("mm.2.bias", 0),
    "qwen2.5vl_merger": ("mm.2.bias", 0),
    "qwen2.5o": ("mm.2.bias", 0),  # Qwen2.5-Omni: libmtmd reads it as qwen2.5vl_merger
    "ldpv2": ("mm.model.peg.0.bias", 0),
    "resampler": ("resampler.proj.weight", 0),
    "gemma3": ("mm.input_projection.weight", 0),
    "idefics3": ("mm.model.fc.weight", 1),
    "llama4": ("mm.model.fc.weight", 1),
}
# Vision projector types known to the libmtmd built with llama-cpp-python 0.3.36.
KNOWN_PROJECTORS = frozenset(
    {
        *_PROJECTOR_WIDTH,
        "ldp",
        "adapter",
        "qwen3vl_merger",
        "ling3vl",
        "step3vl",
        "gemma3nv",
        "gemma4v",
        "gemma4uv",
        "internvl",
        "lfm2",
        "kimivl",
        "paddleocr",
        "cogvlm",
        "janus_pro",
        "dots_ocr",
        "dots3note_v",
        "deepseekocr",
        "deepseekocr2",
        "deepseek4v",
        "glm4v",
        "glm5v",
        "youtuvl",
        "yasa2",
        "kimik25",
        "nemotron_v2_vl",
        "exaone4_5",
        "hunyuanvl",
        "minicpmv4_6",
        "mimovl",
        "minimax_m3",
        "granite4_vision",
        "muse-glimmer",
    }
)


@dataclass(frozen=True)
class TokenClash:
    """Two ids with the same token text: llama.cpp's vocabulary loader aborts on it."""

    first: int
    second: int
    text: str


@dataclass(frozen=True)
class TokenFaults:
    """What llama.cpp would end the process on, found in a vocabulary's token list."""

    clash: TokenClash | None = None  # the first duplicate: the vocabulary loader asserts
    unspelled_byte: int | None = None  # a byte no token spells: SentencePiece's fallback throws


def projector_type(mmproj: GGUFInfo) -> str | None:
    # libmtmd's order: the shared key first, then the per-modality one.
    return mmproj.get_str("clip.projector_type") or mmproj.get_str("clip.vision.projector_type")


def projector_width(mmproj: GGUFInfo) -> int | None:
    """The projector's output width, where we know how libmtmd reads it."""
    where = _PROJECTOR_WIDTH.get(projector_type(mmproj) or "")
    if where is None:
        return None
    tensor = mmproj.tensors.get(where[0])
    if tensor is None or len(tensor.shape) <= where[1]:
        return None
    return tensor.shape[where[1]]


def text_width(model: GGUFInfo) -> int | None:
    return model.get_int(f"{model.architecture}.embedding_length")


def _refuse(info: GGUFInfo, role: str, what: str) -> NoReturn:
    raise ModelFileError(f"{role} {info.path} {what}", _HINT)


def _uint32(value: object) -> int | None:
    """An integer as llama.cpp's uint32_t fields hold it (an int32 -1 reads as 2^32-1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0xFFFFFFFF
    return None


# -- the text model ---------------------------------------------------------------------------


def check_text_model(model: GGUFInfo) -> None:
    """The asserts of ``llama_model_base::load_hparams`` (all architectures), the tensor types
    ggml cannot compute with, and the tokenizer's own asserts."""
    check_tokenizer(model)
    _check_tensor_types(model, "model")
    arch = model.architecture
    if not arch:
        return  # llama.cpp refuses a file without an architecture with an error
    md = model.metadata

    def number(name: str) -> int:
        return _uint32(md.get(f"{arch}.{name}")) or 0

    def bad(what: str) -> NoReturn:
        _refuse(model, "model", f"{what}: llama.cpp would abort loading it")

    layers = _uint32(md.get(f"{arch}.block_count"))
    if layers is None:
        return  # missing or not a number: llama.cpp says so itself
    if not 0 < layers <= LLAMA_MAX_LAYERS:
        bad(f"has {arch}.block_count = {layers}, outside 1 to {LLAMA_MAX_LAYERS}")
    if number("nextn_predict_layers") > layers:
        bad(f"has {arch}.nextn_predict_layers above its {layers} layers")
    if arch == "wavtokenizer-dec":
        for part in ("posnet", "convnext"):
            if number(f"{part}.block_count") > layers:
                bad(f"has {arch}.{part}.block_count above its {layers} layers")

    experts, groups = number("expert_count"), number("expert_group_count")
    used_value = md.get(f"{arch}.expert_used_count")
    if isinstance(used_value, list):  # one count per layer; another length is an error
        per_layer = [_uint32(n) for n in used_value]
        if len(per_layer) != layers or None in per_layer:
            return
        used = max((n for n in per_layer if n is not None), default=0)
    else:
        used = _uint32(used_value) or 0
    if arch in ("hunyuan_vl", "hunyuan-dense") and experts <= 1:
        experts = used = 0  # llama.cpp reads these as dense models
    if experts > LLAMA_MAX_EXPERTS:
        bad(f"has {arch}.expert_count = {experts}, more than {LLAMA_MAX_EXPERTS}")
    if used > experts:
        bad(f"uses {used} experts per token of its {arch}.expert_count = {experts}")
    if experts and not used:
        bad(f"has {experts} experts and {arch}.expert_used_count = 0")
    if (experts and groups >= experts) or (not experts and groups):
        bad(f"has {arch}.expert_group_count = {groups} for {experts} experts")
    if experts and groups > 1:
        group_used = number("expert_group_used_count")
        if experts % groups or not 0 < group_used < groups:
            bad(f"splits {experts} experts into {groups} groups, using {group_used} of them")

    scaling = md.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        known = ", ".join(sorted(ROPE_SCALING_TYPES))
        bad(f"has {arch}.rope.scaling.type {scaling[:40]!r}, not one of {known}")


_U64 = struct.Struct("<Q")


def scan_tokens(buf: bytes | mmap.mmap, pos: int, count: int) -> tuple[int, TokenFaults]:
    """The end of the ``count`` GGUF strings of a vocabulary at ``pos``, and what in them
    llama.cpp would end the process on (src/llama-vocab.cpp), reading the tokens as it does:
    bytes up to the first NUL (gguf_get_arr_str is a C string), an empty one as
    ``[EMPTY_<id>]``. Its map from text to id must be as long as the list, and SentencePiece
    spells a piece it has no token for byte by byte, as ``<0xXX>`` or the byte itself, and
    throws (std::terminate) where neither is a token. IndexError if the strings run past the
    end of ``buf``.

    A set of the tokens' bytes costs about 25 ms for 150,000 tokens on top of the walk the
    parser makes anyway; only when it finds a duplicate, an empty token or a NUL does a
    slower pass look for which ids clash."""
    end, unpack = len(buf), _U64.unpack_from
    tokens: list[bytes] = []
    keep = tokens.append
    try:
        for _ in range(count):  # the one loop per token: kept tight
            (n,) = unpack(buf, pos)  # struct.error past the end
            pos += 8
            if n > end - pos:
                raise struct.error
            keep(buf[pos : pos + n])
            pos += n
    except struct.error:
        raise IndexError("the strings run past the end") from None
    texts = set(tokens)
    clash = None
    if len(texts) != count or b"" in texts or b"\0" in b"".join(tokens):
        first: dict[bytes, int] = {}
        for index, raw in enumerate(tokens):
            text = raw.partition(b"\0")[0] or f"[EMPTY_{index}]".encode()
            if text in first and clash is None:
                clash = TokenClash(first[text], index, text.decode("utf-8", errors="replace"))
            first.setdefault(text, index)
        texts = set(first)
    unspelled = next((b for b in range(256) if not _spells(texts, b)), None)
    return pos, TokenFaults(clash, unspelled)


def _spells(texts: set[bytes], byte: int) -> bool:
    """llama_vocab::byte_to_token for SentencePiece: ``<0xXX>``, else the byte as a string
    (a C string: the NUL byte has no such fallback)."""
    return f"<0x{byte:02X}>".encode() in texts or (byte != 0 and bytes((byte,)) in texts)


def check_tokenizer(model: GGUFInfo) -> None:
    """The asserts llama.cpp's vocabulary loader can fail (src/llama-vocab.cpp), which a
    tokenizer-only (``vocab_only``) load reaches too."""
    tokenizer = model.get_str("tokenizer.ggml.model")
    if tokenizer is None or tokenizer in ("no_vocab", "none"):
        return  # no tokenizer name is an error of llama.cpp's; without a vocab, no list read
    faults = model.token_faults or TokenFaults()
    clash = faults.clash
    if clash is not None:
        # token_to_id is a map of the token texts: it must be as long as the list
        raise ModelFileError(
            f"model {model.path} lists the token {clash.text[:40]!r} twice (ids {clash.first} "
            f"and {clash.second}): llama.cpp aborts on a vocabulary with duplicate tokens",
            _HINT,
        )
    if tokenizer == "llama" and faults.unspelled_byte is not None:
        byte = faults.unspelled_byte
        raise ModelFileError(
            f"model {model.path} has no token for the byte 0x{byte:02X} (<0x{byte:02X}>): "
            "llama.cpp's SentencePiece tokenizer ends the process on text that needs it",
            _HINT,
        )
    _check_special_tokens(model, tokenizer)
    if tokenizer == "bert" and model.byte_tokens:
        # token_to_piece reads a byte token's text through token_to_byte, which aborts for WPM
        raise ModelFileError(
            f"model {model.path} marks byte tokens in a BERT (WordPiece) vocabulary: llama.cpp "
            "aborts on them",
            _HINT,
        )


# llama_vocab::impl::load: the tokenizer type of each tokenizer.ggml.model, its default BOS,
# EOS and SEP ids and whether it adds them; the BPE pre-tokenizers that add BOS or drop it.
_TOKENIZER_KINDS = {
    "llama": "spm", "bert": "wpm", "gpt2": "bpe", "hybriddna": "bpe", "whitespace": "bpe",
    "gemma4": "bpe", "t5": "ugm",
}  # fmt: skip
_DEFAULT_SPECIAL = {"spm": (1, 2, None), "wpm": (101, None, 102), "bpe": (11, 11, None),
                    "ugm": (None, 1, None)}  # fmt: skip
_DEFAULT_ADDS = {"spm": (True, False, False), "wpm": (True, False, True),
                 "bpe": (False, False, False), "ugm": (False, True, False)}  # fmt: skip
_BPE_PRE_ADDING_BOS = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano", "tekken", "chameleon"}
)  # fmt: skip
_BPE_PRE_WITHOUT_BOS = frozenset({"chatglm-bpe", "glm4", "glm5"})


def _check_special_tokens(model: GGUFInfo, tokenizer: str) -> None:
    """Tokenizing with special tokens asserts that the BOS, EOS or SEP it adds exists: an id
    out of the vocabulary, from the file or the tokenizer's default, leaves it unset."""
    kind = _TOKENIZER_KINDS.get(tokenizer)
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    count = len(tokens) if isinstance(tokens, list) else int(getattr(tokens, "length", 0))
    if kind is None or not count:
        return
    pre = model.get_str("tokenizer.ggml.pre") or ""
    ids: list[int | None] = list(_DEFAULT_SPECIAL[kind])
    adds = list(_DEFAULT_ADDS[kind])
    if tokenizer == "gemma4":
        ids = [None, None, None]
    if kind == "bpe":
        adds[0] = pre in _BPE_PRE_ADDING_BOS
        if pre in _BPE_PRE_WITHOUT_BOS:
            ids[0] = None
    names = ("bos", "eos", "sep")
    for i, key in enumerate(("bos_token_id", "eos_token_id", "seperator_token_id")):
        default = ids[i]
        if default is not None and default >= count:
            ids[i] = None
        value = _uint32(model.metadata.get(f"tokenizer.ggml.{key}"))
        if value is not None and value < count:
            ids[i] = value
        flag = model.metadata.get(f"tokenizer.ggml.add_{names[i]}_token")
        if isinstance(flag, bool):
            adds[i] = flag
    if tokenizer == "gemma4":
        adds[0] = True  # llama.cpp's workaround for Gemma 4 files without add_bos_token
    if kind == "wpm":
        adds = [True, False, True]  # WordPiece adds CLS and SEP whatever the flags say
    for name, added, token in zip(names, adds, ids, strict=True):
        if added and token is None:
            raise ModelFileError(
                f"model {model.path} adds a {name.upper()} token to every prompt but has no "
                f"{name.upper()} among its {count} tokens: llama.cpp aborts tokenizing",
                _HINT,
            )


def _check_tensor_types(info: GGUFInfo, role: str) -> None:
    for tensor in info.tensors.values():
        if tensor.ggml_type in _NOT_WEIGHT_TYPES:
            _refuse(
                info, role,
                f"stores tensor {tensor.name!r} as {_NOT_WEIGHT_TYPES[tensor.ggml_type]}, a type "
                "ggml cannot compute with: it would crash",
            )  # fmt: skip
        if len(tensor.shape) == 1 and tensor.ggml_type != _F32:
            # norms, biases and embeddings added to f32 activations: ggml-cpu's binary ops
            # take no other type for them and abort (src/ggml-cpu/binary-ops.cpp)
            _refuse(
                info, role,
                f"stores the vector {tensor.name!r} as ggml type {tensor.ggml_type}, not f32: "
                "ggml would abort on it",
            )  # fmt: skip


# -- the projector ----------------------------------------------------------------------------

_PATCH, _PATCH_1 = "v.patch_embd.weight", "v.patch_embd.weight.1"
_POSITION, _CLASS = "v.position_embd.weight", "v.class_embd"
# Projector types and the input tensors their graph uses without checking (tools/mtmd/models):
# every ViT but Gemma 3n's MobileNet and DeepSeek-OCR's SAM convolves v.patch_embd.weight, the
# temporal-merge graphs a second one, and these read learned position embeddings.
_NO_PATCH_EMBD = frozenset({"gemma3nv", "deepseekocr", "deepseekocr2"})
_SECOND_PATCH_EMBD = frozenset(
    {"qwen2vl_merger", "qwen2.5vl_merger", "qwen2.5o", "qwen3vl_merger", "ling3vl", "mimovl",
     "minimax_m3"}
)  # fmt: skip
_POSITION_EMBD = frozenset(
    {"mlp", "ldp", "ldpv2", "adapter", "cogvlm", "internvl", "nemotron_v2_vl", "llama4",
     "qwen3vl_merger", "step3vl", "granite4_vision", "resampler", "kimivl", "paddleocr",
     "kimik25", "ling3vl", "muse-glimmer", "gemma4v", "gemma4uv"}
)  # fmt: skip
_LLAVA_GRAPH = frozenset({"mlp", "ldp", "ldpv2", "adapter"})  # models/llava.cpp


def _missing(mmproj: GGUFInfo, name: str, ptype: str) -> NoReturn:
    what = f"has no tensor {name!r}, which its {ptype!r} projector needs"
    _refuse(mmproj, "mmproj", f"{what}: libmtmd would crash on it")


def check_projector(mmproj: GGUFInfo, ptype: str) -> None:
    """What libmtmd dereferences or asserts for a vision projector of type ``ptype``."""
    _check_tensor_types(mmproj, "mmproj")
    if mmproj.metadata.get("clip.has_vision_encoder") is not True:
        return  # libmtmd loads no vision encoder; Engine.load says the projector has none
    md, tensors = mmproj.metadata, mmproj.tensors

    def bad(what: str) -> NoReturn:
        _refuse(mmproj, "mmproj", f"{what}: libmtmd would crash on it")

    def missing(name: str) -> NoReturn:
        _missing(mmproj, name, ptype)

    embd = _uint32(md.get("clip.vision.embedding_length")) or 0
    heads = _uint32(md.get("clip.vision.attention.head_count")) or 0
    head_dim = _uint32(md.get("clip.vision.attention.head_dim")) or 0
    layers = _uint32(md.get("clip.vision.block_count")) or 0
    if heads == 0 or (head_dim == 0 and embd % heads):
        bad(f"splits a vision width of {embd} into {heads} attention heads")
    standard_layers = ptype != "gemma3nv"
    if standard_layers and layers > len(tensors):
        bad(f"claims {layers} vision layers and holds {len(tensors)} tensors")
    for il in range(layers if standard_layers else 0):
        prefix = f"v.blk.{il}"
        # build_vit takes a fused qkv or the three projections; the LLaVA graph only the three
        if ptype not in _LLAVA_GRAPH and f"{prefix}.attn_qkv.weight" in tensors:
            continue
        for part in ("attn_q", "attn_k", "attn_v"):
            if f"{prefix}.{part}.weight" not in tensors:
                missing(f"{prefix}.{part}.weight")
    if ptype not in _NO_PATCH_EMBD and _PATCH not in tensors:
        missing(_PATCH)
    if ptype in _SECOND_PATCH_EMBD and _PATCH_1 not in tensors:
        missing(_PATCH_1)
    if ptype in _POSITION_EMBD and _POSITION not in tensors:
        missing(_POSITION)
    if ptype == "mlp":
        _check_llava_graph(mmproj, embd, heads, head_dim or embd // heads, layers)


Shape = tuple[int, int, int, int]  # ggml's ne: ne[0] is the row


class _Graph:
    """ggml's shape rules (src/ggml.c) for the ops of the LLaVA graph; each refuses the file
    with what ggml would assert on while the first image is encoded."""

    def __init__(self, mmproj: GGUFInfo) -> None:
        self.mmproj = mmproj

    def fail(self, what: str) -> NoReturn:
        _refuse(self.mmproj, "mmproj", f"{what}: ggml would abort encoding an image")

    def tensor(self, name: str) -> Shape:
        info = self.mmproj.tensors.get(name)
        if info is None:  # a null tensor: libmtmd dereferences it
            _missing(self.mmproj, name, "mlp")
        if 0 in info.shape:
            self.fail(f"has an empty tensor {name!r} {info.shape}")
        return (*info.shape, 1, 1, 1, 1)[:4]  # type: ignore[return-value]

    def mul_mat(self, name: str, x: Shape) -> Shape:
        w = self.tensor(name)
        if w[0] != x[0] or x[2] % w[2] or x[3] % w[3]:  # ggml_can_mul_mat
            self.fail(f"multiplies {name!r} {_dims(w)} with activations {_dims(x)}")
        return (w[1], x[1], x[2], x[3])

    def add(self, x: Shape, y: Shape, where: str) -> Shape:
        """ggml_add(x, y) of two activations: y repeats over x (ggml_can_repeat)."""
        if any(a % b for a, b in zip(x, y, strict=True)):
            self.fail(f"adds activations {_dims(y)} to {_dims(x)} in {where}")
        return x

    def apply(self, name: str, x: Shape, *, required: bool = False) -> None:
        """ggml_mul or ggml_add of ``x`` and tensor ``name`` (a norm or bias), where the file
        has it: repeated over ``x``, and f32, the only type ggml-cpu's binary ops take."""
        if name not in self.mmproj.tensors and not required:
            return
        b = self.tensor(name)
        if any(a % c for a, c in zip(x, b, strict=True)):
            self.fail(f"applies {name!r} {_dims(b)} to activations {_dims(x)}")
        if self.mmproj.tensors[name].ggml_type != _F32:
            self.fail(
                f"stores {name!r} as ggml type {self.mmproj.tensors[name].ggml_type}, not f32"
            )

    def norm(self, prefix: str, x: Shape) -> None:
        self.apply(f"{prefix}.weight", x)
        self.apply(f"{prefix}.bias", x)


def _dims(shape: tuple[int, ...]) -> str:
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return "x".join(map(str, shape))


def _ints(value: object) -> list[int]:
    return [n for n in value if isinstance(n, int)] if isinstance(value, list) else []


def _c_div(a: int, b: int) -> int:
    """C's integer division, which truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _check_llava_graph(mmproj: GGUFInfo, embd: int, heads: int, head_dim: int, layers: int) -> None:
    """Walk the shapes of clip_graph_llava::build (tools/mtmd/models/llava.cpp) for an
    ``mlp`` projector, as ggml would when the first image is encoded."""
    g, md, tensors = _Graph(mmproj), mmproj.metadata, mmproj.tensors
    image = _uint32(md.get("clip.vision.image_size")) or 0
    patch = _uint32(md.get("clip.vision.patch_size")) or 0
    if patch == 0 or image < patch:
        g.fail(f"has {image}-pixel images in {patch}-pixel patches")
    patches = (image // patch) ** 2
    # build_inp: a stride-`patch` convolution (im2col) of the 3-channel image into patches
    kernel = g.tensor(_PATCH)
    if tensors[_PATCH].ggml_type not in (_F32, _F16):
        g.fail(f"stores {_PATCH!r} as ggml type {tensors[_PATCH].ggml_type}; im2col takes f32 "
               "or f16")  # fmt: skip
    out_w = _c_div(image - kernel[0], patch) + 1
    out_h = _c_div(image - kernel[1], patch) + 1
    if kernel[2] != 3 or out_w <= 0 or out_h <= 0 or out_w * out_h * kernel[3] != patches * embd:
        g.fail(f"has a patch kernel {_dims(kernel)} that does not make {patches} patches of "
               f"width {embd} from {image}x{image} images")  # fmt: skip
    x: Shape = (embd, patches, 1, 1)
    g.apply("v.patch_embd.bias", x)
    positions = patches
    if _CLASS in tensors:  # ggml_concat of the patches and the class embedding
        cls = g.tensor(_CLASS)
        if cls != (embd, 1, 1, 1) or tensors[_CLASS].ggml_type != _F32:
            g.fail(f"has a class embedding {_dims(cls)} for patches of width {embd}")
        positions += 1
        x = (embd, positions, 1, 1)
    pos = g.tensor(_POSITION)  # ggml_get_rows: one row per position, added to the patches
    if pos[2:] != (1, 1) or pos[1] < positions or embd % pos[0]:
        g.fail(f"has position embeddings {_dims(pos)} for {positions} positions of width {embd}")
    g.norm("v.pre_ln", x)

    feature_layers = _ints(md.get("clip.vision.feature_layer"))
    deepest = max(feature_layers, default=-1)
    run = deepest if deepest >= 0 else layers - 1  # the LLaVA graph skips the last layer
    stack: list[Shape] = []
    for il in range(run):
        if il in feature_layers:
            stack.append(x)
        p = f"v.blk.{il}"
        g.norm(f"{p}.ln1", x)
        for part in ("attn_q", "attn_k", "attn_v"):
            y = g.mul_mat(f"{p}.{part}.weight", x)
            g.apply(f"{p}.{part}.bias", y)
            if y[0] * y[1] * y[2] * y[3] != head_dim * heads * positions:  # ggml_reshape_3d
                g.fail(f"has {p}.{part}.weight with {y[0]} outputs for {heads} heads of "
                       f"{head_dim}")  # fmt: skip
        y = g.mul_mat(f"{p}.attn_out.weight", (head_dim * heads, positions, 1, 1))
        g.apply(f"{p}.attn_out.bias", y)
        x = g.add(y, x, f"layer {il}'s attention")
        g.norm(f"{p}.ln2", x)
        up, down = f"{p}.ffn_up", f"{p}.ffn_down"
        if g.tensor(f"{down}.weight")[0] == embd:  # legacy naming: clip.cpp swaps the two
            up, down = down, up
        hidden = g.mul_mat(f"{up}.weight", x)
        g.apply(f"{up}.bias", hidden)
        if f"{p}.ffn_gate.weight" in tensors:  # the gated activations take equal shapes
            gate = g.mul_mat(f"{p}.ffn_gate.weight", x)
            g.apply(f"{p}.ffn_gate.bias", gate)
            if gate != hidden:
                g.fail(f"has {p}.ffn_gate.weight {_dims(gate)} beside an up projection to "
                       f"{_dims(hidden)}")  # fmt: skip
        y = g.mul_mat(f"{down}.weight", hidden)
        g.apply(f"{down}.bias", y)
        x = g.add(x, y, f"layer {il}'s feed-forward")
    g.norm("v.post_ln", x)
    if run in feature_layers:
        stack.append(x)
    if stack:  # ggml_concat of the feature layers along the width
        if any(s[1:] != x[1:] for s in stack):
            g.fail("stacks feature layers of different shapes")
        x = (sum(s[0] for s in stack), x[1], x[2], x[3])

    x = (x[0], patches, 1, 1)  # ggml_get_rows of the patch rows, then the projector
    x = g.mul_mat("mm.0.weight", x)
    g.apply("mm.0.bias", x, required=True)
    if "mm.3.weight" in tensors:  # libmtmd's MLP_NORM (Yi-VL): two normed layers
        for name in ("mm.1.weight", "mm.1.bias"):
            g.apply(name, x, required=True)
        x = g.mul_mat("mm.3.weight", x)
        for name in ("mm.3.bias", "mm.4.weight", "mm.4.bias"):
            g.apply(name, x, required=True)
        width = g.tensor("mm.3.bias")[0]
    else:
        x = g.mul_mat("mm.2.weight", x)
        g.apply("mm.2.bias", x, required=True)
        width = g.tensor("mm.2.weight")[1]
    if x[0] != width:  # libmtmd copies n_patches rows of this width out of the graph
        g.fail(f"projects to width {x[0]}, and libmtmd reads rows of {width}")

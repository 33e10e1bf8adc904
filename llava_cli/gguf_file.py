"""Read a GGUF file's header without loading it, and check that a model and projector fit.

llama.cpp answers a truncated file or a mismatched projector with a bare "failed to load";
reading the header first lets us say which file is wrong and why. The parser walks only the
header (metadata and tensor table) through ``mmap``, so it is cheap even for multi-GB files.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError

_MAGIC = b"GGUF"
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_MAX = 64
# ggml type -> (elements per block, bytes per block); gguf.constants has it, but importing
# the gguf package costs half a second.
_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip  # longer arrays (vocabularies) are summarised, not decoded

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
class ArraySummary:
    """A long metadata array, kept as its element type and length only."""

    element_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the innermost (row) dimension
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    data_offset: int
    data_end: int  # where the last tensor's data ends, as the header describes it
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get_int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def get_str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> object:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return int(value)

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        self.pos += n

    def value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.u32()
            count = self.u64()
            if count <= _KEEP_ARRAY_MAX:
                return [self.value(etype) for _ in range(count)]
            if etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            elif etype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[etype]) * count
            else:
                raise ValueError(f"unsupported array element type {etype}")
            return ArraySummary(etype, count)
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise ValueError(f"unknown metadata value type {vtype}")


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    if ggml_type not in _TYPE_SIZES:
        return 0  # a type newer than this table: skip its part of the truncation check
    block, size = _TYPE_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def read_gguf(path: Path, role: str = "model") -> GGUFInfo:
    """Parse ``path``'s header. ``role`` ("model", "mmproj") names the file in errors."""
    what = f"{role} file {path}"
    if not path.exists():
        raise ModelFileError(f"{what} does not exist", _missing_hint(role))
    if path.is_dir():
        raise ModelFileError(f"{what} is a directory, not a GGUF file", _missing_hint(role))
    try:
        size = path.stat().st_size
        if size == 0:
            raise ModelFileError(f"{what} is empty", "download it again")
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _MAGIC:
                raise ModelFileError(
                    f"{what} is not a GGUF file", f"give the {role} in GGUF format (*.gguf)"
                )
            return _parse(path, _Reader(buf), size)
    except (struct.error, ValueError, KeyError, IndexError) as exc:
        raise ModelFileError(
            f"{what} is truncated or corrupt ({exc})", "download it again"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {what}: {exc.strerror or exc}") from None


def _missing_hint(role: str) -> str:
    if role == "mmproj":
        return "pass the projector that belongs to the model with --mmproj PATH (mmproj-*.gguf)"
    return "pass an existing GGUF file with --model PATH"


def _parse(path: Path, r: _Reader, size: int) -> GGUFInfo:
    r.pos = 4
    version = r.u32()
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors = r.u64()
    n_kv = r.u64()
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.u32())
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        shape = tuple(r.u64() for _ in range(n_dims))
        ggml_type = r.u32()
        offset = r.u64()
        tensors[name] = TensorInfo(name, shape, ggml_type, offset)
        data_end = max(data_end, offset + _tensor_nbytes(ggml_type, shape))
    align = metadata.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 else 32
    data_offset = (r.pos + align - 1) // align * align
    info = GGUFInfo(path, metadata, tensors, data_offset, data_offset + data_end, size)
    if info.data_end > size:
        raise ValueError(f"{size} bytes on disk, the header describes {info.data_end}")
    return info


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


def check_pair(model: GGUFInfo, mmproj: GGUFInfo) -> None:
    """Fail with a clear error when ``mmproj`` cannot serve ``model``."""
    names = f"model {model.path.name} and mmproj {mmproj.path.name}"
    if model.architecture == "clip":
        raise ModelFileError(
            f"{model.path} is a projector (mmproj), not a text model",
            "swap --model and --mmproj",
        )
    if mmproj.architecture != "clip":
        raise ModelFileError(
            f"mmproj {mmproj.path} is not a CLIP projector "
            f"(architecture {mmproj.architecture or 'missing'})",
            "pass the mmproj-*.gguf file that belongs to the model with --mmproj",
        )
    ptype = projector_type(mmproj)
    if ptype is None:
        raise ModelFileError(
            f"mmproj {mmproj.path} has no clip.projector_type "
            "(a 2023-era LLaVA projector that current llama.cpp cannot load)",
            "use an mmproj converted by a recent llama.cpp",
        )
    if ptype not in KNOWN_PROJECTORS:
        raise ModelFileError(
            f"mmproj {mmproj.path} has projector type {ptype!r}, unknown to this llama.cpp",
            "upgrade llama-cpp-python or use a supported model",
        )
    want, have = text_width(model), projector_width(mmproj)
    if want is not None and have is not None and want != have:
        raise ModelFileError(
            f"{names} do not fit: the projector outputs width {have}, "
            f"the model's embeddings are {want} wide",
            "use the mmproj published with this model",
        )

"""Read a GGUF file's header without loading it, and check that a model and projector fit.

llama.cpp answers a truncated file or a mismatched projector with a bare "failed to load";
reading the header first lets us say which file is wrong and why. The parser walks only the
header (metadata and tensor table) through ``mmap``, so it is cheap even for multi-GB files.

Longer than our ~400 lines on purpose: one bounded reader of the header format, used by the
parser and by the model/projector checks alike; split, the offsets and limits would live twice.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError
from .files import kind_of
from .gguf_checks import (
    KNOWN_PROJECTORS,
    TokenFaults,
    check_projector,
    check_text_model,
    projector_type,
    projector_width,
    scan_tokens,
    text_width,
)

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
_KEEP_ARRAY_MAX = 64  # longer arrays (vocabularies) are summarised, not decoded
_KEEP_NUMBERS_MAX = 512  # but numbers are kept up to LLAMA_MAX_LAYERS: per-layer hparams
_TOKENS_KEY, _TOKEN_TYPES_KEY = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
_I32, _TOKEN_TYPE_BYTE = 5, 6  # GGUF's int32; llama_token_type's LLAMA_TOKEN_TYPE_BYTE
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# Limits. llama.cpp's own reader (ggml/src/gguf.cpp) takes strings and arrays of up to 2^30
# bytes or elements, tensors of at most GGML_MAX_DIMS dimensions with names shorter than
# GGML_MAX_NAME, and no arrays of arrays (an array's element type may not be an array): so
# metadata nests one level deep at most. Every count is checked against the bytes left in the
# file before anything is allocated or walked. The walks that cost time per element are bounded
# far above any real model (vocabularies hold ~10^5 strings, tensor tables ~10^3 entries), so a
# hostile header fails within a second.
_MAX_STRING = 1 << 30  # GGUF_MAX_STRING_LENGTH
_MAX_ARRAY = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME: a tensor name is shorter
_INT64_MAX = (1 << 63) - 1  # llama.cpp reads dimensions as int64
_MAX_KV = 1 << 16
_MAX_TENSORS = 1 << 18
_MAX_STRINGS_WALKED = 1 << 23  # strings in long metadata arrays, all arrays of a file together
_MAX_TOKENS = 1 << 21  # a vocabulary goes into a set to find duplicates: ~150 MB at most
_KEEP_STRING_MAX = 4 << 20  # a longer metadata string is summarised, not decoded
_KEEP_TEXT_BUDGET = 64 << 20  # text decoded from one header (keys, strings), in bytes
# The fewest bytes one metadata entry (key length, a 1-byte key, type, a 1-byte value) and one
# tensor entry (name length, a 1-byte name, n_dims, type, offset) can take.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8
# ggml type -> (elements per block, bytes per block); gguf.constants has it, but importing
# the gguf package costs half a second.
_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17), 40: (64, 36), 41: (128, 18), 42: (64, 18),
}  # fmt: skip  # 4, 5, 31-33 and 36-38 were removed from ggml: llama.cpp refuses them


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array, kept as its element type and length only."""

    element_type: int
    length: int


@dataclass(frozen=True)
class LongString:
    """A metadata string too long to keep (no real model's metadata has one), as its length."""

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
    token_faults: TokenFaults | None = None  # what llama.cpp's tokenizer would crash on
    byte_tokens: bool = False  # tokenizer.ggml.token_type marks some token as a byte

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def vocab_only(self) -> bool:
        """A file with metadata and no tensors: llama.cpp's tokenizer-only (vocab) GGUFs."""
        return not self.tensors

    def get_int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def get_str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


class _Corrupt(Exception):
    """What is wrong with a header; ``read_gguf`` names the file and turns it into a
    ModelFileError."""

    def __init__(self, reason: str, hint: str = "download it again") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def _shown(text: str) -> str:
    """Text from a file, safe to print: quoted with control and bidi characters escaped."""
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


class _Reader:
    """Reads a header from ``buf``; every read is checked against the bytes left first."""

    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.text_left = _KEEP_TEXT_BUDGET
        self.strings_left = _MAX_STRINGS_WALKED
        self.token_faults: TokenFaults | None = None
        self.byte_tokens = False

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> int:
        """Step over ``n`` bytes; return where they start."""
        if n > self.end - self.pos:
            raise _Corrupt(f"{what} runs past the end of the file")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return int(_U32.unpack_from(self.buf, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack_from(self.buf, self.take(8, what))[0])

    def string_length(self, what: str) -> int:
        n = self.u64(what)
        if n > _MAX_STRING:
            raise _Corrupt(f"{what} claims {n} bytes; llama.cpp reads at most {_MAX_STRING}")
        if n > self.left():
            raise _Corrupt(f"{what} claims {n} bytes, only {self.left()} are left in the file")
        return n

    def text(self, n: int, what: str) -> str:
        if n > self.text_left:
            raise _Corrupt(
                f"its metadata holds more than {_KEEP_TEXT_BUDGET >> 20} MiB of text",
                "this is not a model llava can read",
            )
        self.text_left -= n
        start = self.take(n, what)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def key(self, index: int) -> str:
        what = f"metadata key {index}"
        n = self.string_length(what)
        if n == 0:
            raise _Corrupt(f"{what} is empty")
        return self.text(n, what)

    def value(self, vtype: int, key: str) -> object:
        if vtype == _STRING:
            what = f"the value of {_shown(key)}"
            n = self.string_length(what)
            if n > _KEEP_STRING_MAX or n > self.text_left:
                self.take(n, what)
                return LongString(n)
            return self.text(n, what)
        if vtype == _ARRAY:
            return self.array(key)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            start = self.take(struct.calcsize(fmt), f"the value of {_shown(key)}")
            return struct.unpack_from(fmt, self.buf, start)[0]
        raise _Corrupt(f"metadata {_shown(key)} has unknown value type {vtype}")

    def array(self, key: str) -> object:
        """An array's elements; not recursive, since an element may not be an array itself."""
        etype = self.u32(f"the array {_shown(key)}")
        count = self.u64(f"the array {_shown(key)}")
        if etype == _ARRAY:
            raise _Corrupt(
                f"metadata {_shown(key)} is an array of arrays",
                "llama.cpp cannot read nested arrays either: use a GGUF written by its converter",
            )
        if etype != _STRING and etype not in _SCALARS:
            raise _Corrupt(f"the array {_shown(key)} has unknown element type {etype}")
        if count > _MAX_ARRAY:
            raise _Corrupt(
                f"the array {_shown(key)} claims {count} elements; llama.cpp reads at most "
                f"{_MAX_ARRAY}"
            )
        least = 8 if etype == _STRING else struct.calcsize(_SCALARS[etype])
        if count * least > self.left():
            raise _Corrupt(
                f"the array {_shown(key)} claims {count} elements, more than the "
                f"{self.left()} bytes left in the file can hold"
            )
        if key == _TOKENS_KEY and etype == _STRING:
            start = self.pos
            self.token_faults = self.scan_tokens(count)
            if count > _KEEP_ARRAY_MAX:
                return ArraySummary(etype, count)
            self.pos = start
        if etype == _STRING:
            if count <= _KEEP_ARRAY_MAX:
                return [self.value(etype, key) for _ in range(count)]
            self.skip_strings(count, key)
            return ArraySummary(etype, count)
        start = self.take(count * least, f"the array {_shown(key)}")
        if key == _TOKEN_TYPES_KEY and etype == _I32:
            self.byte_tokens = _holds_i32(self.buf, start, count, _TOKEN_TYPE_BYTE)
        if count <= _KEEP_NUMBERS_MAX:
            fmt = _SCALARS[etype]
            return list(struct.unpack_from(f"{fmt[0]}{count}{fmt[1]}", self.buf, start))
        return ArraySummary(etype, count)

    def scan_tokens(self, count: int) -> TokenFaults:
        if count > _MAX_TOKENS:
            raise _Corrupt(
                f"its vocabulary claims {count} tokens; llava reads at most {_MAX_TOKENS}",
                "this is not a model llava can read",
            )
        if count > self.strings_left:
            raise _Corrupt(
                f"its metadata arrays hold more than {_MAX_STRINGS_WALKED} strings",
                "this is not a model llava can read",
            )
        self.strings_left -= count
        try:
            self.pos, faults = scan_tokens(self.buf, self.pos, count)
        except IndexError:
            raise _Corrupt(
                f"the array {_shown(_TOKENS_KEY)} runs past the end of the file"
            ) from None
        return faults

    def skip_strings(self, count: int, key: str) -> None:
        if count > self.strings_left:
            raise _Corrupt(
                f"its metadata arrays hold more than {_MAX_STRINGS_WALKED} strings",
                "this is not a model llava can read",
            )
        self.strings_left -= count
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        for _ in range(count):  # the one loop per element: kept tight
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if pos > end:
                break
        else:
            self.pos = pos
            return
        raise _Corrupt(f"the array {_shown(key)} runs past the end of the file")


def _holds_i32(buf: mmap.mmap | bytes, start: int, count: int, value: int) -> bool:
    """Whether the ``count`` int32s at ``start`` hold ``value``: a search in C, not a loop."""
    needle, end = struct.pack("<i", value), start + 4 * count
    at = buf.find(needle, start, end)
    while at >= 0 and (at - start) % 4:
        at = buf.find(needle, at + 1, end)
    return at >= 0


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    block, size = _TYPE_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def read_gguf(path: Path, role: str = "model") -> GGUFInfo:
    """Parse ``path``'s header. ``role`` ("model", "mmproj") names the file in errors.

    Raises ModelFileError and nothing else, whatever the file holds; time and memory are
    bounded by the limits above, not by what the header claims."""
    what = f"{role} file {path}"
    try:
        # O_NONBLOCK: a FIFO must not hang the open; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelFileError(f"{what} does not exist", _missing_hint(role)) from None
    except IsADirectoryError:
        raise ModelFileError(
            f"{what} is a directory, not a GGUF file", _missing_hint(role)
        ) from None
    except ValueError:  # a NUL byte in the path
        raise ModelFileError(
            f"{role} path {str(path)!r} holds a NUL byte", "check the path"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{what} is a directory, not a GGUF file", _missing_hint(role))
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(
                f"{what} is {kind_of(st.st_mode)}, not a regular file", _missing_hint(role)
            )
        if st.st_size == 0:
            raise ModelFileError(f"{what} is empty", "download it again")
        identity = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
            if (seen := _READ.get(identity)) is not None and seen[1] == _digest(buf, seen[0]):
                return seen[0]
            if buf[:4] != _MAGIC:
                raise ModelFileError(
                    f"{what} is not a GGUF file", f"give the {role} in GGUF format (*.gguf)"
                )
            info = _parse(path, _Reader(buf), st.st_size)
            if len(_READ) >= 8:
                _READ.clear()
            _READ[identity] = (info, _digest(buf, info))
        return info
    except _Corrupt as exc:
        raise ModelFileError(f"{what} is truncated or corrupt ({exc.reason})", exc.hint) from None
    except (struct.error, ValueError, OverflowError) as exc:  # a check above missed a case
        raise ModelFileError(
            f"{what} is truncated or corrupt ({exc})", "download it again"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


# Headers already read in this process, by path and file identity, with a digest of the header
# bytes (a file rewritten within the clock's tick keeps its mtime): ask reads a model's header
# when it resolves the model and again when it loads it, and the walk over a large vocabulary
# costs tens of milliseconds, hashing its bytes a few.
_READ: dict[tuple[str, int, int, int, int], tuple[GGUFInfo, bytes]] = {}


def _digest(buf: mmap.mmap, info: GGUFInfo) -> bytes:
    with memoryview(buf) as view:  # released before the map is closed
        return hashlib.blake2b(view[: info.data_offset], digest_size=16).digest()


def _missing_hint(role: str) -> str:
    if role == "mmproj":
        return "pass the projector that belongs to the model with --mmproj PATH (mmproj-*.gguf)"
    return "pass an existing GGUF file with --model PATH"


def _check_count(n: int, what: str, most: int, least_bytes: int, left: int) -> None:
    if n > most:
        raise _Corrupt(f"it claims {n} {what}; llava reads at most {most}")
    if n * least_bytes > left:
        raise _Corrupt(f"it claims {n} {what}, more than the {left} bytes left can hold")


def _parse(path: Path, r: _Reader, size: int) -> GGUFInfo:
    r.pos = 4
    version = r.u32("the version")
    if version not in (2, 3):
        raise _Corrupt(f"unsupported GGUF version {version}")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    _check_count(n_kv, "metadata entries", _MAX_KV, _MIN_KV_BYTES, r.left())
    _check_count(n_tensors, "tensors", _MAX_TENSORS, _MIN_TENSOR_BYTES, r.left())
    metadata: dict[str, object] = {}
    for index in range(n_kv):
        key = r.key(index)
        if key in metadata:
            raise _Corrupt(f"metadata key {_shown(key)} appears twice")
        metadata[key] = r.value(r.u32(f"the type of {_shown(key)}"), key)
    _check_count(n_tensors, "tensors", _MAX_TENSORS, _MIN_TENSOR_BYTES, r.left())
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for index in range(n_tensors):
        tensor = _tensor_info(r, index)
        if tensor.name in tensors:
            raise _Corrupt(f"tensor {_shown(tensor.name)} appears twice")
        tensors[tensor.name] = tensor
        data_end = max(data_end, tensor.offset + _tensor_nbytes(tensor.ggml_type, tensor.shape))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise _Corrupt(f"general.alignment {align!r} is not a power of 2")
    # llama.cpp pads to the alignment only before tensor data: a vocab-only file ends unpadded.
    data_offset = (r.pos + align - 1) // align * align if tensors else r.pos
    info = GGUFInfo(
        path, metadata, tensors, data_offset, data_offset + data_end, size,
        r.token_faults, r.byte_tokens,
    )  # fmt: skip
    if info.data_end > size:
        raise _Corrupt(f"{size} bytes on disk, the header describes {info.data_end}")
    return info


def _tensor_info(r: _Reader, index: int) -> TensorInfo:
    n = r.string_length(f"the name of tensor {index}")
    if n >= _MAX_NAME:
        raise _Corrupt(
            f"the name of tensor {index} is {n} bytes; llama.cpp takes under {_MAX_NAME}"
        )
    name = r.text(n, f"the name of tensor {index}")
    n_dims = r.u32(f"tensor {_shown(name)}")
    if n_dims > _MAX_DIMS:
        raise _Corrupt(
            f"tensor {_shown(name)} has {n_dims} dimensions; ggml has at most {_MAX_DIMS}"
        )
    shape = tuple(r.u64(f"tensor {_shown(name)}") for _ in range(n_dims))
    elements = 1
    for d in shape:
        elements *= d
    if any(d > _INT64_MAX for d in shape) or elements > _INT64_MAX:
        raise _Corrupt(f"tensor {_shown(name)} has an impossible shape {shape}")
    ggml_type = r.u32(f"tensor {_shown(name)}")
    if ggml_type not in _TYPE_SIZES:
        raise _Corrupt(f"tensor {_shown(name)} has ggml type {ggml_type}, unknown to llama.cpp")
    if (shape[0] if shape else 1) % _TYPE_SIZES[ggml_type][0]:
        raise _Corrupt(f"tensor {_shown(name)}'s rows are not whole blocks of its type")
    offset = r.u64(f"tensor {_shown(name)}")
    return TensorInfo(name, shape, ggml_type, offset)


def check_model(model: GGUFInfo) -> None:
    """Fail with a clear error when ``model`` is not a text model with weights."""
    if model.architecture == "clip":
        raise ModelFileError(
            f"{model.path} is a projector (mmproj), not a text model",
            "swap --model and --mmproj",
        )
    if model.vocab_only:
        raise ModelFileError(
            f"{model.path} is a vocab-only GGUF: a tokenizer with no weights, it cannot answer",
            "pass the full model file, the GGUF with the weights, with --model",
        )
    check_text_model(model)  # what llama.cpp would abort on, not fail with an error


def check_pair(model: GGUFInfo, mmproj: GGUFInfo) -> None:
    """Fail with a clear error when ``mmproj`` cannot serve ``model``."""
    names = f"model {model.path.name} and mmproj {mmproj.path.name}"
    check_model(model)
    if mmproj.architecture != "clip":
        raise ModelFileError(
            f"mmproj {mmproj.path} is not a CLIP projector "
            f"(architecture {mmproj.architecture or 'missing'})",
            "pass the mmproj-*.gguf file that belongs to the model with --mmproj",
        )
    if mmproj.vocab_only:
        raise ModelFileError(
            f"mmproj {mmproj.path} holds no tensors: a projector without weights",
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
    check_projector(mmproj, ptype)  # what libmtmd would crash or abort on

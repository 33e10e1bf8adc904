"""Pre-load checks: corrupt files and mismatched projectors are named before llama.cpp sees them."""

from __future__ import annotations

import os
import random
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from llava_cli import gguf_file, synthetic
from llava_cli.errors import ModelFileError
from llava_cli.gguf_checks import projector_type, projector_width, text_width
from llava_cli.gguf_file import check_pair, read_gguf

from .conftest import llava


def test_reads_what_libmtmd_needs(oracle: synthetic.ModelPair) -> None:
    model = read_gguf(oracle.model)
    mmproj = read_gguf(oracle.mmproj, "mmproj")
    assert model.architecture == "llama"
    assert text_width(model) == synthetic.EMBD
    assert projector_type(mmproj) == "mlp"
    assert projector_width(mmproj) == synthetic.EMBD
    assert model.data_end == model.file_size
    check_pair(model, mmproj)


def test_truncated_file_is_reported(oracle: synthetic.ModelPair, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = oracle.model.read_bytes()
    for size in (len(data) - 1, len(data) // 2, 100, 10):
        cut.write_bytes(data[:size])
        with pytest.raises(ModelFileError, match="truncated or corrupt"):
            read_gguf(cut)


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(path)


def test_mismatched_width_names_both_files(tmp_path: Path, oracle: synthetic.ModelPair) -> None:
    wrong = synthetic.build_random(tmp_path, mmproj_embd=48)
    with pytest.raises(ModelFileError) as err:
        check_pair(read_gguf(oracle.model), read_gguf(wrong.mmproj, "mmproj"))
    text = str(err.value)
    assert oracle.model.name in text and wrong.mmproj.name in text
    assert "48" in text and "64" in text


def test_projector_without_type_is_refused(tmp_path: Path, oracle: synthetic.ModelPair) -> None:
    legacy = synthetic.build_random(tmp_path, projector_type=None)
    with pytest.raises(ModelFileError, match=r"no clip\.projector_type"):
        check_pair(read_gguf(oracle.model), read_gguf(legacy.mmproj, "mmproj"))


def test_swapped_files_are_spotted(oracle: synthetic.ModelPair) -> None:
    with pytest.raises(ModelFileError, match="swap --model and --mmproj"):
        check_pair(read_gguf(oracle.mmproj), read_gguf(oracle.model, "mmproj"))


# -- crafted headers: every limit fails at once, with ModelFileError ---------------------------

VOCAB_ONLY = Path(__file__).parent / "gguf" / "ggml-vocab-llama-spm.gguf"  # see gguf/README.md
HUGE = 1 << 60


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, value: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value


def gguf(
    kvs: list[bytes], tensors: list[bytes] = (), *, n_kv: int | None = None,
    n_tensors: int | None = None, data: bytes = b"",
) -> bytes:  # fmt: skip
    """A GGUF v3 file from raw metadata and tensor entries; the counts can lie."""
    head = struct.pack(
        "<4sIQQ", b"GGUF", 3,
        len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv,
    )  # fmt: skip
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += bytes(-len(body) % 32)
    return body + data


def tensor(name: str, shape: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    dims = b"".join(struct.pack("<Q", d) for d in shape)
    return gstr(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", ggml_type, offset)


ARCH = kv("general.architecture", 8, gstr("llama"))
U32, STRING, ARRAY = 4, 8, 9


def nested_arrays(depth: int) -> bytes:
    """``depth`` arrays, each holding the next as its one element, around one u32."""
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", U32, 1) + bytes(4)


def test_a_crafted_header_is_read(tmp_path: Path) -> None:
    """The builder itself makes files the parser takes, so each case below fails for its lie."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(
        gguf(
            [ARCH, kv("a", ARRAY, struct.pack("<IQ", U32, 2) + bytes(8))],
            [tensor("w", (4, 2))],
            data=bytes(32),
        )
    )
    info = read_gguf(path)
    assert info.architecture == "llama" and info.metadata["a"] == [0, 0]
    assert info.tensors["w"].shape == (4, 2) and info.data_end == info.file_size


CRAFTED: dict[str, tuple[bytes, str]] = {
    # llama.cpp's reader takes no array whose elements are arrays: nesting stops at one level.
    "nested twice": (gguf([ARCH, kv("a", ARRAY, nested_arrays(2))]), "array of arrays"),
    "nested 100,000 deep": (
        gguf([ARCH, kv("a", ARRAY, nested_arrays(100_000))]),
        "array of arrays",
    ),
    "2^60 metadata entries": (gguf([ARCH], n_kv=HUGE), "metadata entries"),
    "2^60 tensors": (gguf([ARCH], n_tensors=HUGE), "tensors"),
    "more entries than bytes": (gguf([ARCH], n_kv=1000), "bytes left"),
    "a key of 2^60 bytes": (gguf([struct.pack("<Q", HUGE) + b"abc"]), "claims"),
    "a string of 2^60 bytes": (
        gguf([ARCH, kv("s", STRING, struct.pack("<Q", HUGE) + b"abc")]),
        "claims",
    ),
    "a string past the end": (
        gguf([ARCH, kv("s", STRING, struct.pack("<Q", 100) + b"ab")]),
        "left",
    ),
    "2^60 u32 elements": (
        gguf([ARCH, kv("a", ARRAY, struct.pack("<IQ", U32, HUGE) + bytes(8))]),
        "elements",
    ),
    "a million u32 elements in 8 bytes": (
        gguf([ARCH, kv("a", ARRAY, struct.pack("<IQ", U32, 10**6) + bytes(8))]),
        "bytes left",
    ),
    "2^60 strings": (
        gguf([ARCH, kv("a", ARRAY, struct.pack("<IQ", STRING, HUGE) + gstr("x"))]),
        "elements",
    ),
    "strings past the end": (
        gguf([ARCH, kv("a", ARRAY, struct.pack("<IQ", STRING, 100) + gstr("x") * 99)]),
        "past the end",
    ),
    "an empty key": (gguf([ARCH, kv("", U32, bytes(4))]), "empty"),
    "a key twice": (gguf([ARCH, ARCH]), "twice"),
    "an unknown value type": (gguf([ARCH, kv("x", 99, bytes(8))]), "unknown value type"),
    "an unknown element type": (
        gguf([ARCH, kv("a", ARRAY, struct.pack("<IQ", 99, 1) + bytes(8))]),
        "unknown element type",
    ),
    "alignment 3": (
        gguf([ARCH, kv("general.alignment", U32, struct.pack("<I", 3))], [tensor("w", (4,))]),
        "power of 2",
    ),
    "5 dimensions": (gguf([ARCH], [tensor("w", (1, 1, 1, 1, 1))]), "dimensions"),
    "a negative dimension": (gguf([ARCH], [tensor("w", (1 << 63,))]), "impossible shape"),
    "2^124 elements": (gguf([ARCH], [tensor("w", (1 << 62, 1 << 62))]), "impossible shape"),
    "a removed ggml type": (gguf([ARCH], [tensor("w", (32,), ggml_type=4)]), "ggml type 4"),
    "ggml type 2^32-1": (gguf([ARCH], [tensor("w", (4,), ggml_type=2**32 - 1)]), "ggml type"),
    "a partial Q4_0 block": (gguf([ARCH], [tensor("w", (31,), ggml_type=2)]), "blocks"),
    "a 64-byte tensor name": (gguf([ARCH], [tensor("w" * 64, (4,))]), "name"),
    "a tensor twice": (gguf([ARCH], [tensor("w", (4,)), tensor("w", (4,))]), "twice"),
    "data past the end": (gguf([ARCH], [tensor("w", (4,), offset=1 << 40)]), "bytes on disk"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_headers_fail_at_once_in_bounded_memory(case: str, tmp_path: Path) -> None:
    data, reason = CRAFTED[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ModelFileError, match="truncated or corrupt") as err:
            read_gguf(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason in str(err.value)
    assert err.value.exit_code == 4 and "\n" not in str(err.value)
    assert elapsed < 0.5, elapsed
    assert peak < 4 << 20, peak  # nothing sized by what the header claims


def test_the_walk_over_metadata_strings_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real vocabulary is far below the bound; a file past it is refused, not walked."""
    monkeypatch.setattr(gguf_file, "_MAX_STRINGS_WALKED", 100)
    path = tmp_path / "many.gguf"
    strings = struct.pack("<IQ", STRING, 101) + gstr("x") * 101
    path.write_bytes(gguf([ARCH, kv("a", ARRAY, strings)]))
    with pytest.raises(ModelFileError, match="more than 100 strings"):
        read_gguf(path)
    path.write_bytes(
        gguf([ARCH, kv("a", ARRAY, strings[:4] + struct.pack("<Q", 100) + gstr("x") * 100)])
    )
    assert read_gguf(path).metadata["a"] == gguf_file.ArraySummary(STRING, 100)


def test_a_long_metadata_string_is_summarised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_file, "_KEEP_STRING_MAX", 10)
    path = tmp_path / "long.gguf"
    path.write_bytes(gguf([ARCH, kv("s", STRING, gstr("y" * 11))]))
    info = read_gguf(path)
    assert info.metadata["s"] == gguf_file.LongString(11) and info.get_str("s") is None
    assert info.architecture == "llama"


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_only_a_regular_file_is_read(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: opening it for reading would wait forever
    else:
        path = Path("/dev/zero")
    started = time.perf_counter()
    with pytest.raises(ModelFileError, match="not a regular file"):
        read_gguf(path)
    assert time.perf_counter() - started < 1


# -- generated damage: truncations and byte flips of real test GGUFs ---------------------------


def damaged(data: bytes, header: int, rng: random.Random) -> bytes:
    """One random fault, mostly inside the header, where a byte changes what is parsed."""
    pick = rng.random()
    if pick < 0.3:
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        at = rng.randrange(header if rng.random() < 0.9 else len(data))
        if pick < 0.6:
            out[at] ^= 1 << rng.randrange(8)
        else:
            out[at] = rng.choice((0x00, 0x09, 0x7F, 0x80, 0xFF))
    return bytes(out)


@pytest.mark.slow
def test_random_damage_gives_an_info_or_a_model_file_error(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    rng = random.Random(20240610)
    path = tmp_path / "damaged.gguf"
    outcomes = {"read": 0, "refused": 0}
    started = time.perf_counter()
    for source, cases in ((oracle.model, 400), (oracle.mmproj, 300), (VOCAB_ONLY, 100)):
        data = source.read_bytes()
        header = read_gguf(source).data_offset
        for _ in range(cases):
            path.write_bytes(damaged(data, header, rng))
            one = time.perf_counter()
            try:
                info = read_gguf(path)
            except ModelFileError as exc:
                assert exc.exit_code == 4 and "\n" not in str(exc)
                outcomes["refused"] += 1
            else:
                assert info.data_end <= info.file_size
                outcomes["read"] += 1
            assert time.perf_counter() - one < 0.5
    assert outcomes["read"] > 50 and outcomes["refused"] > 200, outcomes
    assert time.perf_counter() - started < 20


# -- llama.cpp's vocab-only GGUFs --------------------------------------------------------------


def test_a_real_vocab_only_gguf_is_read(oracle: synthetic.ModelPair) -> None:
    info = read_gguf(VOCAB_ONLY)
    assert info.vocab_only and info.architecture == "llama"
    assert info.metadata["tokenizer.ggml.tokens"] == gguf_file.ArraySummary(STRING, 32000)
    # no tensors, so no padding before the (empty) data section: it ends where the file does
    assert info.data_offset == info.data_end == info.file_size == 723_869
    with pytest.raises(ModelFileError, match="vocab-only GGUF: a tokenizer with no weights"):
        check_pair(info, read_gguf(oracle.mmproj, "mmproj"))


@pytest.mark.slow
def test_asking_a_vocab_only_model_says_it_has_no_weights(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    result = llava("ask", images / "red.png", "--model", VOCAB_ONLY, "--mmproj", oracle.mmproj)
    assert result.returncode == 4 and result.stdout == b""
    [line] = result.stderr.decode().splitlines()
    assert "vocab-only GGUF" in line and "pass the full model" in line
    assert "truncated" not in line and "unexpected" not in line

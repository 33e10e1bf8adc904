"""GGUFs that pass the header checks but crash llama.cpp itself: each is refused first.

llama.cpp checks some hyperparameters with GGML_ASSERT (SIGABRT), libmtmd dereferences the
projector tensors its type needs without checking (SIGSEGV), and ggml asserts on the vision
graph's shapes while an image is encoded. Every case here did one of those before
``gguf_checks`` (the crafted files are edited copies of the colour oracle), and the seeded fuzz
at the end loads and runs a few hundred damaged copies in two child processes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llava_cli import gguf_checks, synthetic
from llava_cli.errors import ModelFileError
from llava_cli.gguf_file import check_pair, read_gguf

from .conftest import REPO, llava
from .test_gguf_file import damaged

BLOCKS = {0: (1, 4), 1: (1, 2), 8: (32, 34), 25: (1, 2), 26: (1, 4)}  # ggml type: elements, bytes


def rewrite(
    source: Path,
    target: Path,
    *,
    kv: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    retype: dict[str, int] | None = None,
) -> Path:
    """A copy of ``source`` with metadata set (``kv``: name -> value, or (value, type) for a
    new key), keys dropped, tensors renamed or given another ggml type (same shape, zero data
    when the size changes)."""
    import gguf
    import numpy as np

    kv, rename, retype = dict(kv or {}), rename or {}, retype or {}  # kv is used up below
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        value = kv.pop(name, field.contents())
        writer.add_key_value(name, value, field.types[0], sub)
    for name, (value, vtype) in kv.items():  # keys the source does not have
        sub = gguf.GGUFValueType.UINT32 if isinstance(value, list) else None
        writer.add_key_value(name, value, vtype, sub)
    for tensor in reader.tensors:
        ggml_type = retype.get(tensor.name, int(tensor.tensor_type))
        shape = [int(d) for d in reversed(tensor.shape)]  # numpy order: the row is last
        block, size = BLOCKS[ggml_type]
        row_bytes = shape[-1] // block * size
        data = np.frombuffer(bytes(tensor.data.tobytes()), np.uint8)
        if data.size != row_bytes * int(np.prod(shape[:-1])):
            data = np.zeros(row_bytes * int(np.prod(shape[:-1])), np.uint8)
        byte_shape = [*shape[:-1], row_bytes]  # gguf takes a uint8 tensor's shape in bytes
        writer.add_tensor(
            rename.get(tensor.name, tensor.name),
            data.reshape(byte_shape),
            raw_shape=byte_shape,
            raw_dtype=gguf.GGMLQuantizationType(ggml_type),
        )
    synthetic.finish_gguf(writer)
    return target


def u32(value: int) -> tuple[int, Any]:
    import gguf

    return value, gguf.GGUFValueType.UINT32


def tokens_with(oracle: synthetic.ModelPair, edit: dict[int, str]) -> list[str]:
    tokens = list(read_tokens(oracle.model))
    for index, text in edit.items():
        tokens[index] = text
    return tokens


def read_tokens(path: Path) -> list[str]:
    import gguf

    return list(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents())


def assert_refused(result: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Exit 4 by a clean refusal: no signal, nothing on stdout, one line naming the cause."""
    assert result.returncode >= 0, f"killed by {signal.Signals(-result.returncode).name}"
    assert result.returncode == 4, result.stderr.decode()
    assert result.stdout == b""
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("Error: ") and "unexpected" not in line
    for needle in needles:
        assert needle in line, line
    return line


# -- the text model: load_hparams' asserts and the vocabulary's ------------------------------

MODEL_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "no layers": ({"kv": {"llama.block_count": 0}}, "llama.block_count = 0, outside 1 to 512"),
    "513 layers": ({"kv": {"llama.block_count": 513}}, "llama.block_count = 513"),
    "2^31 layers": ({"kv": {"llama.block_count": 2**31}}, "llama.block_count = 2147483648"),
    "more experts than llama.cpp takes": (
        {"kv": {"llama.expert_count": u32(1025), "llama.expert_used_count": u32(2)}},
        "llama.expert_count = 1025, more than 1024",
    ),
    "more experts used than there are": (
        {"kv": {"llama.expert_count": u32(4), "llama.expert_used_count": u32(5)}},
        "uses 5 experts per token of its llama.expert_count = 4",
    ),
    "experts none of which is used": (
        {"kv": {"llama.expert_count": u32(4), "llama.expert_used_count": u32(0)}},
        "expert_used_count = 0",
    ),
    "experts used per layer, too many in one": (
        {"kv": {"llama.expert_count": u32(4), "llama.expert_used_count": ([2, 9], None)}},
        "uses 9 experts per token",
    ),
    "expert groups without experts": (
        {"kv": {"llama.expert_group_count": u32(2)}},
        "expert_group_count = 2 for 0 experts",
    ),
    "more prediction layers than layers": (
        {"kv": {"llama.nextn_predict_layers": u32(3)}},
        "nextn_predict_layers above its 2 layers",
    ),
    "an unknown rope scaling": (
        {"kv": {"llama.rope.scaling.type": ("bogus", None)}},
        "rope.scaling.type 'bogus'",
    ),
    "a norm stored as int32": (
        {"retype": {"output_norm.weight": 26}},
        "'output_norm.weight' as I32",
    ),
    "a weight stored as int16": ({"retype": {"blk.0.attn_q.weight": 25}}, "as I16"),
    "a norm stored as f16": ({"retype": {"blk.0.attn_norm.weight": 1}}, "not f32"),
}


def _with_types(case: dict[str, Any]) -> dict[str, Any]:
    """New keys need a GGUF type: (value, None) means a string or an int32 array."""
    import gguf

    kv = dict(case.get("kv", {}))
    for name, value in kv.items():
        if isinstance(value, tuple) and value[1] is None:
            string = isinstance(value[0], str)
            kv[name] = (value[0], gguf.GGUFValueType.STRING if string else gguf.GGUFValueType.ARRAY)
    return {**case, "kv": kv}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_hparams_llama_cpp_asserts_on_are_refused(
    case: str, oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    edit, reason = MODEL_CASES[case]
    model = rewrite(oracle.model, tmp_path / "model.gguf", **_with_types(edit))
    with pytest.raises(ModelFileError) as err:
        check_pair(read_gguf(model), read_gguf(oracle.mmproj, "mmproj"))
    assert reason in str(err.value) and str(model) in str(err.value)
    assert err.value.exit_code == 4 and "\n" not in str(err.value)


def test_the_unedited_copy_loads(oracle: synthetic.ModelPair, tmp_path: Path) -> None:
    """The rewriting itself breaks nothing: each case above fails for its one edit."""
    model = rewrite(oracle.model, tmp_path / "model.gguf")
    mmproj = rewrite(oracle.mmproj, tmp_path / "mmproj.gguf")
    check_pair(read_gguf(model), read_gguf(mmproj, "mmproj"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("513 layers", "block_count = 513"),
        ("more experts used than there are", "uses 5 experts"),
        ("a weight stored as int16", "as I16, a type ggml cannot compute with"),
    ],
)
def test_the_cli_refuses_what_llama_cpp_aborts_on(
    case: str, reason: str, oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    model = rewrite(oracle.model, tmp_path / "model.gguf", **_with_types(MODEL_CASES[case][0]))
    result = llava("ask", images / "red.png", "-m", model, "--mmproj", oracle.mmproj)
    assert_refused(result, reason, str(model))


@pytest.mark.slow
def test_duplicate_tokens_are_refused(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    tokens = read_tokens(oracle.model)
    blue = tokens.index("\u2581blue")
    model = rewrite(
        oracle.model,
        tmp_path / "model.gguf",
        kv={"tokenizer.ggml.tokens": tokens_with(oracle, {blue + 1: "\u2581blue"})},
    )
    result = llava("ask", images / "red.png", "-m", model, "--mmproj", oracle.mmproj)
    assert_refused(result, "lists the token '\u2581blue' twice", f"ids {blue} and {blue + 1}")
    # without --mmproj the model is checked when it is resolved, before its projector is found
    result = llava("ask", images / "red.png", "-m", model)
    assert_refused(result, "twice")


@pytest.mark.slow
def test_duplicate_tokens_are_refused_for_show_prompt(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """--show-prompt loads only the vocabulary, which is where llama.cpp asserts."""
    tokens = read_tokens(oracle.model)
    model = rewrite(
        oracle.model,
        tmp_path / "model.gguf",
        kv={"tokenizer.ggml.tokens": tokens_with(oracle, {10: tokens[11]})},
    )
    result = llava(
        "ask", images / "red.png", "--show-prompt", "-m", model, "--mmproj", oracle.mmproj
    )
    assert_refused(result, "twice")


@pytest.mark.parametrize(
    ("edit", "clash"),
    [
        ({300: "not-a-token"}, None),  # a new text: no clash
        ({300: "<"}, "'<'"),  # the text of another token
        ({300: "<\x00junk"}, "'<'"),  # llama.cpp reads a token up to its first NUL
        ({300: "", 310: "[EMPTY_300]"}, "'[EMPTY_300]'"),  # an empty token is named by its id
        ({300: "", 310: ""}, None),  # two empty tokens get two names
    ],
)
def test_token_clashes_are_found_as_llama_cpp_reads_tokens(
    edit: dict[int, str], clash: str | None, oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    model = rewrite(
        oracle.model,
        tmp_path / "model.gguf",
        kv={"tokenizer.ggml.tokens": tokens_with(oracle, edit)},
    )
    info = read_gguf(model)
    if clash is None:
        assert info.token_faults is not None and info.token_faults.clash is None
        gguf_checks.check_tokenizer(info)
    else:
        assert info.token_faults is not None and info.token_faults.clash is not None
        with pytest.raises(ModelFileError, match=re.escape(f"lists the token {clash} twice")):
            gguf_checks.check_tokenizer(info)


@pytest.mark.slow
def test_a_byte_no_token_spells_is_refused(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """SentencePiece spells what it has no piece for byte by byte; a missing byte token makes
    llama.cpp throw out of llama_tokenize (std::terminate) on the prompt's first newline."""
    newline = read_tokens(oracle.model).index("<0x0A>")
    model = rewrite(
        oracle.model,
        tmp_path / "model.gguf",
        kv={"tokenizer.ggml.tokens": tokens_with(oracle, {newline: "<0x0A-gone>"})},
    )
    result = llava("ask", images / "red.png", "-m", model, "--mmproj", oracle.mmproj)
    assert_refused(result, "no token for the byte 0x0A")


SPECIAL_TOKEN_CASES: dict[str, tuple[dict[str, Any], str | None]] = {
    # T5's Unigram tokenizer has no default BOS: the oracle's add_bos_token needs the file's
    "unigram without a BOS": (
        {"kv": {"tokenizer.ggml.model": "t5"}, "drop": ("tokenizer.ggml.bos_token_id",)},
        "adds a BOS token",
    ),
    "unigram with its BOS": ({"kv": {"tokenizer.ggml.model": "t5"}}, None),
    "unigram adding no BOS": (
        {
            "kv": {"tokenizer.ggml.model": "t5", "tokenizer.ggml.add_bos_token": False},
            "drop": ("tokenizer.ggml.bos_token_id",),
        },
        None,
    ),
    "a BOS id out of the vocabulary falls back to the default": (
        {"kv": {"tokenizer.ggml.bos_token_id": 100_000}},
        None,
    ),
    "GLM's BPE, which drops the default BOS": (
        {
            "kv": {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": ("glm4", None)},
            "drop": ("tokenizer.ggml.bos_token_id",),
        },
        "adds a BOS token",
    ),
    "an EOS added but missing": (
        {
            "kv": {"tokenizer.ggml.model": "t5", "tokenizer.ggml.add_eos_token": True},
            "drop": ("tokenizer.ggml.eos_token_id",),
        },
        None,  # Unigram's default EOS, id 1, is in the vocabulary
    ),
}


@pytest.mark.parametrize("case", SPECIAL_TOKEN_CASES)
def test_special_tokens_a_tokenizer_adds_must_exist(
    case: str, oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    edit, reason = SPECIAL_TOKEN_CASES[case]
    info = read_gguf(rewrite(oracle.model, tmp_path / "model.gguf", **_with_types(edit)))
    if reason is None:
        gguf_checks.check_tokenizer(info)
    else:
        with pytest.raises(ModelFileError, match=reason):
            gguf_checks.check_tokenizer(info)


@pytest.mark.slow
def test_the_cli_refuses_a_bos_the_vocabulary_lacks(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    edit = SPECIAL_TOKEN_CASES["unigram without a BOS"][0]
    model = rewrite(oracle.model, tmp_path / "model.gguf", **edit)
    result = llava("ask", images / "red.png", "-m", model, "--mmproj", oracle.mmproj)
    assert_refused(result, "adds a BOS token to every prompt but has no BOS")


def test_a_vocabulary_without_tokenizer_is_not_searched(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    """With tokenizer.ggml.model "none" llama.cpp reads no token list: no clash to refuse."""
    tokens = read_tokens(oracle.model)
    model = rewrite(
        oracle.model,
        tmp_path / "model.gguf",
        kv={
            "tokenizer.ggml.tokens": tokens_with(oracle, {10: tokens[11]}),
            "tokenizer.ggml.model": "none",
        },
    )
    gguf_checks.check_tokenizer(read_gguf(model))


@pytest.mark.slow
def test_byte_tokens_in_a_bert_vocabulary_are_refused(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """WordPiece has no byte tokens: token_to_piece aborts on the oracle's 256 of them."""
    model = rewrite(oracle.model, tmp_path / "model.gguf", kv={"tokenizer.ggml.model": "bert"})
    assert read_gguf(model).byte_tokens
    result = llava("ask", images / "red.png", "-m", model, "--mmproj", oracle.mmproj)
    assert_refused(result, "byte tokens in a BERT")


def test_a_real_vocabulary_has_no_faults() -> None:
    """The duplicate and byte-token search over llama.cpp's own SPM vocabulary (32,000 tokens,
    tests/gguf/README.md) finds nothing wrong and ends inside the file. (Its cost, ~25 ms
    for 150,000 tokens, was measured once and is not a test: benchmarks measure.)"""
    vocab = Path(__file__).parent / "gguf" / "ggml-vocab-llama-spm.gguf"
    data = vocab.read_bytes()
    key = struct.pack("<Q", len(b"tokenizer.ggml.tokens")) + b"tokenizer.ggml.tokens"
    start = data.index(key) + len(key) + 4 + 4
    (count,) = struct.unpack_from("<Q", data, start)
    end, faults = gguf_checks.scan_tokens(data, start + 8, count)
    assert count == 32_000
    assert faults == gguf_checks.TokenFaults() and end <= len(data)


# -- the projector: tensors libmtmd dereferences, shapes ggml asserts on ----------------------

MMPROJ_CASES: dict[str, tuple[dict[str, Any], str]] = {
    **{
        f"no {name}": ({"rename": {name: name[:-1] + "X"}}, f"has no tensor '{name}'")
        for name in (
            "mm.0.weight",
            "mm.0.bias",
            "mm.2.weight",
            "mm.2.bias",
            "v.patch_embd.weight",
            "v.position_embd.weight",
            "v.blk.0.attn_q.weight",
            "v.blk.0.attn_k.weight",
            "v.blk.0.attn_v.weight",
        )
    },
    "a bias stored as q8_0": ({"retype": {"mm.2.bias": 8}}, "'mm.2.bias' as ggml type 8, not f32"),
    "a norm stored as f16": ({"retype": {"v.blk.0.ln1.weight": 1}}, "not f32"),
    "heads that do not divide the width": (
        {"kv": {"clip.vision.attention.head_count": 6}},
        "width of 32 into 6 attention heads",
    ),
    "patches larger than the image": (
        {"kv": {"clip.vision.patch_size": 32776}},
        "32-pixel images in 32776-pixel patches",
    ),
    "2^31 vision layers": (
        {"kv": {"clip.vision.block_count": 2**31}},
        "claims 2147483648 vision layers",
    ),
    "a patch kernel for other patches": (
        {"kv": {"clip.vision.patch_size": 4}},
        "patch kernel 8x8x3x32",
    ),
    "too few position embeddings": (
        {"kv": {"clip.vision.image_size": 40}},
        "position embeddings 32x17 for 26 positions",
    ),
}


@pytest.mark.parametrize("case", MMPROJ_CASES)
def test_projectors_libmtmd_crashes_on_are_refused(
    case: str, oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    edit, reason = MMPROJ_CASES[case]
    mmproj = rewrite(oracle.mmproj, tmp_path / "mmproj.gguf", **edit)
    with pytest.raises(ModelFileError) as err:
        check_pair(read_gguf(oracle.model), read_gguf(mmproj, "mmproj"))
    assert reason in str(err.value) and str(mmproj) in str(err.value), str(err.value)
    assert err.value.exit_code == 4 and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no v.blk.0.attn_k.weight", "libmtmd would crash"),  # SIGSEGV while encoding
        ("no mm.2.weight", "'mm.2.weight'"),  # SIGSEGV while loading
        ("heads that do not divide the width", "attention heads"),  # SIGABRT while encoding
        ("a bias stored as q8_0", "not f32"),  # SIGABRT in a compute thread
    ],
)
def test_the_cli_refuses_projectors_libmtmd_crashes_on(
    case: str, reason: str, oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    mmproj = rewrite(oracle.mmproj, tmp_path / "mmproj.gguf", **MMPROJ_CASES[case][0])
    result = llava("ask", images / "red.png", "-m", oracle.model, "--mmproj", mmproj)
    assert_refused(result, reason, str(mmproj))


def test_a_projector_of_another_type_needs_its_own_tensors(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    """Types other than mlp get the checks of what their graph dereferences (not the shapes)."""
    mmproj = rewrite(
        oracle.mmproj, tmp_path / "mmproj.gguf", kv={"clip.projector_type": "qwen2vl_merger"}
    )
    with pytest.raises(ModelFileError, match=r"no tensor 'v\.patch_embd\.weight\.1'"):
        check_pair(read_gguf(oracle.model), read_gguf(mmproj, "mmproj"))


# -- the last line of defence: an abort nothing foresaw ---------------------------------------


@pytest.mark.slow
def test_a_ggml_abort_is_one_line_and_exit_1() -> None:
    """What the checks miss still ends in one line (not a backtrace on stdout) and exit 1."""
    code = (
        "from llava_cli.engine import native\n"
        "native.init(False)\n"
        "print('the answer so far', end='')\n"
        "native.llama_cpp.llama_cpp._lib.ggml_abort(\n"
        "    b'/build/vendor/llama.cpp/ggml/src/ggml.c', 3758, b'GGML_ASSERT(%s) failed',\n"
        "    b'a == b\\n\\x1b[2J')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=60, check=False
    )
    assert result.returncode == 1, result
    assert result.stdout == b"the answer so far"  # flushed; no backtrace after it
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("Error: llama.cpp stopped on a failed internal check (ggml.c:3758: ")
    assert "GGML_ASSERT(a == b <U+001B>[2J) failed" in line and "/build/" not in line


# -- seeded fuzz: damaged copies of the oracle, loaded and run --------------------------------

FUZZ_CASES = 500  # ~3 ms each: loading, one image and two tokens of a tiny pair
FUZZ_SEED = 20240611


@dataclass(frozen=True)
class _Image:
    key: str = "red"
    width: int = 32
    height: int = 32
    rgb: bytes = bytes((230, 30, 30)) * 32 * 32


def fuzz_child(kind: str, model: str, mmproj: str, workdir: str, cases: int, seed: int) -> None:
    """In a child process: load each damaged copy and answer about one image; print one line
    per case ("index outcome") so the parent can name the case a crash stopped at."""
    from llava_cli.engine import Engine, LoadOptions, SamplingParams, Session
    from llava_cli.errors import LlavaError
    from llava_cli.templates import MEDIA_MARKER

    source = Path(model if kind == "model" else mmproj)
    data = source.read_bytes()
    header = read_gguf(source).data_offset
    rng = random.Random(seed)
    path = Path(workdir) / f"damaged-{kind}.gguf"
    for index in range(cases):
        path.write_bytes(damaged(data, header, rng))
        print(index, end=" ", flush=True)
        opts = LoadOptions(
            model=path if kind == "model" else Path(model),
            mmproj=path if kind == "mmproj" else Path(mmproj),
            n_threads=2,
        )
        try:
            engine = Engine.load(opts)
            try:
                session = Session(engine, 512)
                prompt = f"USER: {MEDIA_MARKER}\nWhat colour?\nASSISTANT:"
                session.evaluate(prompt, [_Image()], add_special=True)
                for _ in session.generate(SamplingParams(max_tokens=2, seed=1)):
                    pass
                session.close()
            finally:
                engine.close()
        except LlavaError as exc:
            assert "\n" not in str(exc)
            print("refused", exc.exit_code, flush=True)
        else:
            print("ran", flush=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "mmproj"])
def test_seeded_damage_never_crashes_llama_cpp(
    kind: str, oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    """500 damaged copies of one file, run in one child: none may kill it by a signal or reach
    a ggml abort (the abort hook would end the child with exit 1)."""
    code = (
        "import sys; from tests.test_gguf_crashes import fuzz_child; fuzz_child(*sys.argv[1:5], "
        "int(sys.argv[5]), int(sys.argv[6]))"
    )
    args = [kind, oracle.model, oracle.mmproj, tmp_path, FUZZ_CASES, FUZZ_SEED]
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        cwd=REPO,
        timeout=600,  # a hang guard, not a speed target
        check=False,
        env={**os.environ, "LLAVA_HOME": str(tmp_path / "home")},
    )
    lines = result.stdout.decode().splitlines()
    last = lines[-1].split()[0] if lines else "none"
    if result.returncode < 0:
        pytest.fail(f"case {last} killed the child by {signal.Signals(-result.returncode).name}")
    assert result.returncode == 0, f"case {last}: {result.stderr.decode()[-2000:]}"
    outcomes = [line.split()[1] for line in lines]
    assert len(outcomes) == FUZZ_CASES
    assert outcomes.count("ran") > 10 and outcomes.count("refused") > 50, outcomes

"""--repack/--no-repack: llama.cpp's CPU weight repacking, its default by build, and the prefix
cache keeping repacked and plain runs apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.engine.model import quantize, repack_default
from llava_cli.engine.native import system_info

from .conftest import llava

# llama.cpp's own lines (llama_print_system_info) as an AVX2-only and an AVX-512 x86 build and
# an Apple build print them.
AVX2_BUILD = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
AVX512_BUILD = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | "
    "OPENMP = 1 | REPACK = 1 | "
)
METAL_BUILD = (
    "Metal : EMBED_LIBRARY = 1 | BF16 = 1 | CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | "
    "DOTPROD = 1 | LLAMAFILE = 1 | ACCELERATE = 1 | REPACK = 1 | "
)

# The buffer llama.cpp's verbose load log names when it repacked weights.
REPACKED = "CPU_REPACK model buffer size"


def test_the_default_follows_the_measurement() -> None:
    """Off where AVX-512 kernels beat the repacked ones (measured), on elsewhere."""
    assert repack_default(AVX2_BUILD) is True
    assert repack_default(AVX512_BUILD) is False
    assert repack_default(METAL_BUILD) is True


@pytest.fixture(scope="module")
def q4_oracle(tmp_path_factory: pytest.TempPathFactory) -> synthetic.ModelPair:
    """The colour oracle with its text model in Q4_0, a type llama.cpp repacks on AVX2 and
    Arm (its rows are multiples of 8); the oracle's sparse weights survive 4-bit blocks."""
    folder = tmp_path_factory.mktemp("q4-oracle")
    pair = synthetic.build_colour_oracle(folder)
    target = folder / "oracle-Q4_0.gguf"
    quantize(pair.model, target, "Q4_0")
    return synthetic.ModelPair(target, pair.mmproj)


def repacking_build() -> bool:
    return "REPACK = 1" in system_info()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "repacked"),
    [
        (["--repack"], {}, True),
        (["--no-repack"], {}, False),
        ([], {"LLAVA_REPACK": "1"}, True),
        ([], {"LLAVA_REPACK": "0"}, False),
        (["--no-repack"], {"LLAVA_REPACK": "1"}, False),  # the flag wins over the environment
        ([], {}, None),  # the build's default: repack_default(system_info())
    ],
)
def test_the_switch_reaches_llama_cpp_and_the_answer_holds(
    q4_oracle: synthetic.ModelPair,
    images: Path,
    args: list[str],
    env: dict[str, str],
    repacked: bool | None,
) -> None:
    if repacked is None:
        repacked = repack_default(system_info())
    if not repacking_build():
        pytest.skip("this llama.cpp build has no CPU repacking (REPACK = 1 missing)")
    done = llava(
        "ask", images / "red.png", "-m", str(q4_oracle.model), "--mmproj", str(q4_oracle.mmproj),
        "-p", "What colour?", "--no-cache", "-v", *args, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == b"red"
    assert (REPACKED.encode() in done.stderr) is repacked


@pytest.mark.slow
def test_the_prefix_cache_keeps_repacked_and_plain_states_apart(
    q4_oracle: synthetic.ModelPair, images: Path
) -> None:
    """A state computed with repacked kernels is never restored into a plain run: the second
    run with the other setting encodes the image again; the same setting reuses it."""
    ask = [
        "ask", images / "red.png", "-m", str(q4_oracle.model), "--mmproj", str(q4_oracle.mmproj),
        "-p", "What colour?", "--json",
    ]  # fmt: skip

    def reused(*args: str) -> int:
        done = llava(*ask, *args)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["answer"] == "red"
        return int(record["usage"]["cached_tokens"])

    assert reused("--repack") == 0
    assert reused("--no-repack") == 0  # another computation: nothing restored
    assert reused("--repack") > 0
    assert reused("--no-repack") > 0


@pytest.mark.slow
def test_a_switch_set_to_a_word_that_is_no_answer_is_one_line(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    done = llava(
        "ask", images / "red.png", "-m", oracle.model, "--mmproj", oracle.mmproj, "-p", "Q",
        env={"LLAVA_REPACK": "maybe"},
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.decode() == (
        "Error: invalid value for LLAVA_REPACK: must be 1 or 0 (true/false, yes/no, on/off) "
        "— see llava ask --help\n"
    )

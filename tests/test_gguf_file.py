"""Pre-load checks: corrupt files and mismatched projectors are named before llama.cpp sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.errors import ModelFileError
from llava_cli.gguf_file import check_pair, projector_type, projector_width, read_gguf, text_width


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

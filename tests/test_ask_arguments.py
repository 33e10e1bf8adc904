"""``llava ask`` as people type it: the question as words after the images, the images
checked before any model is resolved, and batch answers that say whose they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.commands.ask import split_arguments
from llava_cli.errors import UsageError
from tests.conftest import llava
from tests.fakehub import FakeHub

Q = "What colour is this?"


def model_args(pair: synthetic.ModelPair) -> list[str]:
    return ["--model", str(pair.model), "--mmproj", str(pair.mmproj)]


def test_split_arguments(tmp_path: Path) -> None:
    (tmp_path / "scan").write_bytes(b"")  # an existing file is an image, whatever its name
    scan = str(tmp_path / "scan")
    assert split_arguments(["a.png", "What is this?"]) == (["a.png"], "What is this?")
    assert split_arguments(["a.png", "b.JPG", "what", "is", "it"]) == (
        ["a.png", "b.JPG"],
        "what is it",
    )
    assert split_arguments(["a.png", "b.png"]) == (["a.png", "b.png"], None)
    assert split_arguments(["-", "describe"]) == (["-"], "describe")
    assert split_arguments([scan, "Is this 3/4 of a page?"]) == ([scan], "Is this 3/4 of a page?")
    # A missing file that looks like one stays an image (reported missing), not the question.
    assert split_arguments(["a.png", "tpyo.png"]) == (["a.png", "tpyo.png"], None)
    assert split_arguments(["a.png", "./notes"]) == (["a.png", "./notes"], None)
    assert split_arguments(["a.png", "my photo.jpeg"]) == (["a.png", "my photo.jpeg"], None)
    assert split_arguments(["What is this?"]) == ([], "What is this?")
    # A word that looks like a file name is an image, reported missing if it is not there.
    assert split_arguments(["a.png", "scan.pdf"]) == (["a.png", "scan.pdf"], None)
    assert split_arguments(["a.png", "yes/no?"]) == (["a.png"], "yes/no?")
    assert split_arguments(["a.png", "blu.pgn"]) == (["a.png", "blu.pgn"], None)
    with pytest.raises(UsageError, match="the question goes after the images"):
        split_arguments(["a.png", "describe it", "b.png"])


@pytest.mark.slow
def test_the_question_as_an_argument(oracle: synthetic.ModelPair, images: Path) -> None:
    quoted = llava("ask", images / "red.png", Q, *model_args(oracle))
    assert (quoted.returncode, quoted.stdout, quoted.stderr) == (0, b"red\n", b"")
    words = llava("ask", images / "blue.png", *Q.split(), *model_args(oracle))
    assert (words.returncode, words.stdout, words.stderr) == (0, b"blue\n", b"")
    # With --json the record carries the question as it was understood.
    record = json.loads(llava("ask", images / "red.png", Q, "--json", *model_args(oracle)).stdout)
    assert record["prompt"] == Q and record["answer"] == "red"


@pytest.mark.slow
def test_two_questions_or_none_are_usage_errors(images: Path) -> None:
    both = llava("ask", images / "red.png", "why?", "-p", "what?")
    assert both.returncode == 2 and both.stdout == b""
    assert both.stderr.decode() == (
        "Error: two questions given: -p and 'why?' — give one (if 'why?' is an image, check "
        "its path)\n"
    )
    words_only = llava("ask", "What is this?")
    assert words_only.returncode == 2
    assert words_only.stderr.decode().startswith(
        "Error: no image given (read 'What is this?' as the question) — llava ask IMAGE..."
    )


@pytest.mark.slow
def test_a_missing_image_costs_no_request_and_no_load(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    with FakeHub() as hub:
        repo = "test/colour-oracle-GGUF"
        hub.add_repo(repo, {"oracle-Q4_K_M.gguf": oracle.model.read_bytes(),
                            "mmproj-oracle-f16.gguf": oracle.mmproj.read_bytes()})  # fmt: skip
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        for args in (
            [tmp_path / "tpyo.png", "-m", repo],
            [tmp_path / "tpyo.png", "-m", repo, "--json"],
            [tmp_path / "tpyo.png", tmp_path / "also-gone.jpg", "-m", repo],
            [tmp_path / "tpyo.png", "-m", repo, "--show-prompt"],
            [tmp_path / "tpyo.png", images / "red.png", "-m", repo, "--together"],
            [images / "red.png", tmp_path / "tpyo.png", "-m", repo],  # one bad image of two
        ):
            result = llava("ask", *args, Q, env=env)
            assert result.returncode == 4, result.stderr
            assert b"does not exist" in result.stderr
            assert hub.requests == [], args  # nothing resolved, nothing pulled
        assert not (tmp_path / "hf-home" / "hub").exists()
    # A local model file is not read either: a broken one is never reported.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF")
    result = llava("ask", tmp_path / "tpyo.png", "-m", broken, "--mmproj", oracle.mmproj)
    assert result.returncode == 4
    assert result.stderr.decode().splitlines() == [
        f"Error: image {tmp_path / 'tpyo.png'} does not exist — check the path"
    ]


@pytest.mark.slow
def test_batch_headers_name_each_answer(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    red, blue = images / "red.png", images / "blue.png"
    result = llava("ask", red, blue, Q, *model_args(oracle))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == f"==> {red} <==\nred\n\n==> {blue} <==\nblue\n"
    # --label for one image too
    one = llava("ask", red, Q, "--label", *model_args(oracle))
    assert one.stdout.decode() == f"==> {red} <==\nred\n"


@pytest.mark.slow
def test_a_batch_with_a_missing_image_asks_nothing(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    red, gone, blue = images / "red.png", tmp_path / "gone.png", images / "blue.png"
    result = llava("ask", red, gone, blue, Q, *model_args(oracle))
    assert (result.returncode, result.stdout) == (4, b"")
    assert result.stderr.decode().splitlines() == [
        f"Error: image {gone} does not exist — check the path",
        "nothing was asked: 1 image of 3 cannot be read, and the model is loaded only for a "
        "batch that can be answered",
    ]
    as_json = llava("ask", red, gone, blue, Q, "--json", *model_args(oracle))
    assert as_json.returncode == 4
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["image"], r["exit_code"]) for r in records] == [(str(gone), 4)]


@pytest.mark.slow
def test_options_a_grammar_cannot_take_are_refused_first(images: Path, tmp_path: Path) -> None:
    for extra, flag in ((["--stop", "}"], "--stop"), (["--think"], "--think")):
        result = llava("ask", images / "red.png", "x", "--json-schema", '{"type": "object"}',
                       "-m", tmp_path / "none.gguf", *extra)  # fmt: skip
        assert (result.returncode, result.stdout) == (2, b"")
        assert result.stderr.decode().startswith(f"Error: {flag} cannot be used with --json-schema")

"""`llava chat` from the command line: the first message as an argument, images checked before
any model is touched, `-c` / `--resume`, and the small habits (/bye, /system -) — through the
real CLI with piped stdin, on the real tiny models."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from llava_cli import synthetic
from llava_cli.commands.chat import COMMANDS
from llava_cli.repl import LineReader

from .conftest import llava
from .fakehub import FakeHub


def home() -> Path:
    return Path(os.environ["LLAVA_HOME"])


def chat(
    *args: str | Path, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    result = llava("chat", *args, stdin=stdin.encode(), env=env)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def oracle_args(oracle: synthetic.ModelPair) -> list[str | Path]:
    return ["--model", oracle.model, "--temperature", "0"]


@pytest.mark.slow
def test_the_first_message_as_an_argument_then_the_piped_lines(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    script = f"/clear\n/image {images / 'blue.png'}\nAnd this one?\n"
    code, out, err = chat(
        images / "red.png", "What colour is this?", *oracle_args(oracle), stdin=script
    )
    assert code == 0, err
    assert out == "red\nblue\n"
    assert "Error" not in err


@pytest.mark.slow
def test_a_missing_image_costs_no_model(images: Path) -> None:
    """No request to the hub and nothing loaded: the image is read before the model is
    resolved, and a missing one ends the chat before it starts (exit 4)."""
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        code, out, err = chat(
            images / "red.png", images / "missing.png", "Hello?", "-m", "someone/big-GGUF", env=env
        )
        assert hub.requests == []
    assert code == 4
    assert out == ""
    assert err.startswith("Error: image ") and "missing.png does not exist" in err
    assert "llava chat ·" not in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_bye_ends_the_chat_and_system_dash_says_reset(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    script = "/system You name colours.\n/system -\n/system\n/bye\nWhat colour is this?\n"
    code, out, err = chat(images / "red.png", *oracle_args(oracle), stdin=script)
    assert code == 0, err
    assert out == ""  # nothing after /bye was answered
    lines = err.splitlines()
    assert "system prompt set; it applies to the whole conversation" in lines
    assert "system prompt reset to the default; it applies to the whole conversation" in lines
    assert "system prompt: (the format default)" in lines


@pytest.mark.slow
def test_plurals_in_chat_messages(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    script = f"What colour is this?\n/save {tmp_path / 'one.json'}\n/stats\n/images\n"
    code, _, err = chat(images / "red.png", *oracle_args(oracle), stdin=script)
    assert code == 0, err
    assert f"saved 1 turn to {tmp_path / 'one.json'}" in err
    assert "answer: 1 token, first token after" in err  # "red", then the end
    assert "tokens/s n/a (stop)" in err  # no decode time to measure after one token
    assert "0.0 tokens/s" not in err


@pytest.mark.slow
def test_continue_goes_on_with_the_last_chat(oracle: synthetic.ModelPair, images: Path) -> None:
    picture = home().parent / "red picture.png"
    picture.write_bytes((images / "red.png").read_bytes())
    code, out, err = chat(picture, "What colour is this?", *oracle_args(oracle))
    assert (code, out) == (0, "red\n"), err
    last = home() / "last_chat.json"
    assert stat.S_IMODE(last.stat().st_mode) == 0o600
    record = json.loads(last.read_text())
    assert record["model_file"] == str(oracle.model) and record["turns"][0]["answer"] == "red"

    # no -m: the model it was saved with (the default model is not on this machine)
    code, out, err = chat("-c", "--temperature", "0", stdin="And the colour again?\n")
    assert (code, out) == (0, "red\n"), err  # the resumed image reaches the model
    assert "loaded 1 turn from the last chat" in err
    assert [t["prompt"] for t in json.loads(last.read_text())["turns"]] == [
        "What colour is this?",
        "And the colour again?",
    ]

    # settings given now win over the saved ones; the rest come back as they were
    code, out, err = chat("-c", "--max-tokens", "7", stdin="/set\n",
                          env={"LLAVA_TEMPERATURE": "0.9"})  # fmt: skip
    assert code == 0, err
    settings = err.splitlines()
    assert "max-tokens 7" in settings and "temperature 0.9" in settings
    assert "top-k 40" in settings

    picture.write_bytes((images / "blue.png").read_bytes())  # changed since: nothing starts
    code, out, err = chat("-c", *oracle_args(oracle))
    assert (code, out) == (4, ""), err
    assert "changed since the chat was saved" in err and "llava chat ·" not in err
    assert err.startswith("Error: the last chat cannot be continued: ")
    assert err.endswith(" — start a new one with llava chat IMAGE (it replaces the last chat)\n")


@pytest.mark.slow
def test_resume_a_saved_chat(oracle: synthetic.ModelPair, images: Path, tmp_path: Path) -> None:
    saved = tmp_path / "trip.md"
    script = f"/set seed 7\nWhat colour is this?\n/save {saved}\n"
    code, out, err = chat(images / "red.png", *oracle_args(oracle), stdin=script)
    assert (code, out) == (0, "red\n"), err
    code, out, err = chat("--resume", saved, *oracle_args(oracle), stdin="/set\nAgain?\n")
    assert (code, out) == (0, "red\n"), err
    assert f"loaded 1 turn from {saved}" in err and "seed 7" in err.splitlines()


@pytest.mark.slow
def test_continue_without_a_last_chat_and_both_at_once(tmp_path: Path) -> None:
    code, out, err = chat("-c")
    assert (code, out) == (4, "")
    assert err == "Error: there is no earlier chat to continue — start one: llava chat IMAGE\n"
    code, _, err = chat("-c", "--resume", tmp_path / "x.json")
    assert code == 2 and "--continue and --resume cannot go together" in err


def test_the_input_history_is_private(tmp_path: Path) -> None:
    """Created 0600 in a folder created 0700, as saved chats are; an older one left readable
    by others is narrowed to 0600."""
    folder = tmp_path / "new" / "llava"
    for history in (folder / "chat_history", tmp_path / "old_history"):
        if history.parent == tmp_path:
            history.write_text("\n# 2024-01-01\n+hello\n")
            history.chmod(0o644)
        with create_pipe_input() as keys:
            keys.send_text("a secret\r")
            keys.close()
            lines = list(LineReader(COMMANDS, history, input=keys, output=DummyOutput()).lines())
        assert lines == ["a secret"]
        assert "+a secret" in history.read_text()
        assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.slow
def test_a_chat_without_a_message_leaves_the_last_chat_alone(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    code, _, err = chat(images / "red.png", "What colour is this?", *oracle_args(oracle))
    assert code == 0, err
    before = (home() / "last_chat.json").read_bytes()
    script = "/images\n/system Be brief.\n/set seed 3\n/undo\n"
    code, _, err = chat(images / "blue.png", *oracle_args(oracle), stdin=script)
    assert code == 0, err
    assert (home() / "last_chat.json").read_bytes() == before


@pytest.mark.slow
def test_a_chat_with_an_image_from_stdin_is_not_continued_from_stdin(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    result = llava("chat", "-", "What colour is this?", *oracle_args(oracle),
                   stdin=(images / "red.png").read_bytes())  # fmt: skip
    assert (result.returncode, result.stdout) == (0, b"red\n"), result.stderr
    saved = json.loads((home() / "last_chat.json").read_text())
    assert saved["turns"][0]["images"][0]["path"] == "-"
    code, out, err = chat("-c", *oracle_args(oracle), stdin="more?\n")
    assert (code, out) == (4, "")
    assert "came from standard input, which cannot be read again" in err

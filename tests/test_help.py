"""The help texts, shell completion and the generated command reference (docs/cli.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava_cli.slash import COMMANDS
from tests.conftest import llava

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["ask", "chat", "pull", "list", "show", "rm", "doctor"]


def help_of(*command: str) -> str:
    result = llava(*command, "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    return result.stdout.decode()


@pytest.mark.slow
def test_top_level_help_lists_every_command_with_its_whole_summary() -> None:
    text = help_of()
    commands = text.split("Commands:\n", 1)[1]
    for name in [*SUBCOMMANDS, "cache"]:
        assert re.search(rf"^  {name}\s+\S", commands, re.M), name
    assert "..." not in commands and "…" not in commands  # click cuts long summaries so
    assert "--install-completion" in text and "--show-completion" in text


@pytest.mark.slow
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_has_examples_and_plain_metavars(command: str) -> None:
    text = help_of(command)
    examples = text.split("Examples:\n", 1)[1]
    assert all(line.strip().startswith("llava ") or line.strip().startswith(("echo", "curl", "HF_"))
               for line in examples.strip().splitlines())  # fmt: skip
    # No Python types or click's range notation where a user expects a word.
    assert not re.search(r"<(list|str|int|float|bool)|range>|<=x<=|\{[A-Z]", text), text


@pytest.mark.slow
def test_ask_options_are_grouped_in_order() -> None:
    text = help_of("ask")
    headings = re.findall(r"^([A-Z][a-z ]+):$", text, re.M)
    assert headings == [
        "Arguments", "Model", "Generation", "Output", "Hardware", "Input limits",
        "Other options", "Examples",
    ]  # fmt: skip
    assert "Usage: llava ask [OPTIONS] IMAGE... [QUESTION]" in text
    model = text.split("\nModel:\n", 1)[1].split("\n\n", 1)[0]
    assert "--model REF" in model and "--offline" in model and "--yes" in model
    assert "--top-p NUMBER  " in text and "0 to 1." in text  # the range, from options.OPTIONS
    assert "--seed N " in text


@pytest.mark.slow
def test_chat_help_lists_every_slash_command() -> None:
    text = help_of("chat")
    listed = text.split("In the chat", 1)[1]
    for name in COMMANDS:
        assert re.search(rf"^  {re.escape(name)}\s", listed, re.M), name
    assert "[IMAGE]... [MESSAGE]" in text and "--continue" in text and "--resume FILE" in text


@pytest.mark.slow
def test_a_range_error_names_the_range_from_the_same_table() -> None:
    result = llava("ask", "x.png", "--top-p", "3")
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "Error: invalid value for '--top-p': must be 0 to 1, not 3 — see llava ask --help\n"
    )
    huge = llava("ask", "x.png", "--top-k", str(2**40))
    assert (
        huge.returncode == 2 and b"must be at most 2,147,483,647, not 1099511627776" in huge.stderr
    )


def complete(words: str) -> list[str]:
    """What bash completion offers for the command line ``words`` (last word incomplete)."""
    env = {
        **os.environ,
        "_LLAVA_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    result = subprocess.run(
        [sys.executable, "-m", "llava_cli"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.slow
def test_shell_completion_of_commands_options_and_model_names() -> None:
    assert complete("llava as") == ["ask"]
    assert complete("llava ask --mo") == ["--model"]
    names = complete("llava ask -m gemma")
    assert "gemma3" in names and "gemma-3-4b" in names  # aliases too
    assert all(n.startswith("gemma") for n in names)
    assert "smolvlm-500m" in complete("llava pull smol") and "gemma3" in complete("llava show ge")
    # The shell named, not detected from the parent process (make runs tests under sh).
    script = llava(
        "--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert script.returncode == 0 and b"_llava_completion" in script.stdout


@pytest.mark.slow
def test_the_command_reference_is_generated_and_checked(tmp_path: Path) -> None:
    script = [sys.executable, str(ROOT / "scripts" / "cli-reference.py")]
    fresh = subprocess.run([*script, "--check"], capture_output=True, text=True, check=False)
    assert fresh.returncode == 0, fresh.stderr  # docs/cli.md matches the help as it is
    stale = tmp_path / "cli.md"
    stale.write_text((ROOT / "docs" / "cli.md").read_text().replace("IMAGE...", "IMAGES"))
    # The README's option table (made from llava_cli.options.OPTIONS) is checked as well.
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("| 0.95 |", "| 0.9 |"))
    result = subprocess.run(
        [*script, "--check", "--output", str(stale), "--readme", str(readme)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path} is stale: run `make docs` and commit it" for path in (stale, readme)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_fits_80_columns(command: str) -> None:
    result = llava(*([command] if command else []), "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0
    assert max(map(len, result.stdout.decode().splitlines())) <= 80


@pytest.mark.slow
def test_a_bad_value_is_named_where_it_came_from() -> None:
    typed = llava("ask", "x.png", "--temperature", "hot")
    assert typed.stderr.decode() == (
        "Error: invalid value for '--temperature': must be a number — see llava ask --help\n"
    )
    from_env = llava("ask", "x.png", env={"LLAVA_CTX": "5"})
    assert from_env.stderr.decode() == (
        "Error: invalid value for LLAVA_CTX: must be at least 64, not 5 — see llava ask --help\n"
    )
    assert b"must be a whole number" in llava("ask", "x.png", "--top-k", "1.5").stderr

"""The environment is read in one place (config.py), once per command, into one record: each
variable has one reading wherever it is used, ``HF_HUB_OFFLINE`` acts as ``--offline``, and a
bad value is an error only where it is used."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_cli import config, guard
from llava_cli.errors import ConfigError

from .conftest import llava

PACKAGE = Path(__file__).resolve().parents[1] / "llava_cli"

ON = ["1", "yes", "true", "on", "TRUE", "Yes", " 1 ", "2", "debug"]
OFF = ["", "0", "false", "no", "off", "False", "NO", "Off", " 0 "]


@pytest.mark.parametrize(("value", "on"), [(v, True) for v in ON] + [(v, False) for v in OFF])
def test_llava_debug_reads_the_same_everywhere(
    value: str, on: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The record, the error guard (a traceback, or one line) and llama.cpp's log router
    (its debug lines) agree on every spelling."""
    from llava_cli.engine import native

    assert config.read_environment({"LLAVA_DEBUG": value}).debug is on
    monkeypatch.setenv("LLAVA_DEBUG", value)
    assert config.debug_enabled() is on

    def failing() -> int:
        raise ConfigError("a setting is wrong", "fix it")

    assert guard.guarded(failing) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert ("Traceback (most recent call last)" in err) is on, err
    assert err.splitlines()[-1] == "Error: a setting is wrong — fix it"
    native.init(False)
    assert native.LOGS.debug is on


def test_llava_debug_unset_is_off() -> None:
    assert config.read_environment({}).debug is False


def test_hub_offline_reads_as_huggingface_hub_does() -> None:
    for value in ("1", "ON", "yes", "True", " 1 "):
        assert config.read_environment({"HF_HUB_OFFLINE": value}).hub_offline
    for value in ("", "0", "off", "no", "2", "offline"):
        assert not config.read_environment({"HF_HUB_OFFLINE": value}).hub_offline
    assert config.read_environment({"TRANSFORMERS_OFFLINE": "1"}).hub_offline
    settings = config.read_environment({"HF_HUB_OFFLINE": "1"})
    assert settings.offline(False) and settings.offline(True)
    assert not config.read_environment({}).offline(False)
    assert config.read_environment({}).offline(True)


def test_the_record_reads_the_mapping_it_is_given(tmp_path: Path) -> None:
    settings = config.read_environment(
        {
            "LLAVA_HOME": str(tmp_path),
            "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_TOKEN": "hf_secret",
            "TERM": "dumb",
            "NO_COLOR": "1",
            "COLUMNS": "72",
            "LLAVA_CACHE_SIZE": "1GB",
            "HF_HUB_ETAG_TIMEOUT": "5",
        }
    )
    assert settings.paths == config.Paths(tmp_path, tmp_path, tmp_path / "cache")
    assert settings.config_file == tmp_path / "config.toml"
    assert settings.hub_cache == tmp_path / "hub"
    assert settings.hf_token_set and "hf_secret" not in repr(settings)  # never kept
    assert (settings.dumb_terminal, settings.no_color, settings.columns) == (True, True, 72)
    assert settings.cache_size == "1GB"
    assert settings.hub_timeouts == (("HF_HUB_ETAG_TIMEOUT", "5"),)
    settings.check_hub_timeouts()
    for columns in ("0", "-3", "wide", "²", ""):  # not a width: the terminal's own, or none
        assert config.read_environment({"COLUMNS": columns}).columns is None
    assert config.read_environment({"HF_HOME": str(tmp_path)}).hub_cache == tmp_path / "hub"


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e9", "86401", ""])
def test_a_bad_hub_timeout_is_refused_where_the_hub_is_used(value: str) -> None:
    settings = config.read_environment({"HF_HUB_DOWNLOAD_TIMEOUT": value})  # reading: fine
    with pytest.raises(ConfigError, match=r"HF_HUB_DOWNLOAD_TIMEOUT=.* seconds from 1 to 86400"):
        settings.check_hub_timeouts()


def test_a_command_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a command runs, the record it read as it started; after it, the environment
    as it is then (tests change it between runs in one process)."""
    monkeypatch.setenv("COLUMNS", "50")
    with config.reading_once() as settings:
        monkeypatch.setenv("COLUMNS", "60")
        assert config.environment() is settings and settings.columns == 50
        with config.reading_once() as inner:  # a command inside another shares it
            assert inner is settings
    assert config.environment().columns == 60


def test_a_changed_environment_is_seen_by_the_next_command_in_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llava_cli.cli import app

    runner = CliRunner()
    monkeypatch.setenv("LLAVA_CACHE_SIZE", "1GB")
    first = runner.invoke(app, ["cache", "info"])
    monkeypatch.setenv("LLAVA_CACHE_SIZE", "3GB")
    second = runner.invoke(app, ["cache", "info"])
    assert first.exit_code == second.exit_code == 0, first.stderr + second.stderr
    assert "of 1.0 GB (LLAVA_CACHE_SIZE)" in first.stdout
    assert "of 3.0 GB (LLAVA_CACHE_SIZE)" in second.stdout
    monkeypatch.delenv("LLAVA_CACHE_SIZE")
    unset = runner.invoke(app, ["cache", "info"])
    assert "of 2.1 GB (the default; LLAVA_CACHE_SIZE sets it)" in unset.stdout, unset.stdout


@pytest.mark.parametrize("value", ["nan", "12 parsecs", "2PiB"])
def test_a_bad_cache_size_stops_only_what_uses_the_cache(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llava_cli.cli import app

    runner = CliRunner()
    monkeypatch.setenv("LLAVA_CACHE_SIZE", value)
    for command in (["cache", "info"], ["cache", "clear"]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and refused.stdout == ""
        [line] = refused.stderr.splitlines()
        assert line.startswith("Error: LLAVA_CACHE_SIZE=") and "from 0 to 1 PiB" in line
    listed = runner.invoke(app, ["list"])  # no cache here: the bad value does not matter
    assert listed.exit_code == 0 and "LLAVA_CACHE_SIZE" not in listed.stderr


# -- HF_HUB_OFFLINE=1 is --offline, for each command that has --offline ------------------------

HUB_REPO = "someone/Some-GGUF"


def _offline_commands(images: Path) -> Iterator[tuple[str, list[str]]]:
    yield "ask", ["ask", str(images / "red.png"), "-m", HUB_REPO]
    yield "chat", ["chat", str(images / "red.png"), "-m", HUB_REPO]
    yield "pull", ["pull", HUB_REPO]
    yield "show", ["show", HUB_REPO]


def test_every_command_with_offline_has_a_case_here() -> None:
    """A new command with --offline must be added to the test below."""
    from typer.main import get_command

    from llava_cli.cli import app

    group = get_command(app)
    with_offline = {
        name
        for name, command in getattr(group, "commands", {}).items()
        if any("--offline" in p.opts for p in command.params)
    }
    assert with_offline == {name for name, _ in _offline_commands(Path("."))}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ask", "chat", "pull", "show"])
def test_hf_hub_offline_acts_as_the_offline_flag(command: str, images: Path) -> None:
    args = dict(_offline_commands(images))[command]
    hub = {"HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}  # port 9: refused
    by_env = llava(*args, env={**hub, "HF_HUB_OFFLINE": "1"})
    by_flag = llava(*args, "--offline", env={**hub, "HF_HUB_OFFLINE": "0"})
    online = llava(*args, env={**hub, "HF_HUB_OFFLINE": "0"})
    for result in (by_env, by_flag):
        assert (result.returncode, result.stdout) == (3, b""), result.stderr
    assert by_env.stderr == by_flag.stderr
    assert b"offline mode is on" in by_env.stderr
    assert online.returncode == 3 and b"cannot reach the hub" in online.stderr, online.stderr
    assert b"offline" not in online.stderr.split(b" \xe2\x80\x94 ")[0]  # the what, not the hint


# -- only config.py reads the environment ------------------------------------------------------

_READERS = {"getenv", "getenvb", "environb", "environ"}


def environment_reads(source: str) -> list[int]:
    """Lines where ``source`` reads the process environment through ``os``: ``os.getenv``,
    ``os.environ.get``, ``os.environ[...]``, ``... in os.environ``, ``dict(os.environ)``,
    ``from os import environ``. Writes (``os.environ[X] = ...``, ``del``, a ``pop`` whose
    value is dropped) are not reads."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            lines += [node.lineno for alias in node.names if alias.name in _READERS][:1]
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in _READERS
        ):
            continue
        parent = parents.get(node)
        if node.attr == "environ" and _writes(node, parent, parents):
            continue
        lines.append(node.lineno)
    return lines


def _writes(node: ast.AST, parent: ast.AST | None, parents: dict[ast.AST, ast.AST]) -> bool:
    if isinstance(parent, ast.Subscript) and parent.value is node:
        return isinstance(parent.ctx, ast.Store | ast.Del)
    if isinstance(parent, ast.Attribute) and parent.attr == "pop":
        call = parents.get(parent)
        return isinstance(call, ast.Call) and isinstance(parents.get(call), ast.Expr)
    return False


def test_the_environment_reader_finds_every_kind_of_read() -> None:
    reads = [
        "os.environ.get('A')",
        "os.getenv('A')",
        "x = os.environ['A']",
        "'A' in os.environ",
        "dict(os.environ)",
        "x = os.environ.pop('A')",
        "os.environ.copy()",
        "from os import environ",
        "from os import getenv as g",
    ]
    for line in reads:
        assert environment_reads(f"import os\n{line}\n") == [2], line
    writes = ["os.environ['A'] = '1'", "del os.environ['A']", "os.environ.pop('A', None)"]
    for line in writes:
        assert environment_reads(f"import os\n{line}\n") == [], line


@pytest.mark.slow
def test_only_config_reads_the_environment() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "engine" / "native.py" in modules  # it writes GGML_NO_BACKTRACE: allowed
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in modules
        if path.name != "config.py" or path.parent != PACKAGE
        if (lines := environment_reads(path.read_text(encoding="utf-8")))
    }
    assert found == {}, "read the environment in config.py (config.environment()) instead"
    assert environment_reads((PACKAGE / "config.py").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_debug_off_spelled_false_prints_one_line_not_a_traceback() -> None:
    """End to end, in a process of its own: ``LLAVA_DEBUG=false`` is off."""
    off = llava("cache", "info", env={"LLAVA_DEBUG": "false", "LLAVA_CACHE_SIZE": "nan"})
    on = llava("cache", "info", env={"LLAVA_DEBUG": "yes", "LLAVA_CACHE_SIZE": "nan"})
    assert off.returncode == 2 and len(off.stderr.decode().splitlines()) == 1, off.stderr
    assert on.returncode != 0 and b"Traceback" in on.stderr and b"ConfigError" in on.stderr


HOMELESS = (
    "import os, pwd, sys\n"
    "os.environ.pop('HOME', None)\n"
    "def no_entry(uid): raise KeyError(uid)\n"
    "pwd.getpwuid = no_entry  # no passwd entry either: a container's or systemd's user\n"
    "sys.argv[0] = 'llava'\n"
    "from llava_cli import cli\n"
    "cli.main()\n"
)


def homeless(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LLAVA_HOME", "HF_HOME", "HOME")}
    return subprocess.run(
        [sys.executable, "-c", HOMELESS, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_no_home_folder_fails_only_what_needs_one(tmp_path: Path) -> None:
    """No HOME and no passwd entry: --version and a named file still work; what needs
    llava's folders says how to name one (exit 2), and naming them is enough."""
    assert homeless("--version").stdout == "llava 0.1.0\n"
    missing = homeless("show", str(tmp_path / "none.gguf"))
    assert missing.returncode == 4 and "does not exist" in missing.stderr, missing.stderr
    listed = homeless("list")
    assert listed.returncode == 2, listed.stderr
    assert listed.stderr == (
        "Error: cannot find your home folder, where llava's files live by default — "
        "set HOME, or LLAVA_HOME (and HF_HOME) to a folder of your choice\n"
    )
    named = homeless("list", LLAVA_HOME=str(tmp_path / "l"), HF_HOME=str(tmp_path / "h"))
    assert named.returncode == 0, named.stderr

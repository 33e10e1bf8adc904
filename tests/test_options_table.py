"""The one table of shared options (llava_cli.options.OPTIONS) and everything made from it:
the Typer options of `ask` and `chat`, the records they build, chat's /set, and the README."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from typer import BadParameter
from typer.core import TyperOption
from typer.main import get_command

from llava_cli.cli import app
from llava_cli.errors import UsageError
from llava_cli.options import (
    OPTIONS,
    RECORDS,
    SETTINGS,
    Option,
    RuntimeOptions,
    SamplingParams,
    model_fields,
)
from llava_cli.slash import COMMANDS, settings_of, with_setting

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cli-reference.py"
SHARED = ["ask", "chat"]


def command(name: str) -> Any:
    """The command as Typer builds it (on its own copy of click)."""
    return getattr(get_command(app), "commands", {})[name]


def parsed(name: str, *args: str) -> dict[str, Any]:
    """What click makes of ``llava NAME ARGS`` (ranges checked), without running it."""
    with command(name).make_context(name, ["x.png", *args]) as context:
        return dict(context.params)


def outside(option: Option) -> list[str]:
    """Values just beyond each end of an option's range, as typed."""
    assert option.low is not None and option.high is not None
    step = 1 if option.kind is int else 0.5
    return [option.shown(option.low - step), option.shown(option.high + step)]


@pytest.mark.parametrize("name", SHARED)
def test_every_option_of_the_table_is_an_option_of_both_commands(name: str) -> None:
    params = {param.name: param for param in command(name).params}
    for option in OPTIONS.values():
        param = params[option.param]
        assert isinstance(param, TyperOption), option.name
        assert param.opts[0] == f"--{option.name}"
        # a flag is one flag, never --x/--no-x, unless the table pairs it (--repack/--no-repack)
        paired = [f"--no-{option.name}"] if option.paired else []
        assert param.secondary_opts == paired
        assert param.opts[1:] == ([option.short] if option.short else [])
        assert param.envvar == option.env
        assert param.default == (None if option.repeated else option.default)
        assert param.multiple == option.repeated
        assert getattr(param, "rich_help_panel", None) == option.panel
        help = param.help or ""
        assert option.help in help
        if option.bounded:
            assert option.span in help and param.metavar in ("N", "NUMBER")


@pytest.mark.slow
def test_the_defaults_are_the_records_own() -> None:
    """An option that sets a record's field has the record's default, and the records built
    from every option at its default are the records' defaults."""
    defaults = model_fields({option.param: option.default for option in OPTIONS.values()})
    assert defaults["sampling"] == SamplingParams()
    assert defaults["runtime"] == RuntimeOptions()
    for option in OPTIONS.values():
        if option.record:
            record = RECORDS[option.record]()
            assert option.field_value(option.default) == getattr(record, option.field_name)
    for name in SHARED:  # nothing typed: each at its default (none of --stop: no stops)
        assert all(parsed(name)[o.param] == o.default for o in OPTIONS.values())


def test_the_records_are_built_by_keyword_from_what_was_typed() -> None:
    typed = ["--top-p", "0.5", "--stop", "a", "--stop", "b", "--no-cache", "--ctx", "128"]
    typed += ["--gpu-layers", "0", "-m", "some-model", "--max-pixels", "7", "--seed", "3"]
    for name in SHARED:
        fields = model_fields(parsed(name, *typed))
        assert fields["sampling"] == SamplingParams(top_p=0.5, stop=("a", "b"), seed=3)
        assert fields["runtime"] == RuntimeOptions(ctx=128, gpu_layers=0, cache=False)
        assert fields["model"] == "some-model" and fields["max_pixels"] == 7


@pytest.mark.parametrize("option", [o for o in OPTIONS.values() if o.bounded], ids=lambda o: o.name)
def test_each_range_is_checked_on_the_command_line_and_in_the_environment(
    option: Option, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert option.low is not None and option.high is not None
    ends = [option.shown(option.low), option.shown(option.high)]
    for name in SHARED:
        for value in ends:
            assert parsed(name, f"--{option.name}", value.replace(",", ""))[option.param] in (
                option.low,
                option.high,
            )
        below, above = outside(option)
        with pytest.raises(BadParameter, match=f"must be {option.span}, not"):
            parsed(name, f"--{option.name}", below.replace(",", ""))
        # past the top: the range, or (where the help leaves it unsaid) the C int's limit
        top = f"must be (at most {option.shown(option.high)}|{option.span}), not"
        with pytest.raises(BadParameter, match=top):
            parsed(name, f"--{option.name}", above.replace(",", ""))
        if option.env:
            monkeypatch.setenv(option.env, above.replace(",", ""))
            with pytest.raises(BadParameter, match=top):
                parsed(name)
            monkeypatch.delenv(option.env)


def test_set_takes_its_names_parsing_and_ranges_from_the_table() -> None:
    assert tuple(o.name for o in OPTIONS.values() if o.settable) == SETTINGS
    assert ", ".join(SETTINGS) in COMMANDS["/set"]
    assert list(settings_of(SamplingParams())) == list(SETTINGS)
    for key in SETTINGS:
        option = OPTIONS[key]
        assert option.record == "sampling" and option.bounded
        assert option.low is not None and option.high is not None
        for end in (option.low, option.high):
            changed = with_setting(SamplingParams(), key, option.shown(end).replace(",", ""))
            assert settings_of(changed)[key] == end
        for value in outside(option):
            with pytest.raises(UsageError, match=f"{key} must be between"):
                with_setting(SamplingParams(), key, value.replace(",", ""))
        unset = with_setting(SamplingParams(), key, "none") if option.optional else None
        assert unset is None or settings_of(unset)[key] is None
    for option in OPTIONS.values():
        if not option.settable:  # /set changes sampling only: the rest need a reload
            with pytest.raises(UsageError, match="unknown setting"):
                with_setting(SamplingParams(), option.name, "1")


def test_the_readme_table_is_the_table() -> None:
    """The rows between the README's markers are the table's, in its order; the script that
    writes them (``make docs``) would change nothing. test_help checks that ``--check``
    fails on a stale one."""
    spec = importlib.util.spec_from_file_location("cli_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert script.readme(readme) == readme
    table = readme.split(script.TABLE_BEGIN, 1)[1].split(script.TABLE_END, 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for row, option in zip(rows, OPTIONS.values(), strict=True):
        assert f"{option.flags}`" in row and (option.env is None or f"`{option.env}`" in row)
        assert not option.bounded or f"| {option.span} |" in row


# What users rely on, written out once more on purpose: a default or an environment variable
# that changes is a change in behaviour (scripts and shell profiles set these), never a
# side effect of editing the table. (Values as llava 0.1.0 shipped them.)
PUBLISHED = {
    "model": (None, "LLAVA_MODEL"),
    "mmproj": (None, "LLAVA_MMPROJ"),
    "offline": (False, None),
    "yes": (False, "LLAVA_YES"),
    "chat-format": ("auto", "LLAVA_CHAT_FORMAT"),
    "think": (False, "LLAVA_THINK"),
    "system": (None, "LLAVA_SYSTEM"),
    "temperature": (0.2, "LLAVA_TEMPERATURE"),
    "top-p": (0.95, None),
    "top-k": (40, None),
    "min-p": (0.05, None),
    "repeat-penalty": (1.1, None),
    "seed": (None, "LLAVA_SEED"),
    "max-tokens": (None, "LLAVA_MAX_TOKENS"),
    "stop": ((), None),
    "ctx": (None, "LLAVA_CTX"),
    "verbose": (False, "LLAVA_VERBOSE"),
    "threads": (0, "LLAVA_THREADS"),
    "gpu-layers": (-1, "LLAVA_GPU_LAYERS"),
    "image-on-cpu": (False, "LLAVA_IMAGE_ON_CPU"),
    "rpc": (None, "LLAVA_RPC"),
    "tensor-split": (None, "LLAVA_TENSOR_SPLIT"),
    "repack": (None, "LLAVA_REPACK"),
    "no-cache": (False, "LLAVA_NO_CACHE"),
    "max-pixels": (100_000_000, "LLAVA_MAX_PIXELS"),
    "max-image-bytes": (256 * 1024 * 1024, "LLAVA_MAX_IMAGE_BYTES"),
}


def test_the_published_defaults_and_environment_variables_hold() -> None:
    assert {name: (o.default, o.env) for name, o in OPTIONS.items()} == PUBLISHED


def test_another_command_can_take_any_number_of_the_table() -> None:
    """``number`` (``llava show --ctx``): any numeric entry, its range kept, no env var."""
    from llava_cli.cli_options import number

    for option in (o for o in OPTIONS.values() if o.bounded):
        info = number(option.name, "Its own help")
        assert info.envvar is None and info.help is not None
        assert info.help.startswith("Its own help") and option.span in info.help


def test_a_number_past_a_c_int_names_that_limit() -> None:
    """The help says "at least 1" for --max-tokens; 3e9 is refused naming the real limit."""
    for name in SHARED:
        with pytest.raises(BadParameter, match=r"must be at most 2,147,483,647, not 3000000000"):
            parsed(name, "--max-tokens", "3000000000")

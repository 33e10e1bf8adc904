"""The command line's shared pieces: the Typer options made from options.OPTIONS (the one
table of the options ``ask`` and ``chat`` share) and added to both commands by
``with_shared_options``, and the help layout (options grouped under headings, plain text).
cli.py wires the commands from them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from .options import HEADINGS, OPTIONS, OTHER, Option


class Command(TyperCommand):
    """Help with the options grouped under headings (Model, Generation, Output, Hardware,
    Input limits), in plain text: no colour, no box drawing, the same in a pipe. Arguments
    show their metavar as written (``IMAGE... [QUESTION]``), not a Python type."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar or (param.name or "").upper())
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments: list[tuple[str, str]] = []
        groups: dict[str, list[tuple[str, str]]] = {heading: [] for heading in HEADINGS}
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                arguments.append(
                    (param.metavar or (param.name or "").upper(), getattr(param, "help", ""))
                )
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                heading = getattr(param, "rich_help_panel", None) or OTHER
                groups.setdefault(heading, []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        grouped = any(records for heading, records in groups.items() if heading != OTHER)
        for heading, records in groups.items():
            if records:
                with formatter.section(heading if grouped else "Options"):
                    formatter.write_dl(records)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        """The epilog (examples, the chat's commands) as written: headings flush left like
        the option groups, lines never rewrapped."""
        if self.epilog:
            formatter.write("\n" + self.epilog.rstrip() + "\n")


class Group(TyperGroup):
    """``llava --help`` lists each command with its whole summary, never cut off."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.short_help or command.get_short_help_str(200)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def complete_models(incomplete: str) -> list[str]:
    """Tab completion for --model: the registry's names and aliases, and pulled models."""
    from . import registry, store

    try:
        reg = registry.load()
        names = {*reg.models, *(a for spec in reg.models.values() for a in spec.aliases)}
        names.update(r.ref for r in store.records())
    except Exception:  # a broken user registry must not break the shell's completion
        return []
    return sorted(n for n in names if n.startswith(incomplete))


COMPLETIONS: dict[str, Callable[[str], list[str]]] = {"models": complete_models}


def help_text(option: Option) -> str:
    """An option's --help text: its help, its default in words, its range (``Keep only the k
    likeliest tokens; 0 = off; at least 0.``)."""
    sentences = [option.help] if option.help else []
    if option.default_text:
        sentences.append(f"Default: {option.default_text}")
    text = ". ".join(sentences)
    if option.bounded:
        text = f"{text}; {option.span}" if text else option.span.capitalize()
    return f"{text}." if text else ""


def typer_option(option: Option) -> typer.models.OptionInfo:
    """The Typer option for an entry of options.OPTIONS: its flags, env var, metavar and
    help; a number checked against its range there (the message names the range)."""

    def check(value: float | None) -> float | None:
        if value is not None and not option.allows(value):
            raise typer.BadParameter(option.refusal(value))
        return value

    metavar = option.metavar
    if option.kind in (int, float):
        metavar = "N" if option.kind is int else "NUMBER"
    flags = [option.flags, *([option.short] if option.short else [])]
    info: typer.models.OptionInfo = typer.Option(
        *flags,
        callback=check if option.bounded else None,
        metavar=metavar,
        envvar=option.env,
        autocompletion=COMPLETIONS[option.completion] if option.completion else None,
        help=help_text(option),
        rich_help_panel=option.panel,
    )
    return info


def annotation(option: Option) -> Any:
    """The parameter's annotation, as Typer reads it: the type, then the option."""
    kind: Any = option.kind
    if option.repeated:
        kind = list[kind] | None
    elif option.optional:
        kind = kind | None
    return Annotated[kind, typer_option(option)]


def number(name: str, help: str) -> typer.models.OptionInfo:
    """A numeric option of the table on another command (``llava show --ctx``): its own
    help, no environment variable, the same range checked the same way."""
    return typer_option(replace(OPTIONS[name], help=help, env=None, default_text=""))


def given_options(context: typer.Context, names: tuple[str, ...]) -> frozenset[str]:
    """Which of these options (options.OPTIONS's names) were set on the command line or in
    the environment (not left at their defaults): a resumed chat's saved settings yield to
    them."""
    given = set()
    for name in names:
        source = context.get_parameter_source(OPTIONS[name].param)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(name)
    return frozenset(given)


CommandFunction = TypeVar("CommandFunction", bound=Callable[..., None])


def with_shared_options(after: str) -> Callable[[CommandFunction], CommandFunction]:
    """Give a command the options of options.OPTIONS, right after its parameter ``after``
    (--help lists each heading's options in this order). The command takes them as
    ``**shared``, by parameter name (``top_p``); its signature, which Typer reads for the
    options, names each one."""

    def add(command: CommandFunction) -> CommandFunction:
        signature = inspect.signature(command, eval_str=True)
        *own, shared = signature.parameters.values()
        assert shared.kind is inspect.Parameter.VAR_KEYWORD, "the command takes **shared"
        names = [parameter.name for parameter in own]
        assert not set(names) & {option.param for option in OPTIONS.values()}, names
        at = names.index(after) + 1
        added = [
            inspect.Parameter(
                option.param,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                # a repeated option given no times is None to Typer, () in the record
                default=None if option.repeated else option.default,
                annotation=annotation(option),
            )
            for option in OPTIONS.values()
        ]
        parameters = [*own[:at], *added, *own[at:]]
        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return command

    return add

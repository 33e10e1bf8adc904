"""The command line's shared pieces: option declarations used by more than one command, the
numeric options checked against options.LIMITS, and the help layout (options grouped under
headings, plain text). cli.py wires the commands from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from .options import INT32_MAX, LIMITS, RuntimeOptions, SamplingParams

MODEL = "Model"
GEN = "Generation"
OUTPUT = "Output"
HARDWARE = "Hardware"
LIMITS_HEADING = "Input limits"
OTHER = "Other options"
CONVERSATION = "Conversation"
HEADINGS = (CONVERSATION, MODEL, GEN, OUTPUT, HARDWARE, LIMITS_HEADING, OTHER)  # --help's order


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


def number(
    name: str, help: str = "", *, envvar: str | None = None, panel: str = GEN
) -> typer.models.OptionInfo:
    """A numeric option, checked against its range in the one table of limits
    (options.LIMITS, which /set and saved chats use too); the range goes in its help."""
    limit = LIMITS[name]
    shown = (
        f"{limit.kind(n):,}" if limit.kind is int else f"{n:g}" for n in (limit.low, limit.high)
    )
    low, high = shown
    span = f"at least {low}" if limit.high == INT32_MAX else f"{low} to {high}"

    def check(value: float | None) -> float | None:
        if value is not None and not limit.allows(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise typer.BadParameter(f"must be {span}, not {shown}")
        return value

    metavar = "N" if limit.kind is int else "NUMBER"
    text = f"{help}; {span}." if help else f"{span[:1].upper()}{span[1:]}."
    option: typer.models.OptionInfo = typer.Option(
        callback=check, metavar=metavar, envvar=envvar, help=text, rich_help_panel=panel
    )
    return option


# Options shared by `ask` and `chat`: declared once, used by both signatures.
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


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="LLAVA_MODEL",
        metavar="REF",
        autocompletion=complete_models,
        help="NAME[:QUANT] from the registry (llava list -a), OWNER/REPO[:QUANT] on the hub, "
        "or a GGUF file. Default: config.toml's model, else the registry default. "
        "Pulled if missing.",
        rich_help_panel=MODEL,
    ),
]
MmprojOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LLAVA_MMPROJ",
        metavar="FILE",
        help="Projector (mmproj) GGUF file, with a --model file. "
        "Default: the one *mmproj*.gguf beside the model.",
        rich_help_panel=MODEL,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Never touch the network: a model that is not pulled is an error (exit 3). "
        "Also HF_HUB_OFFLINE=1.",
        rich_help_panel=MODEL,
    ),
]
YesOpt = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        envvar="LLAVA_YES",
        help="Pull a missing model without asking, however large (on a terminal llava asks "
        "before fetching more than 1 GB; in a pipe it never asks).",
        rich_help_panel=MODEL,
    ),
]
ChatFormatOpt = Annotated[
    str,
    typer.Option(
        envvar="LLAVA_CHAT_FORMAT",
        metavar="FORMAT",
        help="auto (the registry's format, else the model's own template, else llava), gguf "
        "(the GGUF's template), llava (LLaVA-1.5/Vicuna), or a llama.cpp built-in name "
        "(vicuna, chatml, mistral-v7, llama2, gemma, …; a typo lists them all).",
        rich_help_panel=MODEL,
    ),
]
ThinkOpt = Annotated[
    bool,
    typer.Option(
        "--think",
        envvar="LLAVA_THINK",
        help="Let a reasoning model think before it answers (off where its template allows). "
        "The thinking goes to stderr on a terminal, or to the JSON 'thinking' field.",
        rich_help_panel=GEN,
    ),
]
SystemOpt = Annotated[
    str | None,
    typer.Option(envvar="LLAVA_SYSTEM", metavar="TEXT", help="System prompt.", rich_help_panel=GEN),
]
TemperatureOpt = Annotated[
    float, number("temperature", "0 = always the likeliest token", envvar="LLAVA_TEMPERATURE")
]
TopPOpt = Annotated[float, number("top-p")]
TopKOpt = Annotated[int, number("top-k", "0 = off")]
MinPOpt = Annotated[float, number("min-p")]
RepeatPenaltyOpt = Annotated[float, number("repeat-penalty", "1 = off")]
SeedOpt = Annotated[int | None, number("seed", "Default: random", envvar="LLAVA_SEED")]
MaxTokensOpt = Annotated[
    int | None, number("max-tokens", "Default: until done", envvar="LLAVA_MAX_TOKENS")
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option(metavar="TEXT", help="Stop at this text (repeatable).", rich_help_panel=GEN),
]
CtxOpt = Annotated[
    int | None,
    number(
        "ctx",
        "Context size in tokens, at most the model's training context. "
        "Default: 4096, or less if the model has less",
        envvar="LLAVA_CTX",
    ),
]
ThreadsOpt = Annotated[
    int, number("threads", "0 = one per CPU", envvar="LLAVA_THREADS", panel=HARDWARE)
]
GpuLayersOpt = Annotated[
    int,
    number(
        "gpu-layers",
        "Layers to offload to the GPU; -1 = all (where supported), 0 = none",
        envvar="LLAVA_GPU_LAYERS",
        panel=HARDWARE,
    ),
]
ImageOnCpuOpt = Annotated[
    bool,
    typer.Option(
        "--image-on-cpu",
        envvar="LLAVA_IMAGE_ON_CPU",
        help="Keep the image encoder on the CPU.",
        rich_help_panel=HARDWARE,
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        envvar="LLAVA_NO_CACHE",
        help="Do not reuse or keep image prefixes between runs (the prefix cache).",
        rich_help_panel=HARDWARE,
    ),
]
MaxPixelsOpt = Annotated[
    int,
    number(
        "max-pixels",
        "Refuse images with more pixels than this",
        envvar="LLAVA_MAX_PIXELS",
        panel=LIMITS_HEADING,
    ),
]
MaxImageBytesOpt = Annotated[
    int,
    number(
        "max-image-bytes",
        "Refuse image files (or standard input) larger than this many bytes, "
        "checked as they arrive (default 256 MiB)",
        envvar="LLAVA_MAX_IMAGE_BYTES",
        panel=LIMITS_HEADING,
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        envvar="LLAVA_VERBOSE",
        help="Details and llama.cpp logs on stderr.",
        rich_help_panel=OUTPUT,
    ),
]


def model_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """The fields ``ask`` and ``chat`` share (commands.ask.ModelOptions), by keyword, from
    the command's parsed parameters (``typer.Context.params``): written once for both."""
    return {
        "model": params["model"],
        "mmproj": params["mmproj"],
        "system": params["system"],
        "sampling": SamplingParams(
            temperature=params["temperature"],
            top_p=params["top_p"],
            top_k=params["top_k"],
            min_p=params["min_p"],
            repeat_penalty=params["repeat_penalty"],
            seed=params["seed"],
            max_tokens=params["max_tokens"],
            stop=tuple(params["stop"] or ()),
        ),
        "runtime": RuntimeOptions(
            ctx=params["ctx"],
            threads=params["threads"],
            gpu_layers=params["gpu_layers"],
            image_on_cpu=params["image_on_cpu"],
            chat_format=params["chat_format"],
            verbose=params["verbose"],
            cache=not params["no_cache"],
        ),
        "max_pixels": params["max_pixels"],
        "max_image_bytes": params["max_image_bytes"],
        "offline": params["offline"],
        "yes": params["yes"],
        "think": params["think"],
    }

"""The Typer app: wires commands to their modules and maps errors to messages and exit codes.

No logic lives here, and nothing heavy is imported at module level: ``llava --help`` must not
load llama.cpp, numpy or Pillow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_RUNTIME, LlavaError
from .options import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    INT32_MAX,
    LIMITS,
    RuntimeOptions,
    SamplingParams,
)
from .templates import MEDIA_MARKER

_MODEL = "Model"
_GEN = "Generation"
_OUTPUT = "Output"
_HARDWARE = "Hardware"
_LIMITS = "Input limits"
_OTHER = "Other options"
_HEADINGS = (_MODEL, _GEN, _OUTPUT, _HARDWARE, _LIMITS, _OTHER)  # in this order in --help


class _Command(TyperCommand):
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
        groups: dict[str, list[tuple[str, str]]] = {heading: [] for heading in _HEADINGS}
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                arguments.append(
                    (param.metavar or (param.name or "").upper(), getattr(param, "help", ""))
                )
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                heading = getattr(param, "rich_help_panel", None) or _OTHER
                groups.setdefault(heading, []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        grouped = any(records for heading, records in groups.items() if heading != _OTHER)
        for heading, records in groups.items():
            if records:
                with formatter.section(heading if grouped else "Options"):
                    formatter.write_dl(records)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        """The epilog (examples, the chat's commands) as written: headings flush left like
        the option groups, lines never rewrapped."""
        if self.epilog:
            formatter.write("\n" + self.epilog.rstrip() + "\n")


class _Group(TyperGroup):
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


app = typer.Typer(
    name="llava",
    cls=_Group,
    help="Local chat with images: ask a LLaVA-style model about a photo, screenshot or scan, "
    "entirely on this machine.\n\n"
    "\b\n"
    "Start here:\n"
    "  llava ask photo.jpg 'What is in this picture?'\n"
    "  llava chat screenshot.png\n"
    "  llava list --available",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # LLAVA_DEBUG tracebacks never print variables (tokens)
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llava {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Local chat with images."""


def _number(
    name: str, help: str = "", *, envvar: str | None = None, panel: str = _GEN
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
def _complete_models(incomplete: str) -> list[str]:
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
        autocompletion=_complete_models,
        help="NAME[:QUANT] from the registry (llava list -a), OWNER/REPO[:QUANT] on the hub, "
        "or a GGUF file. Default: config.toml's model, else the registry default. "
        "Pulled if missing.",
        rich_help_panel=_MODEL,
    ),
]
MmprojOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LLAVA_MMPROJ",
        metavar="FILE",
        help="Projector (mmproj) GGUF file, with a --model file. "
        "Default: the one *mmproj*.gguf beside the model.",
        rich_help_panel=_MODEL,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Never touch the network: a model that is not pulled is an error (exit 3). "
        "Also HF_HUB_OFFLINE=1.",
        rich_help_panel=_MODEL,
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
        rich_help_panel=_MODEL,
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
        rich_help_panel=_MODEL,
    ),
]
ThinkOpt = Annotated[
    bool,
    typer.Option(
        "--think",
        envvar="LLAVA_THINK",
        help="Let a reasoning model think before it answers (off where its template allows). "
        "The thinking goes to stderr on a terminal, or to the JSON 'thinking' field.",
        rich_help_panel=_GEN,
    ),
]
SystemOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LLAVA_SYSTEM", metavar="TEXT", help="System prompt.", rich_help_panel=_GEN
    ),
]
TemperatureOpt = Annotated[
    float, _number("temperature", "0 = always the likeliest token", envvar="LLAVA_TEMPERATURE")
]
TopPOpt = Annotated[float, _number("top-p")]
TopKOpt = Annotated[int, _number("top-k", "0 = off")]
MinPOpt = Annotated[float, _number("min-p")]
RepeatPenaltyOpt = Annotated[float, _number("repeat-penalty", "1 = off")]
SeedOpt = Annotated[int | None, _number("seed", "Default: random", envvar="LLAVA_SEED")]
MaxTokensOpt = Annotated[
    int | None, _number("max-tokens", "Default: until done", envvar="LLAVA_MAX_TOKENS")
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option(metavar="TEXT", help="Stop at this text (repeatable).", rich_help_panel=_GEN),
]
CtxOpt = Annotated[
    int | None,
    _number(
        "ctx",
        "Context size in tokens, at most the model's training context. "
        "Default: 4096, or less if the model has less",
        envvar="LLAVA_CTX",
    ),
]
ThreadsOpt = Annotated[
    int, _number("threads", "0 = one per CPU", envvar="LLAVA_THREADS", panel=_HARDWARE)
]
GpuLayersOpt = Annotated[
    int,
    _number(
        "gpu-layers",
        "Layers to offload to the GPU; -1 = all (where supported), 0 = none",
        envvar="LLAVA_GPU_LAYERS",
        panel=_HARDWARE,
    ),
]
ImageOnCpuOpt = Annotated[
    bool,
    typer.Option(
        "--image-on-cpu",
        envvar="LLAVA_IMAGE_ON_CPU",
        help="Keep the image encoder on the CPU.",
        rich_help_panel=_HARDWARE,
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        envvar="LLAVA_NO_CACHE",
        help="Do not reuse or keep image prefixes between runs (the prefix cache).",
        rich_help_panel=_HARDWARE,
    ),
]
MaxPixelsOpt = Annotated[
    int,
    _number(
        "max-pixels",
        "Refuse images with more pixels than this",
        envvar="LLAVA_MAX_PIXELS",
        panel=_LIMITS,
    ),
]
MaxImageBytesOpt = Annotated[
    int,
    _number(
        "max-image-bytes",
        "Refuse image files (or standard input) larger than this many bytes, "
        "checked as they arrive (default 256 MiB)",
        envvar="LLAVA_MAX_IMAGE_BYTES",
        panel=_LIMITS,
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        envvar="LLAVA_VERBOSE",
        help="Details and llama.cpp logs on stderr.",
        rich_help_panel=_OUTPUT,
    ),
]


def _sampling(
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repeat_penalty: float,
    seed: int | None,
    max_tokens: int | None,
    stop: list[str] | None,
) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        seed=seed,
        max_tokens=max_tokens,
        stop=tuple(stop or ()),
    )


def _runtime(
    ctx: int | None,
    threads: int,
    gpu_layers: int,
    image_on_cpu: bool,
    chat_format: str,
    verbose: bool,
    no_cache: bool,
) -> RuntimeOptions:
    return RuntimeOptions(
        ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        image_on_cpu=image_on_cpu,
        chat_format=chat_format,
        verbose=verbose,
        cache=not no_cache,
    )


def _question(arguments: list[str], prompt: str | None, flag: str) -> tuple[list[str], str | None]:
    """``IMAGE... [QUESTION]`` split (commands.ask.split_arguments); a question given both
    as words and with the flag is a usage error."""
    from .commands.ask import split_arguments
    from .errors import UsageError

    images, words = split_arguments(arguments)
    if words is not None and prompt is not None:
        raise UsageError(
            f"two questions given: {flag} and {words!r}",
            f"give one (if {words!r} is an image, check its path)",
        )
    return images, words if words is not None else prompt


@app.command(
    cls=_Command,
    short_help="Answer a question about each image, once; the answer alone goes to stdout.",
    epilog="Examples:\n"
    "  llava ask photo.jpg 'What is in this picture?'\n"
    "  llava ask scan.png -p 'Transcribe the text.' -m smolvlm-500m\n"
    "  llava ask a.png b.png 'Which room is this?'     (==> a.png <== before each answer)\n"
    "  llava ask receipt.jpg --json-schema receipt.json --json | jq .parsed\n"
    "  echo 'Is there a cat?' | llava ask photo.jpg\n"
    "  curl -s https://example.org/x.png | llava ask - 'Describe it.'",
)
def ask(
    arguments: Annotated[
        list[str],
        typer.Argument(
            metavar="IMAGE... [QUESTION]",
            help="Image files (JPEG, PNG, WebP, GIF, BMP, TIFF), or - for stdin, then the "
            "question (or use -p). Default question: text piped on stdin, else "
            "'Describe this image.'",
            show_default=False,
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", metavar="TEXT", help="The question.", rich_help_panel=_GEN),
    ] = None,
    model: ModelOpt = None,
    mmproj: MmprojOpt = None,
    offline: OfflineOpt = False,
    yes: YesOpt = False,
    chat_format: ChatFormatOpt = "auto",
    think: ThinkOpt = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.2,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.1,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    ctx: CtxOpt = None,
    json_schema: Annotated[
        str | None,
        typer.Option(
            metavar="SCHEMA",
            help="Constrain the answer to this JSON schema (a file, or inline JSON): it is "
            "valid JSON for the schema, or the command fails (exit 1).",
            rich_help_panel=_GEN,
        ),
    ] = None,
    grammar: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Constrain the answer to this GBNF grammar (llama.cpp's format).",
            rich_help_panel=_GEN,
        ),
    ] = None,
    together: Annotated[
        bool,
        typer.Option(
            "--together", help="Send all images in one prompt; one answer.", rich_help_panel=_GEN
        ),
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="One JSON object per image (JSON Lines).", rich_help_panel=_OUTPUT
        ),
    ] = False,
    label: Annotated[
        bool | None,
        typer.Option(
            "--label/--no-label",
            help="Write '==> IMAGE <==' before each answer, as head(1) does. "
            "Default: when there are several images.",
            rich_help_panel=_OUTPUT,
            show_default=False,
        ),
    ] = None,
    show_prompt: Annotated[
        bool,
        typer.Option(
            "--show-prompt",
            help="Print the exact prompt the model would read (template applied, "
            f"{MEDIA_MARKER} where each image goes) and exit; nothing is generated.",
            rich_help_panel=_OUTPUT,
        ),
    ] = False,
    verbose: VerboseOpt = False,
    threads: ThreadsOpt = 0,
    gpu_layers: GpuLayersOpt = -1,
    image_on_cpu: ImageOnCpuOpt = False,
    no_cache: NoCacheOpt = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_image_bytes: MaxImageBytesOpt = DEFAULT_MAX_IMAGE_BYTES,
) -> None:
    """Answer a question about each image, once. The answer alone goes to stdout: with
    several images, each after a '==> IMAGE <==' line (or one JSON line each with --json)."""
    from .commands import ask as command

    def run() -> int:
        images, question = _question(arguments, prompt, "-p")
        opts = command.AskOptions(
            images=images,
            prompt=question,
            model=model,
            mmproj=mmproj,
            system=system,
            sampling=_sampling(
                temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop
            ),
            runtime=_runtime(
                ctx, threads, gpu_layers, image_on_cpu, chat_format, verbose, no_cache
            ),
            max_pixels=max_pixels,
            max_image_bytes=max_image_bytes,
            together=together,
            json=json_out,
            label=label,
            offline=offline,
            yes=yes,
            think=think,
            show_prompt=show_prompt,
            json_schema=json_schema,
            grammar=grammar,
        )
        return command.run(opts)

    raise typer.Exit(guarded(run))


def _slash_commands() -> str:
    """chat --help's list of slash commands, from the table the chat itself uses."""
    from .commands.slash import COMMANDS

    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "In the chat (Tab completes them):\n" + "\n".join(lines)


@app.command(
    cls=_Command,
    short_help="Talk about images: streamed answers, slash commands, nothing read twice.",
    epilog=_slash_commands() + "\n\nExamples:\n"
    "  llava chat photo.jpg\n"
    "  llava chat photo.jpg 'What is unusual here?'   (answers, then waits for more)\n"
    "  llava chat -c                                 (the last chat, where it ended)\n"
    "  llava chat --resume trip.json\n"
    "  llava chat -m gemma3 < questions.txt          (one message per line, answers only)",
)
def chat(
    arguments: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[IMAGE]... [MESSAGE]",
            help="Images to attach to the first message, then the first message itself.",
            show_default=False,
        ),
    ] = None,
    continue_last: Annotated[
        bool,
        typer.Option(
            "--continue", "-c", help="Resume the last chat, as it ended.", rich_help_panel=_GEN
        ),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="Resume a chat saved with /save.", rich_help_panel=_GEN),
    ] = None,
    model: ModelOpt = None,
    mmproj: MmprojOpt = None,
    offline: OfflineOpt = False,
    yes: YesOpt = False,
    chat_format: ChatFormatOpt = "auto",
    think: ThinkOpt = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.2,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.1,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    ctx: CtxOpt = None,
    verbose: VerboseOpt = False,
    threads: ThreadsOpt = 0,
    gpu_layers: GpuLayersOpt = -1,
    image_on_cpu: ImageOnCpuOpt = False,
    no_cache: NoCacheOpt = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_image_bytes: MaxImageBytesOpt = DEFAULT_MAX_IMAGE_BYTES,
) -> None:
    """Talk about images: answers stream as they are written; slash commands (/help) attach
    images, retry, undo, save and load. Nothing the model has read is read again."""
    from .commands import chat as command

    def run() -> int:
        images, message = _question(arguments or [], None, "")
        opts = command.ChatOptions(
            images=images,
            prompt=message,
            continue_last=continue_last,
            resume=resume,
            model=model,
            mmproj=mmproj,
            system=system,
            sampling=_sampling(
                temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop
            ),
            runtime=_runtime(
                ctx, threads, gpu_layers, image_on_cpu, chat_format, verbose, no_cache
            ),
            max_pixels=max_pixels,
            max_image_bytes=max_image_bytes,
            offline=offline,
            yes=yes,
            think=think,
        )
        return command.run(opts)

    raise typer.Exit(guarded(run))


@app.command(
    cls=_Command,
    short_help="Check the installation: versions, backend, paths, an offline self-test.",
    epilog="Examples:\n  llava doctor\n  llava doctor -v      (with llama.cpp's own logs)",
)
def doctor(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="llama.cpp logs on stderr.")
    ] = False,
) -> None:
    """Check the installation: versions, backend, paths, and an offline self-test that asks a
    tiny model built on the spot about a red and a blue image."""
    from .commands import doctor as command

    raise typer.Exit(guarded(lambda: command.run(verbose=verbose)))


@app.command(
    cls=_Command,
    short_help="Download models and their projectors: resumable, verified by sha256.",
    epilog="Examples:\n"
    "  llava pull smolvlm-500m\n"
    "  llava pull gemma3:q8_0\n"
    "  llava pull ggml-org/gemma-3-4b-it-GGUF\n"
    "  HF_ENDPOINT=https://hf-mirror.example llava pull qwen2.5-vl-3b",
)
def pull(
    refs: Annotated[
        list[str],
        typer.Argument(
            metavar="REF...",
            help="NAME[:QUANT] from the registry (see llava list --available) "
            "or OWNER/REPO[:QUANT] on the hub.",
            show_default=False,
        ),
    ],
    offline: Annotated[
        bool, typer.Option("--offline", help="Only check what is on disk (also HF_HUB_OFFLINE=1).")
    ] = False,
) -> None:
    """Download models and their projectors: resumable (run it again after an interruption),
    verified by sha256, progress on stderr."""
    from .commands import pull as command

    raise typer.Exit(guarded(lambda: command.run(refs, offline=offline)))


@app.command(
    "list",
    cls=_Command,
    short_help="Pulled models (or, with -a, the models you can pull).",
    epilog="Examples:\n  llava list\n  llava list -a\n  llava list --json | jq -r '.[].ref'",
)
def list_(
    available: Annotated[
        bool, typer.Option("--available", "-a", help="The registry: models you can pull.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="A JSON array on stdout.")] = False,
) -> None:
    """Pulled models: name, quant, size on disk and path; with --available, the registry."""
    from .commands import models as command

    if available:
        raise typer.Exit(guarded(lambda: command.list_available(json=json_out)))
    raise typer.Exit(guarded(lambda: command.list_pulled(json=json_out)))


@app.command(
    cls=_Command,
    short_help="Everything about one model: files, hashes, license, memory it needs.",
    epilog="Examples:\n"
    "  llava show smolvlm-500m\n"
    "  llava show ggml-org/gemma-3-4b-it-GGUF --offline\n"
    "  llava show ./models/my-model.gguf",
)
def show(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF",
            help="NAME[:QUANT], OWNER/REPO[:QUANT], or a GGUF file.",
            show_default=False,
        ),
    ],
    ctx: Annotated[int | None, _number("ctx", "Context size for the memory estimate")] = None,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Do not ask the hub; show what is known here."),
    ] = False,
) -> None:
    """Everything about one model: files, hashes, license, where it is, memory it needs."""
    from .commands import models as command

    raise typer.Exit(guarded(lambda: command.show(ref, ctx=ctx, offline=offline)))


@app.command(
    cls=_Command,
    short_help="Remove pulled models' files (asks first on a terminal).",
    epilog="Examples:\n  llava rm smolvlm-500m\n  llava rm -y gemma3 qwen2.5-vl-3b",
)
def rm(
    refs: Annotated[
        list[str],
        typer.Argument(metavar="REF...", help="Pulled models to remove.", show_default=False),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove pulled models' files (asks first on a terminal)."""
    from .commands import models as command

    raise typer.Exit(guarded(lambda: command.rm(refs, yes=yes)))


cache_app = typer.Typer(
    cls=_Group,
    help="The prefix cache: saved image prefixes, so asking about an image again is fast.",
    short_help="The prefix cache: saved image prefixes (info, clear).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("info", cls=_Command)
def cache_info() -> None:
    """Where the cache is, how many entries it holds, its size and its cap."""
    from .commands import models as command

    raise typer.Exit(guarded(command.cache_info))


@cache_app.command("clear", cls=_Command)
def cache_clear() -> None:
    """Delete every saved prefix."""
    from .commands import models as command

    raise typer.Exit(guarded(command.cache_clear))


def guarded(action: Callable[[], int]) -> int:
    """The one place errors become messages and exit codes; every command runs through it."""
    from . import render
    from .config import debug_enabled

    try:
        return action()
    except LlavaError as exc:
        if debug_enabled():
            raise
        render.error(exc.one_line())
        return exc.exit_code
    except KeyboardInterrupt:
        render.status_clear()  # Ctrl-C while the model loads: no status left on the screen
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`llava ask … | head -1`): not an error worth a message.
        _silence_stdout()
        return 0
    except OSError as exc:
        reason = render.stdout_failed()
        if reason is None:
            return _unexpected(exc)
        _silence_stdout()  # what is still buffered must not fail again at exit
        render.error(f"cannot write to standard output: {reason} — check where the output goes")
        return EXIT_RUNTIME
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    from . import render
    from .config import debug_enabled

    if debug_enabled():
        raise exc
    render.error(f"unexpected {type(exc).__name__}: {exc} — set LLAVA_DEBUG=1 for a traceback")
    return EXIT_RUNTIME


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Usage errors are one line, like every other error."""
    from typer.exceptions import TyperException

    from .render import guard_standard_streams

    guard_standard_streams()

    def run_app() -> int:
        try:
            code = app(args=argv, prog_name="llava", standalone_mode=False)
        except typer.Abort:  # Ctrl-D at a prompt Typer asked
            return EXIT_INTERRUPTED
        except TyperException as exc:
            return usage_error(exc, sys.argv[1:] if argv is None else argv)
        return code if isinstance(code, int) else 0

    # Commands guard themselves; this also catches what fails while a command's module is
    # imported (a setting checked at import, a broken library), before its own guard.
    sys.exit(guarded(run_app))


def usage_error(exc: Exception, argv: list[str]) -> int:
    """Typer's usage block (usage line, "Try …", error) as one line that names the help to
    read: ``Error: no such option: --bogus — see llava ask --help``."""
    from . import render

    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        sys.stdout.write(ctx.get_help() + "\n")  # `llava`, `llava cache`: asking for help
        return 0
    command = ctx.command_path if ctx is not None else "llava"
    if command == "llava":  # an option's missing value is reported from the top: whose was it?
        commands = getattr(typer.main.get_command(app), "commands", {})
        named = [a for a in argv[:1] if a in commands]
        command = f"llava {named[0]}" if named else command
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    message = " ".join(str(message).split()).rstrip(".")
    render.error(f"{message[:1].lower()}{message[1:]} — see {command} --help")
    return int(getattr(exc, "exit_code", 2))


def _silence_stdout() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


if __name__ == "__main__":
    main()

"""The Typer app: wires commands to their modules and maps errors to messages and exit codes.

No logic lives here, and nothing heavy is imported at module level: ``llava --help`` must not
load llama.cpp, numpy or Pillow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import typer

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_RUNTIME, LlavaError
from .options import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    LIMITS,
    RuntimeOptions,
    SamplingParams,
)
from .templates import MEDIA_MARKER

app = typer.Typer(
    name="llava",
    help="Local chat with images: ask a LLaVA-style model about a photo, screenshot or scan.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # LLAVA_DEBUG tracebacks never print variables (tokens)
    context_settings={"help_option_names": ["-h", "--help"]},
)

_MODEL = "Model"
_GEN = "Generation"
_RUNTIME = "Runtime"


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


def _bounds(name: str) -> dict[str, float]:
    """``min``/``max`` for a numeric option, from the one table of limits (options.LIMITS)."""
    limit = LIMITS[name]
    return {"min": limit.kind(limit.low), "max": limit.kind(limit.high)}


# Options shared by `ask` and `chat`: declared once, used by both signatures.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="LLAVA_MODEL",
        help="NAME[:QUANT] from the registry, OWNER/REPO[:QUANT] on the hub, or a GGUF path. "
        "Default: config.toml's model, else the registry default. Pulled if missing.",
        rich_help_panel=_MODEL,
    ),
]
MmprojOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LLAVA_MMPROJ",
        help="Projector (mmproj) GGUF path, with a --model path. "
        "Default: the one *mmproj*.gguf beside the model.",
        rich_help_panel=_MODEL,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        help="Never touch the network: a model that is not pulled is an error (exit 3). "
        "Also HF_HUB_OFFLINE=1.",
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
    str | None, typer.Option(envvar="LLAVA_SYSTEM", help="System prompt.", rich_help_panel=_GEN)
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        envvar="LLAVA_TEMPERATURE",
        **_bounds("temperature"),
        help="0 = greedy.",
        rich_help_panel=_GEN,
    ),
]
TopPOpt = Annotated[float, typer.Option(**_bounds("top-p"), rich_help_panel=_GEN)]
TopKOpt = Annotated[int, typer.Option(**_bounds("top-k"), rich_help_panel=_GEN)]
MinPOpt = Annotated[float, typer.Option(**_bounds("min-p"), rich_help_panel=_GEN)]
RepeatPenaltyOpt = Annotated[float, typer.Option(**_bounds("repeat-penalty"), rich_help_panel=_GEN)]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        envvar="LLAVA_SEED", **_bounds("seed"), help="Default: random.", rich_help_panel=_GEN
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(
        envvar="LLAVA_MAX_TOKENS",
        **_bounds("max-tokens"),
        help="Default: until done.",
        rich_help_panel=_GEN,
    ),
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option(help="Stop at this text (repeatable).", rich_help_panel=_GEN),
]
CtxOpt = Annotated[
    int | None,
    typer.Option(
        envvar="LLAVA_CTX",
        **_bounds("ctx"),
        help="Context size in tokens, at most the model's training context. "
        "Default: 4096, or less if the model has less.",
        rich_help_panel=_RUNTIME,
    ),
]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        envvar="LLAVA_THREADS",
        **_bounds("threads"),
        help="0 = one per CPU.",
        rich_help_panel=_RUNTIME,
    ),
]
GpuLayersOpt = Annotated[
    int,
    typer.Option(
        envvar="LLAVA_GPU_LAYERS",
        **_bounds("gpu-layers"),
        help="Layers to offload to the GPU; -1 = all (where supported), 0 = none.",
        rich_help_panel=_RUNTIME,
    ),
]
ImageOnCpuOpt = Annotated[
    bool,
    typer.Option(
        envvar="LLAVA_IMAGE_ON_CPU",
        help="Keep the image encoder on the CPU.",
        rich_help_panel=_RUNTIME,
    ),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        envvar="LLAVA_MAX_PIXELS",
        **_bounds("max-pixels"),
        help="Refuse images with more pixels than this.",
        rich_help_panel=_RUNTIME,
    ),
]
MaxImageBytesOpt = Annotated[
    int,
    typer.Option(
        envvar="LLAVA_MAX_IMAGE_BYTES",
        **_bounds("max-image-bytes"),
        help="Refuse image files (or standard input) larger than this many bytes "
        "(default 256 MiB); checked as the bytes arrive.",
        rich_help_panel=_RUNTIME,
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        envvar="LLAVA_NO_CACHE",
        help="Do not reuse or keep image prefixes between runs (the prefix cache).",
        rich_help_panel=_RUNTIME,
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", envvar="LLAVA_VERBOSE", help="Details and llama.cpp logs on stderr."
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


@app.command()
def ask(
    images: Annotated[
        list[str],
        typer.Argument(
            metavar="IMAGE", help="Image files (JPEG, PNG, WebP, GIF, BMP, TIFF), or - for stdin."
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            "-p",
            help="The question. Default: text piped on stdin, else 'Describe this image.'",
        ),
    ] = None,
    model: ModelOpt = None,
    mmproj: MmprojOpt = None,
    offline: OfflineOpt = False,
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
    threads: ThreadsOpt = 0,
    gpu_layers: GpuLayersOpt = -1,
    image_on_cpu: ImageOnCpuOpt = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_image_bytes: MaxImageBytesOpt = DEFAULT_MAX_IMAGE_BYTES,
    together: Annotated[
        bool, typer.Option(help="Send all images in one prompt; one answer.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per image (JSON Lines).")
    ] = False,
    no_cache: NoCacheOpt = False,
    show_prompt: Annotated[
        bool,
        typer.Option(
            "--show-prompt",
            help="Print the exact prompt the model would read (template applied, "
            f"{MEDIA_MARKER} where each image goes) and exit; nothing is generated.",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer a question about each image, once. The answer alone goes to stdout."""
    from .commands import ask as command

    opts = command.AskOptions(
        images=images,
        prompt=prompt,
        model=model,
        mmproj=mmproj,
        system=system,
        sampling=_sampling(
            temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop
        ),
        runtime=RuntimeOptions(
            ctx, threads, gpu_layers, image_on_cpu, chat_format, verbose, not no_cache
        ),
        max_pixels=max_pixels,
        max_image_bytes=max_image_bytes,
        together=together,
        json=json_out,
        offline=offline,
        think=think,
        show_prompt=show_prompt,
    )
    raise typer.Exit(guarded(lambda: command.run(opts)))


@app.command()
def chat(
    images: Annotated[
        list[str] | None,
        typer.Argument(metavar="IMAGE", help="Images to attach to the first message."),
    ] = None,
    model: ModelOpt = None,
    mmproj: MmprojOpt = None,
    offline: OfflineOpt = False,
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
    threads: ThreadsOpt = 0,
    gpu_layers: GpuLayersOpt = -1,
    image_on_cpu: ImageOnCpuOpt = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_image_bytes: MaxImageBytesOpt = DEFAULT_MAX_IMAGE_BYTES,
    no_cache: NoCacheOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Talk about images: streamed answers, slash commands (/help), nothing re-read twice."""
    from .commands import chat as command

    opts = command.ChatOptions(
        images=images or [],
        model=model,
        mmproj=mmproj,
        system=system,
        sampling=_sampling(
            temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop
        ),
        runtime=RuntimeOptions(
            ctx, threads, gpu_layers, image_on_cpu, chat_format, verbose, not no_cache
        ),
        max_pixels=max_pixels,
        max_image_bytes=max_image_bytes,
        offline=offline,
        think=think,
    )
    raise typer.Exit(guarded(lambda: command.run(opts)))


@app.command()
def doctor(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="llama.cpp logs on stderr.")
    ] = False,
) -> None:
    """Check the installation: versions, backend, paths, and an offline self-test."""
    from .commands import doctor as command

    raise typer.Exit(guarded(lambda: command.run(verbose=verbose)))


@app.command()
def pull(
    refs: Annotated[
        list[str],
        typer.Argument(
            metavar="REF",
            help="NAME[:QUANT] from the registry (see `llava list --available`) "
            "or OWNER/REPO[:QUANT] on the hub.",
        ),
    ],
    offline: Annotated[
        bool, typer.Option(help="Only check what is on disk (also HF_HUB_OFFLINE=1).")
    ] = False,
) -> None:
    """Download models and their projectors: resumable, verified by sha256, progress on stderr."""
    from .commands import pull as command

    raise typer.Exit(guarded(lambda: command.run(refs, offline=offline)))


@app.command("list")
def list_(
    available: Annotated[
        bool, typer.Option("--available", "-a", help="The registry: models you can pull.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="A JSON array on stdout.")] = False,
) -> None:
    """Pulled models: name, quant, size on disk and path."""
    from .commands import models as command

    if available:
        raise typer.Exit(guarded(lambda: command.list_available(json=json_out)))
    raise typer.Exit(guarded(lambda: command.list_pulled(json=json_out)))


@app.command()
def show(
    ref: Annotated[str, typer.Argument(metavar="REF", help="NAME[:QUANT] or OWNER/REPO[:QUANT].")],
    ctx: Annotated[
        int | None,
        typer.Option(
            envvar="LLAVA_CTX", **_bounds("ctx"), help="Context size for the memory estimate."
        ),
    ] = None,
) -> None:
    """Everything about one model: files, hashes, license, where it is, memory it needs."""
    from .commands import models as command

    raise typer.Exit(guarded(lambda: command.show(ref, ctx=ctx)))


@app.command()
def rm(
    refs: Annotated[list[str], typer.Argument(metavar="REF", help="Pulled models to remove.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove pulled models' files (asks first on a terminal)."""
    from .commands import models as command

    raise typer.Exit(guarded(lambda: command.rm(refs, yes=yes)))


cache_app = typer.Typer(
    help="The prefix cache: saved image prefixes, so asking about an image again is fast.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info() -> None:
    """Where the cache is, how many entries it holds, its size and its cap."""
    from .commands import models as command

    raise typer.Exit(guarded(command.cache_info))


@cache_app.command("clear")
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

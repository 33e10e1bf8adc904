"""The Typer app: wires commands to their modules and maps errors to messages and exit codes.

No logic lives here, and nothing heavy is imported at module level: ``llava --help`` must not
load llama.cpp, numpy or Pillow. Longer than our ~400 lines on purpose: the commands' own
parameters are declared here, with their help, beside the one shortcut every run takes
through Typer's value coercion (``_PlainValues``).
"""

from __future__ import annotations

import gc
import re
import sys
from contextlib import suppress
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from . import __version__
from .cli_options import (
    Command,
    Group,
    complete_models,
    given_options,
    number,
    with_shared_options,
)
from .errors import EXIT_INTERRUPTED
from .guard import guarded, usage_error
from .options import CONVERSATION, GEN, OUTPUT, SETTINGS, model_fields
from .slash import help_epilog
from .templates import MEDIA_MARKER

HELP_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="llava",
    cls=Group,
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
    context_settings={"help_option_names": HELP_NAMES, "max_content_width": 100},
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
    cls=Command,
    short_help="Answer a question about each image, once; the answer alone goes to stdout.",
    epilog="Examples:\n"
    "  llava ask photo.jpg 'What is in this picture?'\n"
    "  llava ask scan.png -p 'Transcribe the text.' -m smolvlm-500m\n"
    "  llava ask a.png b.png 'Which room?'   (each answer after its ==> a.png <==)\n"
    "  llava ask receipt.jpg --json-schema receipt.json --json | jq .parsed\n"
    "  echo 'Is there a cat?' | llava ask photo.jpg\n"
    "  curl -s https://example.org/x.png | llava ask - 'Describe it.'",
)
@with_shared_options(after="prompt")
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
        typer.Option("--prompt", "-p", metavar="TEXT", help="The question.", rich_help_panel=GEN),
    ] = None,
    json_schema: Annotated[
        str | None,
        typer.Option(
            metavar="SCHEMA",
            help="Constrain the answer to this JSON schema (a file, or inline JSON): it is "
            "valid JSON for the schema, or the command fails (exit 1).",
            rich_help_panel=GEN,
        ),
    ] = None,
    grammar: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Constrain the answer to this GBNF grammar (llama.cpp's format).",
            rich_help_panel=GEN,
        ),
    ] = None,
    together: Annotated[
        bool,
        typer.Option(
            "--together", help="Send all images in one prompt; one answer.", rich_help_panel=GEN
        ),
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="One JSON object per image (JSON Lines).", rich_help_panel=OUTPUT
        ),
    ] = False,
    label: Annotated[
        bool | None,
        typer.Option(
            "--label/--no-label",
            help="Write '==> IMAGE <==' before each answer, as head(1) does. "
            "Default: when there are several images.",
            rich_help_panel=OUTPUT,
            show_default=False,
        ),
    ] = None,
    show_prompt: Annotated[
        bool,
        typer.Option(
            "--show-prompt",
            help="Print the exact prompt the model would read (template applied, "
            f"{MEDIA_MARKER} where each image goes) and exit; nothing is generated.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    **shared: Any,  # the options ask and chat share (options.OPTIONS), by parameter name
) -> None:
    """Answer a question about each image, once. The answer alone goes to stdout: with
    several images, each after a '==> IMAGE <==' line (or one JSON line each with --json)."""
    from .commands import ask as command

    def run() -> int:
        images, question = _question(arguments, prompt, "-p")
        opts = command.AskOptions(
            images=images,
            prompt=question,
            **model_fields(shared),
            together=together,
            json=json_out,
            label=label,
            show_prompt=show_prompt,
            json_schema=json_schema,
            grammar=grammar,
        )
        return command.run(opts)

    raise typer.Exit(guarded(run))


@app.command(
    cls=Command,
    short_help="Talk about images: streamed answers, slash commands, nothing read twice.",
    epilog=help_epilog() + "\n\nExamples:\n"
    "  llava chat photo.jpg\n"
    "  llava chat photo.jpg 'What is unusual here?'  (answers, then waits for more)\n"
    "  llava chat -c                                (the last chat, where it ended)\n"
    "  llava chat --resume trip.json\n"
    "  llava chat -m gemma3 < questions.txt   (a message per line; answers only)",
)
@with_shared_options(after="resume")
def chat(
    context: typer.Context,
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
            "--continue",
            "-c",
            help="Resume the last chat, as it ended.",
            rich_help_panel=CONVERSATION,
        ),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            metavar="FILE", help="Resume a chat saved with /save.", rich_help_panel=CONVERSATION
        ),
    ] = None,
    **shared: Any,  # the options ask and chat share (options.OPTIONS), by parameter name
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
            **model_fields(shared),
            given=given_options(context, SETTINGS),
        )
        return command.run(opts)

    raise typer.Exit(guarded(run))


@app.command(
    cls=Command,
    short_help="Check the installation: versions, backend, paths, an offline self-test.",
    epilog="Examples:\n  llava doctor\n  llava doctor -v      (with llama.cpp's own logs)\n"
    "  llava doctor --rpc 127.0.0.1:50052",
)
def doctor(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="llama.cpp logs on stderr.")
    ] = False,
    rpc: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT[,…]",
            help="Check these `llava rpc-server`s instead: reachable, protocol, devices, memory",
        ),
    ] = None,
) -> None:
    """Check the installation: versions, backend, paths, and an offline self-test that asks a
    tiny model built on the spot about a red and a blue image."""
    from .commands import doctor as command

    if rpc is not None:
        raise typer.Exit(guarded(lambda: command.check_rpc(rpc, verbose=verbose)))
    raise typer.Exit(guarded(lambda: command.run(verbose=verbose)))


@app.command(
    "rpc-server",
    cls=Command,
    short_help="Serve this machine's CPU or GPU to other llava clients (llama.cpp's RPC).",
    epilog="Examples:\n"
    "  llava rpc-server                      (127.0.0.1:50052)\n"
    "  llava rpc-server --port 50053 --device CPU\n"
    "  llava ask photo.jpg --rpc 127.0.0.1:50052 -p 'What is this?'   (the client)",
)
def rpc_server(
    host: Annotated[
        str,
        typer.Option(
            metavar="ADDRESS",
            help="Address to listen on; one that is not loopback only with --allow-remote",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="N", min=1, max=65535, help="TCP port")] = 50052,
    device: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Device to serve (CPU, CUDA0, Metal…); default the best"),
    ] = None,
    threads: Annotated[
        int, typer.Option(metavar="N", min=0, max=512, help="CPU threads; 0 = one per CPU")
    ] = 0,
    cache: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="Where the server keeps tensors it was sent, so a restarted client does not "
            "send them again. Default: rpc/ in llava's cache directory",
        ),
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Listen on a non-loopback --host. The protocol has no authentication or "
            "encryption: only on a trusted network, or use an SSH tunnel",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="llama.cpp logs on stderr.")
    ] = False,
) -> None:
    """Serve one of this machine's devices over llama.cpp's RPC protocol until Ctrl-C, so a
    llava client elsewhere (`--rpc HOST:PORT`) can put a model's layers on it. No
    authentication, no encryption: keep it on 127.0.0.1 and reach it through an SSH tunnel,
    or use --allow-remote on a network you trust."""
    from .commands import rpc_server as command

    raise typer.Exit(
        guarded(
            lambda: command.run(
                host=host, port=port, device=device, threads=threads, cache=cache,
                allow_remote=allow_remote, verbose=verbose,
            )
        )
    )  # fmt: skip


@app.command(
    cls=Command,
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
            autocompletion=complete_models,
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
    cls=Command,
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
    cls=Command,
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
            autocompletion=complete_models,
            metavar="REF",
            help="NAME[:QUANT], OWNER/REPO[:QUANT], or a GGUF file.",
            show_default=False,
        ),
    ],
    ctx: Annotated[int | None, number("ctx", "Context size for the memory estimate")] = None,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Do not ask the hub; show what is known here."),
    ] = False,
) -> None:
    """Everything about one model: files, hashes, license, where it is, memory it needs."""
    from .commands import models as command

    raise typer.Exit(guarded(lambda: command.show(ref, ctx=ctx, offline=offline)))


@app.command(
    cls=Command,
    short_help="Remove pulled models' files (asks first on a terminal).",
    epilog="Examples:\n  llava rm smolvlm-500m\n  llava rm -y gemma3 qwen2.5-vl-3b",
)
def rm(
    refs: Annotated[
        list[str],
        typer.Argument(
            metavar="REF...",
            help="Pulled models to remove.",
            show_default=False,
            autocompletion=complete_models,
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove pulled models' files (asks first on a terminal)."""
    from .commands import models as command

    raise typer.Exit(guarded(lambda: command.rm(refs, yes=yes)))


cache_app = typer.Typer(
    cls=Group,
    help="The prefix cache: saved image prefixes, so asking about an image again is fast.",
    short_help="The prefix cache: saved image prefixes (info, clear).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("info", cls=Command)
def cache_info() -> None:
    """Where the cache is, how many entries it holds, its size and its cap."""
    from .commands import models as command

    raise typer.Exit(guarded(command.cache_info))


@cache_app.command("clear", cls=Command)
def cache_clear() -> None:
    """Delete every saved prefix."""
    from .commands import models as command

    raise typer.Exit(guarded(command.cache_clear))


_PLAIN_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,14})")
_PLAIN_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?")
_NOT_PLAIN = object()


class _PlainValues:
    """Typer 0.29 turns every parameter's value into its type with a pydantic TypeAdapter,
    built the first time the parameter is seen, even for a value left out: importing pydantic
    and building some 30 adapters cost about 0.1 s of every run. Here a value left out, a
    string for a string, strings for a list of strings, a number for a number (a default)
    and a plainly written number (``4``, ``0.7``) become what that adapter would return;
    anything else still goes to Typer's own adapter (``typer._coercion.build_runtime_param``),
    built then, with its messages."""

    def __init__(self, descriptor: Any) -> None:
        self.descriptor = descriptor
        self.typer_own: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        plain = self._plain(value, many=param.multiple or param.nargs == -1)
        if plain is not _NOT_PLAIN:
            return plain
        if self.typer_own is None:
            from typer._coercion import build_runtime_param

            self.typer_own = build_runtime_param(self.descriptor)
        return self.typer_own.coerce(value, param=param, ctx=ctx)

    def _plain(self, value: Any, *, many: bool) -> Any:
        kind, info = self.descriptor.annotation, self.descriptor.parameter_info
        if self.descriptor.file_annotation is not None or info.parser is not None:
            return _NOT_PLAIN
        if value is None:
            return () if many else None
        if many:
            if kind == list[str] and isinstance(value, (list, tuple)):
                return list(value) if all(type(v) is str for v in value) else _NOT_PLAIN
            return _NOT_PLAIN
        if info.min is not None or info.max is not None:
            return _NOT_PLAIN
        if kind is int and type(value) is int:  # a default
            return value
        if kind is float and type(value) in (int, float):
            return float(value)
        if type(value) is not str:
            return _NOT_PLAIN
        if kind is str:
            return value
        if kind is int and _PLAIN_INT.fullmatch(value):
            return int(value)
        if kind is float and _PLAIN_FLOAT.fullmatch(value):
            return float(value)
        return _NOT_PLAIN


def with_plain_values(command: Any) -> Any:
    """The click command Typer built for ``app``, its parameters (and its subcommands')
    coerced by ``_PlainValues``. Left as it is where Typer's internals differ."""
    params = list(getattr(command, "params", ()))
    with suppress(AttributeError, TypeError):  # --help: made once, on first use; made now
        params.append(command.get_help_option(SimpleNamespace(help_option_names=HELP_NAMES)))
    for param in params:
        if getattr(param, "_runtime_param", False) is None and hasattr(param, "type_descriptor"):
            param._runtime_param = _PlainValues(param.type_descriptor)
    for subcommand in getattr(command, "commands", {}).values():
        with_plain_values(subcommand)
    return command


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Usage errors are one line, like every other error."""
    from typer.exceptions import TyperException

    from .render import guard_standard_streams

    guard_standard_streams()

    def run_app() -> int:
        # Typer's app(...) is get_command(app)(...) with its own excepthook, which never
        # sees an error: guarded (below and in each command) catches them all.
        command = with_plain_values(typer.main.get_command(app))
        try:
            code = command(args=argv, prog_name="llava", standalone_mode=False)
        except typer.Abort:  # Ctrl-D at a prompt Typer asked
            return EXIT_INTERRUPTED
        except TyperException as exc:
            commands = getattr(typer.main.get_command(app), "commands", {})
            return usage_error(exc, sys.argv[1:] if argv is None else argv, commands)
        return code if isinstance(code, int) else 0

    # Commands guard themselves; this also catches what fails while a command's module is
    # imported (a setting checked at import, a broken library), before its own guard.
    code = guarded(run_app)
    # Python's exit would go over every object of the run looking for cycles (~30 ms on the
    # tiny model, a tenth of a whole `ask`); frozen, they are left to the process's end.
    # Everything else happens as before: threads joined, atexit handlers run, streams flushed.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Plain option records shared by the commands and the engine, and ``OPTIONS``: the one table
of the options ``ask`` and ``chat`` share, which feeds their command-line options
(cli_options), the records below (built by keyword), chat's ``/set`` (slash) and the README's
option table (scripts/cli-reference.py). No heavy imports here: ``llava --help`` reads it.

Longer than our ~400 lines on purpose: most of it is that table, an entry per option, which
is read (and changed) whole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed, reported in the result
    max_tokens: int | None = None  # None: until end of sequence or a full context
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF text the answer must match (``structured.Constraint``)


@dataclass(frozen=True)
class RuntimeOptions:
    ctx: int | None = None  # None: DEFAULT_CTX, or the model's training context if smaller
    threads: int = 0  # 0: one per available CPU
    gpu_layers: int = -1  # -1: all layers, where the build supports offload
    image_on_cpu: bool = False
    repack: bool | None = None  # None: what was measured faster for this build's CPU backend
    rpc: str | None = None  # llava rpc-server addresses, HOST:PORT[,HOST:PORT…]
    tensor_split: str | None = None  # layers' weights over the devices, "3,1"
    chat_format: str = "auto"  # "auto" | "gguf" | "llava"
    verbose: bool = False
    cache: bool = True  # keep and reuse image prefixes between runs (the prefix cache)


INT32_MAX = 2**31 - 1
DEFAULT_MAX_PIXELS = 100_000_000
# Measured: decoding the worst image within DEFAULT_MAX_PIXELS (10000x10000 RGBA, CMYK or
# float; the pixels alone are 400 MB as Pillow holds them) peaks at 0.69 GB over the process's
# baseline. The source bytes are let go once decoded, so they only add while the decoder runs:
# 256 MiB + 400 MB = 0.66 GB, under that peak and the 1 GB an image may cost. A 100-megapixel
# camera JPEG is 30-60 MB; noise at JPEG quality 100 is 156 MiB.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
PROMPT_MAX_BYTES = 16 << 20  # a prompt on stdin, or a chat line: far beyond any context
MAX_TOKEN_CHARS = 256  # no vocabulary has a longer token: a longer text cannot fit a context
LONG_TEXT_CHARS = 16_384  # shorter texts are tokenized whole without a second thought

# The headings --help lists options under, in its order (cli_options.Command).
CONVERSATION = "Conversation"
MODEL = "Model"
GEN = "Generation"
OUTPUT = "Output"
HARDWARE = "Hardware"
INPUT_LIMITS = "Input limits"
OTHER = "Other options"
HEADINGS = (CONVERSATION, MODEL, GEN, OUTPUT, HARDWARE, INPUT_LIMITS, OTHER)

# The records an option can set, by the name Option.record gives them. An option with no
# record sets a field of commands.ask.ModelOptions itself.
RECORDS: dict[str, type] = {"sampling": SamplingParams, "runtime": RuntimeOptions}
# What /set (and a saved chat) takes for "back to the default" where None is a value.
UNSET_WORDS = ("none", "random", "default")


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option that ``ask`` and ``chat`` share: all that the command line, the records,
    chat's ``/set`` and the README know of it. An option that sets a record's field takes
    its default from the record (its dataclass default), never from here."""

    name: str  # the long flag without its dashes ("top-p"): /set's key, errors' name
    kind: type  # int, float, str or bool: what one value is
    panel: str  # the --help heading it is listed under
    help: str = ""  # without the default or the range: each place that shows it adds those
    record: str = ""  # "sampling" | "runtime" (RECORDS), or "": a field of ModelOptions
    field: str = ""  # the field it sets, where not the name with underscores
    default: Any = None  # only for an option with no record; filled from the record otherwise
    default_text: str = ""  # the default in words, where the value alone does not say it
    low: float | None = None  # inclusive bounds of a number; integers stay within C types
    high: float | None = None
    env: str | None = None  # LLAVA_* variable that sets it
    short: str | None = None  # "-m"
    metavar: str | None = None  # a text's placeholder; a number's is N or NUMBER
    optional: bool = False  # None is a value (left unset): seed, max-tokens, ctx, model…
    repeated: bool = False  # may be given many times; the record holds a tuple (--stop)
    negated: bool = False  # a flag that turns its field off (--no-cache sets cache=False)
    paired: bool = False  # a switch with both forms (--repack/--no-repack); unset is None
    settable: bool = False  # chat's /set changes it (and a saved chat keeps it)
    completion: str = ""  # "models": the shell completes model names for it

    def __post_init__(self) -> None:
        if self.record:
            declared = {f.name: f.default for f in fields(RECORDS[self.record])}
            default = declared[self.field_name]
            assert default is not MISSING, f"{self.record}.{self.field_name} has no default"
            default = not default if self.negated else default
            # None in the table, or the record's own (a copy made with dataclasses.replace)
            assert self.default in (None, default), f"{self.name}: the default is {self.record}'s"
            object.__setattr__(self, "default", default)
        assert (self.low is None) == (self.high is None), f"{self.name}: both bounds or neither"
        assert not self.settable or self.bounded, f"{self.name}: /set parses numbers only"

    @property
    def param(self) -> str:
        """The command function's parameter name (``top_p``), as Typer and click know it."""
        return self.name.replace("-", "_")

    @property
    def flags(self) -> str:
        """The long flag as help and the README spell it: ``--top-p``, ``--repack/--no-repack``."""
        return f"--{self.name}/--no-{self.name}" if self.paired else f"--{self.name}"

    @property
    def field_name(self) -> str:
        return self.field or self.param

    @property
    def bounded(self) -> bool:
        return self.low is not None

    def shown(self, value: float) -> str:
        """A number as help and errors write it: ``4,294,967,294``, ``0.05``."""
        return f"{int(value):,}" if self.kind is int else f"{value:g}"

    @property
    def span(self) -> str:
        """The accepted range in words: ``0 to 1``, ``at least 64``."""
        assert self.low is not None and self.high is not None
        if self.high == INT32_MAX:
            return f"at least {self.shown(self.low)}"
        return f"{self.shown(self.low)} to {self.shown(self.high)}"

    def refusal(self, value: float) -> str:
        """What is wrong with a value outside the range: its ``span``, or, past a limit the
        help leaves unsaid (a C int's), that limit."""
        assert self.low is not None and self.high is not None
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        if value > self.high and self.high == INT32_MAX:
            return f"must be at most {self.shown(self.high)}, not {shown}"
        return f"must be {self.span}, not {shown}"

    def allows(self, value: float) -> bool:
        if self.low is None or self.high is None:
            return True
        return self.low <= value <= self.high  # NaN fails every comparison, so it fails here

    def parse(self, text: str) -> Any:
        """``text`` as this option takes it, range-checked (``/set top-p 0.9``); ``none``
        (or ``random``, ``default``) where None is a value."""
        from .errors import UsageError

        if self.optional and text.lower() in UNSET_WORDS:
            return None
        try:
            value = self.kind(text)
        except (ValueError, OverflowError):
            kind = "a whole number" if self.kind is int else "a number"
            raise UsageError(f"{self.name} must be {kind}, not {text!r}") from None
        if not self.allows(value):
            assert self.low is not None and self.high is not None
            low, high = self.shown(self.low), self.shown(self.high)
            raise UsageError(f"{self.name} must be between {low} and {high}, not {text}")
        return value

    def field_value(self, value: Any) -> Any:
        """What the field is set to for the option's parsed value."""
        if self.negated:
            return not value
        if self.repeated:
            return tuple(value or ())
        return value


def _table(*options: Option) -> dict[str, Option]:
    return {option.name: option for option in options}


# In --help's order within each heading.
OPTIONS: dict[str, Option] = _table(
    Option(
        name="model",
        kind=str,
        optional=True,
        short="-m",
        env="LLAVA_MODEL",
        metavar="REF",
        completion="models",
        help="NAME[:QUANT] from the registry (llava list -a), OWNER/REPO[:QUANT] on the hub, "
        "or a GGUF file; pulled if missing",
        default_text="config.toml's model, else the registry default",
        panel=MODEL,
    ),
    Option(
        name="mmproj",
        kind=str,
        optional=True,
        env="LLAVA_MMPROJ",
        metavar="FILE",
        help="Projector (mmproj) GGUF file, with a --model file",
        default_text="the one *mmproj*.gguf beside the model",
        panel=MODEL,
    ),
    Option(
        name="offline",
        kind=bool,
        default=False,
        help="Never touch the network: a model that is not pulled is an error (exit 3). "
        "Also HF_HUB_OFFLINE=1",
        panel=MODEL,
    ),
    Option(
        name="yes",
        kind=bool,
        default=False,
        short="-y",
        env="LLAVA_YES",
        help="Pull a missing model without asking, however large (on a terminal llava asks "
        "before fetching more than 1 GB; in a pipe it never asks)",
        panel=MODEL,
    ),
    Option(
        name="chat-format",
        kind=str,
        record="runtime",
        env="LLAVA_CHAT_FORMAT",
        metavar="FORMAT",
        help="auto (the registry's format, else the model's own template, else llava), gguf "
        "(the GGUF's template), llava (LLaVA-1.5/Vicuna), or a llama.cpp built-in name "
        "(vicuna, chatml, mistral-v7, llama2, gemma, …; a typo lists them all)",
        panel=MODEL,
    ),
    Option(
        name="think",
        panel=GEN,
        kind=bool,
        default=False,
        env="LLAVA_THINK",
        help="Let a reasoning model think before it answers (off where its template allows). "
        "The thinking goes to stderr on a terminal, or to the JSON 'thinking' field",
    ),
    Option(
        name="system",
        panel=GEN,
        kind=str,
        optional=True,
        env="LLAVA_SYSTEM",
        metavar="TEXT",
        help="System prompt (folded into the first message where the template has no system role)",
        default_text="the chat format's own",
    ),
    Option(
        name="temperature",
        panel=GEN,
        kind=float,
        record="sampling",
        low=0.0,
        high=100.0,
        env="LLAVA_TEMPERATURE",
        settable=True,
        help="0 = always the likeliest token",
    ),
    Option(
        name="top-p",
        panel=GEN,
        kind=float,
        record="sampling",
        low=0.0,
        high=1.0,
        settable=True,
        help="Keep the likeliest tokens whose probabilities add up to this; 1 = off",
    ),
    Option(
        name="top-k",
        panel=GEN,
        kind=int,
        record="sampling",
        low=0,
        high=INT32_MAX,
        settable=True,
        help="Keep only the k likeliest tokens; 0 = off",
    ),
    Option(
        name="min-p",
        panel=GEN,
        kind=float,
        record="sampling",
        low=0.0,
        high=1.0,
        settable=True,
        help="Drop tokens less likely than this share of the likeliest one's chance; 0 = off",
    ),
    Option(
        name="repeat-penalty",
        panel=GEN,
        kind=float,
        record="sampling",
        low=0.0,
        high=100.0,
        settable=True,
        help=f"Penalty on tokens repeated within the last {SamplingParams.repeat_last_n} "
        "tokens; 1 = off",
    ),
    Option(
        name="seed",
        panel=GEN,
        kind=int,
        record="sampling",
        optional=True,
        low=0,
        high=2**32 - 2,  # llama.cpp's seed is a uint32; 2^32-1 means "random"
        env="LLAVA_SEED",
        settable=True,
        help="Same seed, same answer (ask --json reports the seed it used)",
        default_text="random",
    ),
    Option(
        name="max-tokens",
        panel=GEN,
        kind=int,
        record="sampling",
        optional=True,
        low=1,
        high=INT32_MAX,
        env="LLAVA_MAX_TOKENS",
        settable=True,
        help="Stop after this many tokens",
        default_text="until done",
    ),
    Option(
        name="stop",
        panel=GEN,
        kind=str,
        record="sampling",
        repeated=True,
        metavar="TEXT",
        help="Stop at this text, which is not printed (repeatable)",
    ),
    Option(
        name="ctx",
        panel=GEN,
        kind=int,
        record="runtime",
        optional=True,
        low=64,
        high=INT32_MAX,  # and at most the model's training context
        env="LLAVA_CTX",
        help="Context size in tokens, at most the model's training context (more is lowered, "
        "with a notice); refused, with the numbers, when its KV cache cannot fit in memory",
        default_text="4096, or less if the model has less",  # config.DEFAULT_CTX
    ),
    Option(
        name="verbose",
        kind=bool,
        record="runtime",
        short="-v",
        env="LLAVA_VERBOSE",
        help="Details (image sizes, token counts, timings) and llama.cpp logs on stderr",
        panel=OUTPUT,
    ),
    Option(
        name="threads",
        kind=int,
        record="runtime",
        low=0,
        high=512,  # GGML_MAX_N_THREADS
        env="LLAVA_THREADS",
        help="0 = one per CPU",
        panel=HARDWARE,
    ),
    Option(
        name="gpu-layers",
        kind=int,
        record="runtime",
        low=-1,
        high=INT32_MAX,
        env="LLAVA_GPU_LAYERS",
        help="Layers to offload to the GPU; -1 = all (where supported), 0 = none",
        panel=HARDWARE,
    ),
    Option(
        name="image-on-cpu",
        kind=bool,
        record="runtime",
        env="LLAVA_IMAGE_ON_CPU",
        help="Keep the image encoder on the CPU",
        panel=HARDWARE,
    ),
    Option(
        name="rpc",
        kind=str,
        record="runtime",
        optional=True,
        env="LLAVA_RPC",
        metavar="HOST:PORT[,…]",
        help="Put the model's layers on these `llava rpc-server`s' devices (as --gpu-layers "
        "allows); the image encoder stays here. No authentication: see README, Beyond one "
        "machine",
        panel=HARDWARE,
    ),
    Option(
        name="tensor-split",
        kind=str,
        record="runtime",
        optional=True,
        env="LLAVA_TENSOR_SPLIT",
        metavar="N,N…",
        help="How to share the layers over the devices, in their order (--verbose lists "
        "them): 3,1 puts three quarters on the first",
        default_text="by each device's free memory",
        panel=HARDWARE,
    ),
    Option(
        name="repack",
        kind=bool,
        record="runtime",
        paired=True,
        optional=True,
        env="LLAVA_REPACK",
        help="Repack quantized weights for this CPU's matrix kernels as they load (llama.cpp's "
        "--repack): faster prompts on AVX2 and Arm, slower and ~25% more memory on AVX-512 "
        "(measured: README, Performance)",
        default_text="off on an AVX-512 build, on elsewhere (llava doctor says which)",
        panel=HARDWARE,
    ),
    Option(
        name="no-cache",
        kind=bool,
        record="runtime",
        field="cache",
        negated=True,
        env="LLAVA_NO_CACHE",
        help="Do not reuse or keep image prefixes between runs (the prefix cache)",
        panel=HARDWARE,
    ),
    Option(
        name="max-pixels",
        kind=int,
        default=DEFAULT_MAX_PIXELS,
        # Decoding 100 MP (the default) peaks at 0.65 GB: 150 MP stays within the 1 GB an
        # input may cost, whatever the file (a 30000x30000 PNG took 3.7 GB at 10^9).
        low=1,
        high=150_000_000,
        env="LLAVA_MAX_PIXELS",
        help="Refuse images with more pixels than this",
        panel=INPUT_LIMITS,
    ),
    Option(
        name="max-image-bytes",
        kind=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        low=1,
        high=1 << 32,
        env="LLAVA_MAX_IMAGE_BYTES",
        help="Refuse image files (or standard input) larger than this many bytes, checked as "
        "they arrive",
        default_text=f"{DEFAULT_MAX_IMAGE_BYTES >> 20} MiB",
        panel=INPUT_LIMITS,
    ),
)

# The settings /set changes, by their names: the options that say so.
SETTINGS = tuple(name for name, option in OPTIONS.items() if option.settable)


def model_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``commands.ask.ModelOptions`` that the table's options set, by keyword,
    from a command's parsed parameters (by parameter name, as ``typer.Context.params`` holds
    them): the records built here, the rest as they are."""
    values: dict[str, dict[str, Any]] = {"": {}, **{record: {} for record in RECORDS}}
    for option in OPTIONS.values():
        values[option.record][option.field_name] = option.field_value(params[option.param])
    return {
        **values[""],
        "sampling": SamplingParams(**values["sampling"]),
        "runtime": RuntimeOptions(**values["runtime"]),
    }

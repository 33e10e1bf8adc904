"""``llava ask``: one answer per image (or one for all with ``--together``), for pipelines.

Longer than our ~400 lines on purpose: the checks made before anything loads (images,
constraint, format), the batch loop and the output forms (labels, JSON lines, held-back
constrained answers) are one command's contract, read together when it changes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .. import render
from ..config import DEFAULT_PROMPT, environment
from ..errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    BadInput,
    ContextOverflow,
    ImageError,
    LlavaError,
    UsageError,
)
from ..images import BackgroundLoad, PreparedImage, check, load, looks_like_image_path
from ..modelref import ModelFiles
from ..options import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    PROMPT_MAX_BYTES,
    RuntimeOptions,
    SamplingParams,
)
from ..structured import AnswerRejected, Constraint, constraint_from
from ..units import plural, rate

if TYPE_CHECKING:
    from ..conversation import Conversation
    from ..templates import ChatFormat


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """What ``ask`` and ``chat`` share: the model, how it runs, how it samples."""

    model: str | None = None
    mmproj: str | None = None
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    offline: bool = False
    yes: bool = False  # pull without asking, however large (-y, LLAVA_YES)
    think: bool = False

    def check_image(self, source: str) -> None:
        """The image checked as far as can be without decoding it (see images.check)."""
        check(source, max_pixels=self.max_pixels, max_bytes=self.max_image_bytes)

    def load_image(self, source: str) -> PreparedImage:
        """An image file (or ``-``) read and decoded within this run's limits."""
        return load(source, max_pixels=self.max_pixels, max_bytes=self.max_image_bytes)


@dataclass(frozen=True, kw_only=True)
class AskOptions(ModelOptions):
    images: list[str]
    prompt: str | None = None
    together: bool = False
    json: bool = False
    show_prompt: bool = False
    label: bool | None = None  # None: a header before each answer when there are several
    json_schema: str | None = None  # a file, or inline JSON: the answer must be valid for it
    grammar: str | None = None  # a GBNF file the answer is constrained to


def split_arguments(args: list[str]) -> tuple[list[str], str | None]:
    """``IMAGE... [QUESTION]``: the trailing arguments that do not name images (see
    images.looks_like_image_path) are the question, as ``ollama run`` and ``llm`` take it:
    ``llava ask photo.jpg "What is this?"``."""
    end = len(args)
    while end > 0 and not looks_like_image_path(args[end - 1]):
        end -= 1
    words = args[end:]
    for arg in args[:end]:  # words before an image: a question in the wrong place
        if not looks_like_image_path(arg) and any(c.isspace() for c in arg):
            raise UsageError(
                f"{arg!r} is not an image, and the question goes after the images",
                "put the images first, then the question in quotes",
            )
    return args[:end], " ".join(words) if words else None


@dataclass
class _Runner:
    """Loads the model on first use, so a batch of only bad images never pays for it."""

    opts: AskOptions
    files: ModelFiles | None
    conversation: Conversation | None = None
    failures: list[LlavaError] = field(default_factory=list)
    stdin_image: PreparedImage | None = None  # '-' is read once, when the images are checked
    constraint: Constraint | None = None  # --json-schema / --grammar, read before the model
    sampling: SamplingParams = field(default_factory=SamplingParams)  # with its grammar, if any
    answers: int = 0  # answers written so far (labels are parted by a blank line)

    def get(self) -> Conversation:
        if self.conversation is None:
            assert self.files is not None, "model files not resolved"
            if not self.opts.runtime.verbose:
                render.status(f"loading {self.files.name}")
            self.conversation = _load(self.opts, self.files)
        return self.conversation

    def image(self, source: str) -> PreparedImage:
        if source == "-" and self.stdin_image is not None:
            return self.stdin_image
        if self.conversation is None and self.files is not None and source != "-":
            return self._image_while_loading(source)
        return self.opts.load_image(source)

    def _image_while_loading(self, source: str) -> PreparedImage:
        """The first image decoded on a thread while the model loads (images.
        BackgroundLoad): the same image, or the same ImageError, as decoding it first.
        When both fail, the image's error wins, as it did when the model was loaded only
        after the image was decoded; a bad image stops the load as soon as it is known, so it
        costs about what it did then. On Ctrl-C the decoding is left behind."""
        from ..engine.native import INTERRUPTS

        opts = self.opts
        prepared = BackgroundLoad(
            source, max_pixels=opts.max_pixels, max_bytes=opts.max_image_bytes
        )
        try:
            with INTERRUPTS.loading_unless(prepared.failed):
                self.get()
        except Exception:
            prepared()  # raises the image's ImageError, if it has one
            raise
        return prepared()

    @property
    def labelled(self) -> bool:
        """A ``==> NAME <==`` line before each answer (as ``head`` and ``tail`` write them):
        with --label, or by default when several images get an answer each."""
        opts = self.opts
        if opts.json or opts.together:
            return False
        return opts.label if opts.label is not None else len(opts.images) > 1

    def close(self) -> None:
        if self.conversation is not None:
            self.conversation.loaded.close()
            self.conversation = None


def read_prompt(opts: AskOptions) -> str:
    """``-p``; else text piped on stdin (unless stdin carries an image); else the default.

    Bytes that are not UTF-8 (a Latin-1 file, a stray byte in an argument) become U+FFFD
    rather than an error: the model can still read the rest.
    """
    if opts.prompt is not None:
        return opts.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    stdin = sys.stdin
    if "-" not in opts.images and stdin is not None and not stdin.isatty():
        data = stdin.buffer.read(PROMPT_MAX_BYTES + 1)
        if len(data) > PROMPT_MAX_BYTES:
            raise BadInput(
                f"the prompt on standard input is more than {PROMPT_MAX_BYTES >> 20} MiB, far "
                "more than any context holds",
                "pipe in the question alone",
            )
        piped = data.decode("utf-8", "replace").strip()
        if piped:
            return piped
    return DEFAULT_PROMPT


def run(opts: AskOptions) -> int:
    settings = environment()
    if not opts.images:
        hint = "llava ask IMAGE... 'question'"
        if opts.prompt is not None:  # every argument read as words: say which
            raise UsageError(f"no image given (read {opts.prompt!r} as the question)", hint)
        raise UsageError("no image given", hint)
    if opts.images.count("-") > 1:
        raise UsageError(
            "standard input ('-') can be read only once", "pass one image as '-', the rest as files"
        )
    check_chat_format(opts.runtime.chat_format)
    constraint = constraint_from(opts.json_schema, opts.grammar, verbose=opts.runtime.verbose)
    if constraint is not None:
        _check_constraint_options(opts)
    prompt = read_prompt(opts)
    # Every image is checked before a model is resolved: a typo must not cost a download.
    runner = _Runner(opts, files=None, constraint=constraint, sampling=opts.sampling)
    if constraint is not None:
        runner.sampling = replace(opts.sampling, grammar=constraint.grammar)
    checked = _check_images(runner)
    failed = [(source, failure) for source, failure in checked if failure is not None]
    if failed:  # nothing is resolved, pulled or loaded for a batch with a bad image in it
        for source, failure in failed:
            _report_failure(runner, source, failure, said=True)
        if len(failed) < len(checked):
            render.info(
                f"nothing was asked: {plural(len(failed), 'image')} of {len(checked)} cannot be "
                "read, and the model is loaded only for a batch that can be answered"
            )
        return _exit_code(runner.failures)
    offline = settings.offline(opts.offline)
    runner.files = model_files(opts.model, opts.mmproj, offline=offline, yes=opts.yes)
    sources = list(opts.images)
    if opts.show_prompt:
        return _show_prompt(opts, runner.files, prompt, sources, runner.stdin_image)
    try:
        if opts.together:
            _answer_together(runner, sources, prompt)
        else:
            for number, source in enumerate(sources, 1):
                _answer_one(runner, source, prompt, number)
    finally:
        runner.close()
    return _exit_code(runner.failures)


def _check_constraint_options(opts: AskOptions) -> None:
    """Options that cannot go with a grammar: --stop would cut the answer where the grammar
    cannot see it (both end as "stop"), and the grammar holds the whole generation, so a
    model's thinking could never close."""
    flag = "--json-schema" if opts.json_schema is not None else "--grammar"
    if opts.sampling.stop:
        raise UsageError(
            f"--stop cannot be used with {flag}", "the grammar decides where the answer ends"
        )
    if opts.think:
        raise UsageError(
            f"--think cannot be used with {flag}", "the grammar holds everything the model writes"
        )


def _exit_code(failures: list[LlavaError]) -> int:
    if not failures:
        return EXIT_OK
    if any(isinstance(f, BadInput) for f in failures):
        return EXIT_BAD_INPUT
    return failures[0].exit_code


def _check_images(runner: _Runner) -> list[tuple[str, ImageError | None]]:
    """Each image with what is wrong with it (see images.check), said on stderr at once.
    The image on standard input is read (and decoded) here, once."""
    opts, checked = runner.opts, []
    for source in opts.images:
        failure: ImageError | None = None
        try:
            if source == "-":
                runner.stdin_image = opts.load_image(source)
            else:
                opts.check_image(source)
        except ImageError as exc:
            render.error(exc.one_line())
            failure = exc
        checked.append((source, failure))
    return checked


def _report_failure(runner: _Runner, source: str, exc: LlavaError, *, said: bool = False) -> None:
    """One image failed: counted, said on stderr (unless it was already), and with --json
    given its record in the place of its answer."""
    runner.failures.append(exc)
    if not said:
        render.error(exc.one_line())
    if runner.opts.json:
        render.json_line({"image": source, "error": exc.one_line(), "exit_code": exc.exit_code})


def check_chat_format(name: str) -> None:
    """A --chat-format is checked before anything is resolved, pulled or loaded."""
    from ..templates import OWN_FORMATS, check_format_name

    if name not in OWN_FORMATS:  # the built-in names need llama.cpp loaded
        from ..engine import builtin_templates

        check_format_name(name, builtin_templates.names())


def warn_if_no_thinking(opts: ModelOptions, fmt: ChatFormat) -> None:
    if opts.think and fmt.thinking is None:
        render.info(
            "--think: this model's chat template has no thinking block; it answers directly"
        )


def note_unanswered(conversation: Conversation) -> None:
    """A reasoning model that thought but gave no answer: say so (stdout stays empty)."""
    reply = conversation.last_reply
    if reply is None or reply.answer.strip() or not reply.thinking:
        return
    if conversation.last.finish_reason == "length":
        render.info(
            "the model was still thinking when it was cut off (max-tokens or a full context) "
            "and gave no answer — allow more tokens, or leave --think off"
        )
    else:
        render.info("the model thought but gave no answer")


def _show_prompt(
    opts: AskOptions,
    files: ModelFiles,
    prompt: str,
    sources: list[str],
    stdin_image: PreparedImage | None,
) -> int:
    """Print the prompt each run would evaluate: images checked, never encoded. Exactly the
    text (no newline added unless stdout is a terminal); several prompts are parted by a
    newline, or with --json each is a JSON line of its own."""
    from ..conversation import prompt_format, render_turn

    for source in sources:  # decoded too: what the model would get must be readable
        if source != "-" or stdin_image is None:
            opts.load_image(source)
    fmt = prompt_format(files.model, files.mmproj, opts.runtime, files.chat_format)
    warn_if_no_thinking(opts, fmt)
    groups = [sources] if opts.together else [[source] for source in sources]
    for i, group in enumerate(groups):
        rendered = render_turn(fmt, opts.system, [], prompt, len(group), think=opts.think)
        if opts.json:
            key = {"images": group} if opts.together else {"image": group[0]}
            render.json_line({**key, "prompt": rendered.text})
        else:
            render.exact_text(("\n" if i else "") + rendered.text)
    return EXIT_OK


def model_files(
    model: str | None, mmproj: str | None, *, offline: bool, yes: bool = False
) -> ModelFiles:
    """The model's files; one not on disk is pulled first, announced (and asked about, on a
    terminal, when large), with progress on stderr; see commands.pull.files_for_run.
    ``offline``: ``--offline`` or ``HF_HUB_OFFLINE`` (``config.Environment.offline``)."""
    from ..modelref import resolve_local

    # Files named on the command line, or already on disk, need nothing of commands.pull
    # (which brings the hub client, its TLS and sockets: ~20 ms of imports).
    found = resolve_local(model, mmproj, offline=offline)
    if isinstance(found, ModelFiles):
        return found
    from .pull import files_for_run

    return files_for_run(model, mmproj, offline=offline, yes=yes)


def _answer_one(runner: _Runner, source: str, prompt: str, number: int = 1) -> None:
    opts = runner.opts
    try:
        image = runner.image(source)
        header = None
        if runner.labelled:  # as head(1): a blank line before every header but the first
            header = f"{chr(10) if runner.answers else ''}==> {source} <==\n"
        many = len(opts.images) > 1
        place = f"{number} of {len(opts.images)}: {source}" if many else None
        parsed = _ask(runner, [image], prompt, header=header, place=place)
        runner.answers += 1
    except (ImageError, ContextOverflow, AnswerRejected) as exc:  # this image's problem
        _report_failure(runner, source, exc)  # go on with the rest
        return
    if opts.json:
        record = {"image": source, "sha256": image.sha256, **_record(runner, prompt, parsed)}
        render.json_line(record)


def _answer_together(runner: _Runner, sources: list[str], prompt: str) -> None:
    opts = runner.opts
    prepared = [runner.image(source) for source in sources]
    parsed = _ask(runner, prepared, prompt)
    if opts.json:
        images = [{"image": p.source, "sha256": p.sha256} for p in prepared]
        render.json_line({"images": images, **_record(runner, prompt, parsed)})


def _load(opts: AskOptions, files: ModelFiles) -> Conversation:
    from ..conversation import Conversation, open_model

    loaded = open_model(files.model, files.mmproj, opts.runtime, known_format=files.chat_format)
    warn_if_no_thinking(opts, loaded.fmt)
    if opts.runtime.verbose:
        render.info(
            f"loaded {files.model.name} + {files.mmproj.name} in {loaded.engine.load_s:.2f} s "
            f"(context {loaded.session.n_ctx}, {loaded.engine.n_threads} threads, "
            f"format: {loaded.fmt.name})"
        )
    return Conversation(loaded, system=opts.system, think=opts.think)


def _ask(
    runner: _Runner,
    images: Sequence[PreparedImage],
    prompt: str,
    *,
    header: str | None = None,
    place: str | None = None,
) -> Any:
    """Answer one prompt; the answer streams to stdout (unless --json). Under a constraint
    (--json-schema, --grammar) the answer is held back until it is checked, so that stdout
    never carries one that fails: returns it parsed (or raises AnswerRejected)."""
    opts, constraint = runner.opts, runner.constraint
    conversation = runner.get()
    conversation.reset()  # each answer stands alone; the shared prefix stays in the KV cache
    session = conversation.loaded.session
    if not opts.runtime.verbose:  # llama.cpp's log lines would land on the status line
        session.on_progress = render.status
        if place is not None:  # which image of a batch: "encoding image (2 of 5: b.png)"
            session.on_progress = lambda what: render.status(f"{what} ({place})")
    try:
        if opts.json or constraint is not None:  # held back: the record, or until checked
            for i, _ in enumerate(conversation.ask(prompt, images, runner.sampling)):
                if i == 0 and session.on_progress is not None:
                    session.on_progress("writing the answer")
        else:
            echo = render.ThinkingEcho()
            chunks = echo.answer(conversation.ask(prompt, images, runner.sampling, echo))
            render.stream_answer(_headed(chunks, header))
    finally:
        session.on_progress = None
        render.status_clear()
    note_unanswered(conversation)
    completion = conversation.last
    if opts.runtime.verbose:
        _say_work(conversation, images)
    if constraint is None:
        return None
    reply = conversation.last_reply
    answer = reply.answer if reply is not None else ""
    tokens = completion.usage.completion_tokens
    parsed = constraint.check(answer, completion.finish_reason, tokens=tokens)
    if not opts.json:
        if constraint.schema is not None and not render.can_encode(sys.stdout, answer):
            # a narrow locale would turn "é" into "?" and break the JSON: escape it instead
            answer = json.dumps(parsed)
        render.stream_answer(_headed([answer], header))
    return parsed


def _say_work(conversation: Conversation, images: Sequence[PreparedImage]) -> None:
    """--verbose: what each image cost, and where the time went."""
    session = conversation.loaded.session
    for image in images:
        tokens = session.image_tokens(image.key)
        render.info(f"image {image.source}: {image.describe()}, {tokens} context tokens")
    t, u = conversation.last.timings, conversation.last.usage
    render.info(
        f"prompt {u.prompt_tokens} tokens ({u.image_tokens} image, {u.cached_tokens} cached), "
        f"completion {u.completion_tokens}; encode {t.image_encode_s:.2f} s, "
        f"prefill {t.prefill_s:.2f} s, first token {t.ttft_s:.2f} s, "
        f"{rate(u.completion_tokens - 1, t.decode_s, 'tokens')}"
    )


def _headed(chunks: Iterable[str], header: str | None) -> Iterator[str]:
    """The answer after its header, if it has one: written with the answer's first text, so
    that a failure before it leaves no header without an answer."""
    if header is None:
        yield from chunks
        return
    for chunk in chunks:
        if header:
            yield header
            header = ""
        yield chunk
    if header:  # an empty answer still says whose it is
        yield header


def _record(runner: _Runner, prompt: str, parsed: Any) -> dict[str, Any]:
    from dataclasses import asdict

    files, conversation = runner.files, runner.get()
    assert files is not None, "model files not resolved"
    completion = conversation.last
    reply = conversation.last_reply
    assert reply is not None, "no answer yet"
    thinking = {"thinking": reply.thinking} if reply.thinking else {}
    structured = {"parsed": parsed} if runner.constraint is not None else {}
    return {
        "model": files.name,
        "model_path": str(files.model),
        "mmproj_path": str(files.mmproj),
        "prompt": prompt,
        "answer": reply.answer,
        **structured,
        **thinking,
        "finish_reason": completion.finish_reason,
        "seed": completion.seed,
        "usage": asdict(completion.usage),
        "timings": {k: round(v, 4) for k, v in asdict(completion.timings).items()},
        "devices": conversation.loaded.engine.devices,  # the text model's layers and bytes
    }

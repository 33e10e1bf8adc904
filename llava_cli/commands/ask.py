"""``llava ask``: one answer per image (or one for all with ``--together``), for pipelines."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import render
from ..config import DEFAULT_PROMPT
from ..errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    BadInput,
    ContextOverflow,
    ImageError,
    LlavaError,
    UsageError,
)
from ..images import PreparedImage, check, load, looks_like_image_path
from ..modelref import ModelFiles, resolve
from ..options import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    PROMPT_MAX_BYTES,
    RuntimeOptions,
    SamplingParams,
)

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


def split_arguments(args: list[str]) -> tuple[list[str], str | None]:
    """``IMAGE... [QUESTION]``: the trailing arguments that do not name images (see
    images.looks_like_image_path) are the question, as ``ollama run`` and ``llm`` take it:
    ``llava ask photo.jpg "What is this?"``."""
    end = len(args)
    while end > 0 and not looks_like_image_path(args[end - 1]):
        end -= 1
    words = args[end:]
    return args[:end], " ".join(words) if words else None


@dataclass
class _Runner:
    """Loads the model on first use, so a batch of only bad images never pays for it."""

    opts: AskOptions
    files: ModelFiles
    conversation: Conversation | None = None
    failures: list[LlavaError] = field(default_factory=list)

    def get(self) -> Conversation:
        if self.conversation is None:
            self.conversation = _load(self.opts, self.files)
        return self.conversation

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
    if not opts.images:
        raise UsageError("no image given", "llava ask IMAGE... -p 'question'")
    if opts.images.count("-") > 1:
        raise UsageError("standard input ('-') can be read only once")
    check_chat_format(opts.runtime.chat_format)
    prompt = read_prompt(opts)
    files = model_files(opts.model, opts.mmproj, offline=opts.offline)
    if opts.show_prompt:
        return _show_prompt(opts, files, prompt)
    runner = _Runner(opts, files)
    try:
        if opts.together:
            _answer_together(runner, prompt)
        else:
            for source in opts.images:
                _answer_one(runner, source, prompt)
    finally:
        runner.close()
    if not runner.failures:
        return EXIT_OK
    if any(isinstance(f, BadInput) for f in runner.failures):
        return EXIT_BAD_INPUT
    return runner.failures[0].exit_code


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


def _show_prompt(opts: AskOptions, files: ModelFiles, prompt: str) -> int:
    """Print the prompt each run would evaluate: images checked, never encoded. Exactly the
    text (no newline added unless stdout is a terminal); several prompts are parted by a
    newline, or with --json each is a JSON line of its own."""
    from ..conversation import prompt_format, render_turn

    for source in opts.images:  # every image checked before the model is read
        _prepare(source, opts)
    fmt = prompt_format(files.model, files.mmproj, opts.runtime, files.chat_format)
    warn_if_no_thinking(opts, fmt)
    groups = [opts.images] if opts.together else [[source] for source in opts.images]
    for i, group in enumerate(groups):
        rendered = render_turn(fmt, opts.system, [], prompt, len(group), think=opts.think)
        if opts.json:
            key = {"images": group} if opts.together else {"image": group[0]}
            render.json_line({**key, "prompt": rendered.text})
        else:
            render.exact_text(("\n" if i else "") + rendered.text)
    return EXIT_OK


def model_files(model: str | None, mmproj: str | None, *, offline: bool) -> ModelFiles:
    """The model's files, pulled first (progress on stderr) unless offline."""
    from ..config import hub_offline

    with render.transfer_progress() as progress:
        return resolve(model, mmproj, offline=offline or hub_offline(), progress=progress)


def _prepare(source: str, opts: AskOptions) -> PreparedImage:
    return opts.load_image(source)


def _answer_one(runner: _Runner, source: str, prompt: str) -> None:
    opts = runner.opts
    if len(opts.images) > 1 and not opts.json and render.stderr_is_terminal():
        render.info(f"==> {source} <==")  # which answer is which, for a reader at a terminal
    try:
        image = _prepare(source, opts)
        conversation = runner.get()
        _ask(conversation, [image], prompt, opts)
    except (ImageError, ContextOverflow) as exc:  # this image's problem: go on with the rest
        runner.failures.append(exc)
        render.error(exc.one_line())
        if opts.json:
            render.json_line({"image": source, "error": exc.one_line(), "exit_code": exc.exit_code})
        return
    if opts.json:
        render.json_line(
            {"image": source, "sha256": image.sha256, **_record(runner.files, conversation, prompt)}
        )


def _answer_together(runner: _Runner, prompt: str) -> None:
    opts = runner.opts
    prepared = [_prepare(source, opts) for source in opts.images]
    conversation = runner.get()
    _ask(conversation, prepared, prompt, opts)
    if opts.json:
        images = [{"image": p.source, "sha256": p.sha256} for p in prepared]
        render.json_line({"images": images, **_record(runner.files, conversation, prompt)})


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
    conversation: Conversation, images: Sequence[PreparedImage], prompt: str, opts: AskOptions
) -> None:
    conversation.reset()  # each answer stands alone; the shared prefix stays in the KV cache
    if opts.json:
        for _ in conversation.ask(prompt, images, opts.sampling):
            pass
    else:
        echo = render.ThinkingEcho()
        render.stream_answer(echo.answer(conversation.ask(prompt, images, opts.sampling, echo)))
    note_unanswered(conversation)
    completion = conversation.last
    if opts.runtime.verbose:
        session = conversation.loaded.session
        for image in images:
            tokens = session.image_tokens(image.key)
            render.info(f"image {image.source}: {image.describe()}, {tokens} context tokens")
        t, u = completion.timings, completion.usage
        render.info(
            f"prompt {u.prompt_tokens} tokens ({u.image_tokens} image, {u.cached_tokens} cached), "
            f"completion {u.completion_tokens}; encode {t.image_encode_s:.2f} s, "
            f"prefill {t.prefill_s:.2f} s, first token {t.ttft_s:.2f} s, "
            f"{t.decode_tokens_per_s:.1f} tokens/s"
        )


def _record(files: ModelFiles, conversation: Conversation, prompt: str) -> dict[str, Any]:
    from dataclasses import asdict

    completion = conversation.last
    reply = conversation.last_reply
    assert reply is not None, "no answer yet"
    thinking = {"thinking": reply.thinking} if reply.thinking else {}
    return {
        "model": files.name,
        "model_path": str(files.model),
        "mmproj_path": str(files.mmproj),
        "prompt": prompt,
        "answer": reply.answer,
        **thinking,
        "finish_reason": completion.finish_reason,
        "seed": completion.seed,
        "usage": asdict(completion.usage),
        "timings": {k: round(v, 4) for k, v in asdict(completion.timings).items()},
    }

"""A conversation: messages and their images over one engine Session.

Every turn re-renders the whole conversation with the chat format; the Session compares it
with what its KV cache already holds and evaluates only the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULT_CTX, settings
from .engine import Completion, Engine, LoadOptions, Session
from .engine.rpc import endpoints, tensor_split
from .errors import ContextOverflow
from .images import PreparedImage
from .options import LONG_TEXT_CHARS, MAX_TOKEN_CHARS, RuntimeOptions, SamplingParams
from .templates import ChatFormat, Message, Rendered, chat_format_for
from .thinking import ThinkingSplitter


@dataclass
class LoadedModel:
    engine: Engine
    session: Session
    fmt: ChatFormat

    def close(self) -> None:
        self.session.close()
        self.engine.close()


def open_model(
    model: Path, mmproj: Path, opts: RuntimeOptions, *, known_format: str | None = None
) -> LoadedModel:
    """Load the pair and a session. ``known_format``: the registry's chat format for this
    model, which decides when the user asked for none (``auto``)."""
    engine = Engine.load(
        LoadOptions(
            model=model,
            mmproj=mmproj,
            n_threads=opts.threads,
            gpu_layers=opts.gpu_layers,
            image_on_cpu=opts.image_on_cpu,
            repack=opts.repack,
            rpc=tuple(endpoints(opts.rpc if opts.rpc is not None else settings().get("rpc"))),
            tensor_split=tensor_split(opts.tensor_split),
            verbose=opts.verbose,
        )
    )
    try:
        fmt = chat_format(engine, opts.chat_format, known_format)
        session = Session(engine, context_size(engine, opts.ctx))
        if fmt.thinking is not None:
            session.shown_tokens = engine.special_tokens_in([fmt.thinking.open, fmt.thinking.close])
        if opts.cache:
            from .cache import PrefixCache

            session.state_store = PrefixCache.default()
            session.state_salt = engine.identity()
    except BaseException:
        engine.close()
        raise
    return LoadedModel(engine, session, fmt)


def context_size(engine: Engine, wanted: int | None) -> int:
    """``--ctx``, at most what the model was trained for (more only degrades its answers and
    costs memory); by default DEFAULT_CTX, or less if the model has less."""
    from . import render

    trained = engine.n_ctx_train
    if wanted is None:
        return min(DEFAULT_CTX, trained) if trained > 0 else DEFAULT_CTX
    if 0 < trained < wanted:
        render.info(
            f"context: --ctx {wanted:,} is more than {engine.opts.model.name} was trained for; "
            f"using {trained:,} tokens"
        )
        return trained
    return wanted


def chat_format(engine: Engine, wanted: str, known_format: str | None = None) -> ChatFormat:
    """The chat format for a loaded model (the tokenizer is enough): ``wanted`` is the user's
    --chat-format; with ``auto`` the registry's format for the model, if it names one, wins."""
    from .engine import builtin_templates

    prefer = wanted
    if prefer == "auto" and known_format not in (None, "gguf"):
        prefer = known_format or "auto"
    # A template too long to read is an error only where it would be used.
    template = engine.chat_template if prefer in ("auto", "gguf") else None
    suggest = known_format if known_format not in (None, "gguf", "auto") else None
    if suggest is None and template and prefer in ("auto", "gguf"):
        suggest = builtin_templates.detect(template)
    return chat_format_for(
        template,
        bos_token=engine.special_text("bos"),
        eos_token=engine.special_text("eos"),
        prefer=prefer,
        builtin_names=builtin_templates.names(),
        apply_builtin=builtin_templates.apply,
        origin=engine.opts.model.name,
        suggest=suggest,
    )


def prompt_format(
    model: Path, mmproj: Path, opts: RuntimeOptions, known_format: str | None
) -> ChatFormat:
    """The chat format without loading weights or the projector (for --show-prompt)."""
    engine = Engine.load_vocab(LoadOptions(model=model, mmproj=mmproj, verbose=opts.verbose))
    try:
        return chat_format(engine, opts.chat_format, known_format)
    finally:
        engine.close()


@dataclass
class Exchange:
    prompt: str
    images: list[PreparedImage]
    answer: str | None = None
    thinking: str = ""


def render_turn(
    fmt: ChatFormat,
    system: str | None,
    earlier: Sequence[Message],
    prompt: str,
    n_images: int,
    *,
    think: bool = False,
) -> Rendered:
    """The whole prompt for a next user turn: system, earlier messages, this turn."""
    user = Message("user", prompt, n_images=n_images)
    return fmt.render(_with_system(system, [*earlier, user]), think=think)


def _with_system(system: str | None, messages: Sequence[Message]) -> list[Message]:
    return [Message("system", system), *messages] if system is not None else list(messages)


def _route(
    pieces: Iterable[tuple[bool, str]], on_thinking: Callable[[str], None] | None
) -> Iterator[str]:
    """The answer's pieces; the thinking's go to ``on_thinking``."""
    for is_thinking, text in pieces:
        if not is_thinking:
            yield text
        elif on_thinking is not None:
            on_thinking(text)


@dataclass(frozen=True)
class Reply:
    answer: str
    thinking: str = ""


@dataclass
class Conversation:
    loaded: LoadedModel
    system: str | None = None
    think: bool = False  # let a reasoning model think first (where its template can say no)
    messages: list[Message] = field(default_factory=list)
    images: list[PreparedImage] = field(default_factory=list)  # in order of appearance
    last_reply: Reply | None = None

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def _render(
        self, prompt: str, images: Sequence[PreparedImage], *, history: bool = True
    ) -> Rendered:
        self._check_length(prompt)
        if self.system:
            self._check_length(self.system, "the system prompt")
        earlier = self.messages if history else []
        return render_turn(
            self.loaded.fmt, self.system, earlier, prompt, len(images), think=self.think
        )

    def _check_length(self, text: str, what: str = "this message") -> None:
        """Refuse a text that cannot fit the context before it is rendered and tokenized
        whole: llama.cpp's tokenizers are superlinear on long runs without spaces (a megabyte
        of NUL bytes takes a minute), and a text of megabytes costs gigabytes there."""
        n_ctx = self.loaded.session.n_ctx
        if len(text) <= LONG_TEXT_CHARS:
            return
        if len(text) > n_ctx * MAX_TOKEN_CHARS or (
            self.loaded.engine.count_tokens_up_to(text, n_ctx) > n_ctx
        ):
            raise ContextOverflow(
                f"{what} needs more than {n_ctx:,} tokens ({len(text):,} characters), and the "
                f"context holds {n_ctx:,}",
                "shorten it, or use a larger --ctx",
            )

    def prompt_so_far(self) -> str:
        """The conversation as the model has read it (no next turn opened)."""
        rendered = self.loaded.fmt.render(
            _with_system(self.system, self.messages), add_generation_prompt=False, think=self.think
        )
        return rendered.text

    def prompt_for(self, prompt: str, images: Sequence[PreparedImage]) -> str:
        return self._render(prompt, images).text

    def measure(self, prompt: str, images: Sequence[PreparedImage], *, history: bool = True) -> int:
        """Context cells the conversation (or, without history, the system prompt and this
        turn alone) takes with this next turn; nothing is evaluated."""
        rendered = self._render(prompt, images, history=history)
        earlier = self.images if history else []
        return self.loaded.session.count(
            rendered.text, [*earlier, *images], add_special=rendered.add_bos
        )

    def ask(
        self,
        prompt: str,
        images: Sequence[PreparedImage],
        sampling: SamplingParams,
        on_thinking: Callable[[str], None] | None = None,
    ) -> Generator[str, None, None]:
        """Add a user turn and stream the answer; the answer joins the conversation.

        A reasoning model's thinking goes to ``on_thinking`` (if given), never into the
        stream; it is kept with the answer only for templates that read it back."""
        self.loaded.session.last = None
        self.last_reply = None
        user = Message("user", prompt, n_images=len(images))
        rendered = self._render(prompt, images)
        session = self.loaded.session
        session.evaluate(rendered.text, [*self.images, *images], add_special=rendered.add_bos)
        self.messages.append(user)
        self.images.extend(images)
        tags = self.loaded.fmt.thinking
        splitter = None
        if tags is not None:
            inside = tags.starts_open and (self.think or not tags.can_turn_off)
            splitter = ThinkingSplitter(tags.open, tags.close, inside=inside)
        try:
            # closing(): a stop anywhere (Ctrl-C, a closed stream) ends generate() before
            # ``session.last`` is read below
            with closing(session.generate(sampling)) as stream:
                for chunk in stream:
                    if splitter is None:
                        yield chunk
                    else:
                        yield from _route(splitter.feed(chunk), on_thinking)
                if splitter is not None:
                    yield from _route(splitter.finish(), on_thinking)
        finally:  # an answer cut short (Ctrl-C, a closed stream) stays, as far as it got
            if session.last is not None:
                if splitter is None:
                    reply = Reply(session.last.text)
                else:
                    splitter.finish()  # text held back at a stop still belongs to the reply
                    reply = Reply(splitter.answer, splitter.thinking.strip())
                self.last_reply = reply
                self.messages.append(Message("assistant", reply.answer, thinking=reply.thinking))

    def exchanges(self) -> list[Exchange]:
        """The conversation as user turns, each with its images and answer (if any)."""
        out: list[Exchange] = []
        seen = 0
        for message in self.messages:
            if message.role == "user":
                images = self.images[seen : seen + message.n_images]
                seen += message.n_images
                out.append(Exchange(message.content, images))
            elif out and out[-1].answer is None:
                out[-1].answer = message.content
                out[-1].thinking = message.thinking
        return out

    def drop(self, index: int) -> Exchange:
        """Remove one exchange (a user turn and its answer) with its images."""
        exchanges = self.exchanges()
        gone = exchanges.pop(index)
        self.replace(exchanges)
        return gone

    def replace(self, exchanges: Sequence[Exchange]) -> None:
        self.messages.clear()
        self.images.clear()
        for ex in exchanges:
            self.messages.append(Message("user", ex.prompt, n_images=len(ex.images)))
            self.images.extend(ex.images)
            if ex.answer is not None:
                self.messages.append(Message("assistant", ex.answer, thinking=ex.thinking))

    @property
    def last(self) -> Completion:
        completion = self.loaded.session.last
        assert completion is not None, "no answer yet"
        return completion

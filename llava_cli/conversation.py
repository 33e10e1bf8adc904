"""A conversation: messages and their images over one engine Session.

Every turn re-renders the whole conversation with the chat format; the Session compares it
with what its KV cache already holds and evaluates only the difference.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULT_CTX
from .engine import Completion, Engine, LoadOptions, Session
from .images import PreparedImage
from .options import RuntimeOptions, SamplingParams
from .templates import ChatFormat, Message, chat_format_for


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
    model ("gguf" or "llava"), which decides when the user asked for none (``auto``)."""
    engine = Engine.load(
        LoadOptions(
            model=model,
            mmproj=mmproj,
            n_threads=opts.threads,
            gpu_layers=opts.gpu_layers,
            image_on_cpu=opts.image_on_cpu,
            verbose=opts.verbose,
        )
    )
    prefer = opts.chat_format
    if prefer == "auto" and known_format == "llava":  # (the registry's "gguf" is auto's way)
        prefer = "llava"
    try:
        fmt = chat_format_for(
            engine.chat_template,
            bos_token=engine.special_text("bos"),
            eos_token=engine.special_text("eos"),
            prefer=prefer,
        )
        session = engine.new_session(opts.ctx or min(DEFAULT_CTX, engine.n_ctx_train))
        if opts.cache:
            from .cache import PrefixCache

            session.state_store = PrefixCache.default()
            session.state_salt = engine.identity()
    except BaseException:
        engine.close()
        raise
    return LoadedModel(engine, session, fmt)


@dataclass
class Exchange:
    prompt: str
    images: list[PreparedImage]
    answer: str | None = None


@dataclass
class Conversation:
    loaded: LoadedModel
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    images: list[PreparedImage] = field(default_factory=list)  # in order of appearance

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def _render(
        self, prompt: str, images: Sequence[PreparedImage], *, history: bool = True
    ) -> tuple[str, bool]:
        user = Message("user", prompt, n_images=len(images))
        head = [Message("system", self.system)] if self.system is not None else []
        earlier = self.messages if history else []
        rendered = self.loaded.fmt.render([*head, *earlier, user])
        return rendered.text, rendered.add_bos

    def measure(self, prompt: str, images: Sequence[PreparedImage], *, history: bool = True) -> int:
        """Context cells the conversation (or, without history, the system prompt and this
        turn alone) takes with this next turn; nothing is evaluated."""
        text, add_bos = self._render(prompt, images, history=history)
        earlier = self.images if history else []
        return self.loaded.session.count(text, [*earlier, *images], add_special=add_bos)

    def ask(
        self, prompt: str, images: Sequence[PreparedImage], sampling: SamplingParams
    ) -> Generator[str, None, None]:
        """Add a user turn and stream the answer; the answer joins the conversation."""
        self.loaded.session.last = None
        user = Message("user", prompt, n_images=len(images))
        text, add_bos = self._render(prompt, images)
        session = self.loaded.session
        session.evaluate(text, [*self.images, *images], add_special=add_bos)
        self.messages.append(user)
        self.images.extend(images)
        try:
            yield from session.generate(sampling)
        finally:  # an answer cut short (Ctrl-C, a closed stream) stays, as far as it got
            if session.last is not None:
                self.messages.append(Message("assistant", session.last.text))

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
                self.messages.append(Message("assistant", ex.answer))

    @property
    def last(self) -> Completion:
        completion = self.loaded.session.last
        assert completion is not None, "no answer yet"
        return completion

"""A conversation: messages and their images over one engine Session.

Every turn re-renders the whole conversation with the chat format; the Session compares it
with what its KV cache already holds and evaluates only the difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def open_model(model: Path, mmproj: Path, opts: RuntimeOptions) -> LoadedModel:
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
    try:
        fmt = chat_format_for(
            engine.chat_template,
            bos_token=engine.special_text("bos"),
            eos_token=engine.special_text("eos"),
            prefer=opts.chat_format,
        )
        session = engine.new_session(opts.ctx or min(DEFAULT_CTX, engine.n_ctx_train))
    except BaseException:
        engine.close()
        raise
    return LoadedModel(engine, session, fmt)


@dataclass
class Conversation:
    loaded: LoadedModel
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    images: list[PreparedImage] = field(default_factory=list)  # in order of appearance

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def ask(
        self, prompt: str, images: Sequence[PreparedImage], sampling: SamplingParams
    ) -> Iterator[str]:
        """Add a user turn and stream the answer; the answer joins the conversation."""
        self.loaded.session.last = None
        user = Message("user", prompt, n_images=len(images))
        head = [Message("system", self.system)] if self.system is not None else []
        rendered = self.loaded.fmt.render([*head, *self.messages, user])
        session = self.loaded.session
        session.evaluate(rendered.text, [*self.images, *images], add_special=rendered.add_bos)
        self.messages.append(user)
        self.images.extend(images)
        try:
            yield from session.generate(sampling)
        finally:  # an answer cut short (Ctrl-C, a closed stream) stays, as far as it got
            if session.last is not None:
                self.messages.append(Message("assistant", session.last.text))

    @property
    def last(self) -> Completion:
        completion = self.loaded.session.last
        assert completion is not None, "no answer yet"
        return completion

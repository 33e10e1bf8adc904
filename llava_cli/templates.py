"""Chat formats: the GGUF's own ``tokenizer.chat_template`` first, legacy LLaVA/Vicuna otherwise.

A format turns a list of messages into one prompt string, with ``MEDIA_MARKER`` wherever an
image goes. Images come first in a user turn, the way the models were trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .errors import ModelFileError

MEDIA_MARKER = "<__media__>"  # the engine tells libmtmd to use exactly this marker

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    n_images: int = 0  # user turns: how many images come with it (placed before the text)


@dataclass(frozen=True)
class Rendered:
    text: str
    add_bos: bool  # the tokenizer should add BOS (the text does not start with it already)


class ChatFormat(Protocol):
    @property
    def name(self) -> str: ...

    def render(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> Rendered: ...


def _clean(text: str) -> str:
    """User text must not smuggle in image slots."""
    return text.replace(MEDIA_MARKER, "")


@dataclass(frozen=True)
class LegacyLlava:
    """LLaVA-1.5's ``conv_vicuna_v1``: ``SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: …``."""

    default_system: str = LLAVA_SYSTEM
    name: str = "llava-1.5 (vicuna)"

    def render(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> Rendered:
        system = self.default_system
        parts: list[str] = []
        for m in messages:
            if m.role == "system":
                system = _clean(m.content)
            elif m.role == "user":
                images = (MEDIA_MARKER + "\n") * m.n_images
                parts.append(f"USER: {images}{_clean(m.content)} ")
            else:
                parts.append(f"ASSISTANT: {m.content.strip()}</s>")
        text = (system + " " if system else "") + "".join(parts)
        if add_generation_prompt:
            text += "ASSISTANT:"
        return Rendered(text, add_bos=True)


@dataclass
class JinjaFormat:
    """A Hugging Face-style Jinja chat template, rendered in a sandbox."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "gguf chat template"
    _template: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # As Hugging Face renders chat templates: trimmed blocks, loop controls, tojson.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ModelFileError(
                f"the model's chat template does not parse: {exc}", "use --chat-format llava"
            ) from None

    def render(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> Rendered:
        msgs = [
            {
                "role": m.role,
                "content": MEDIA_MARKER * m.n_images + _clean(m.content)
                if m.role == "user"
                else _clean(m.content),
            }
            for m in messages
        ]
        try:
            text = self._template.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:  # a template is code: anything can go wrong in it
            raise ModelFileError(
                f"the model's chat template failed: {type(exc).__name__}: {exc}",
                "use --chat-format llava",
            ) from None
        add_bos = not (self.bos_token and text.startswith(self.bos_token))
        return Rendered(text, add_bos=add_bos)


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    import json

    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def chat_format_for(
    template: str | None, *, bos_token: str = "", eos_token: str = "", prefer: str = "auto"
) -> ChatFormat:
    """``prefer``: "auto" (the GGUF's template when it has one), "gguf", or "llava"."""
    if prefer == "llava" or (prefer == "auto" and not template):
        return LegacyLlava()
    if not template:
        raise ModelFileError(
            "the model has no chat template (tokenizer.chat_template)", "use --chat-format llava"
        )
    return JinjaFormat(template, bos_token=bos_token, eos_token=eos_token)

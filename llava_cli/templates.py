"""Chat formats: the GGUF's own ``tokenizer.chat_template``, llama.cpp's built-in formats by name,
and the legacy LLaVA-1.5 (Vicuna v1) layout.

A format turns a list of messages into one prompt string with ``MEDIA_MARKER`` wherever an
image goes; libmtmd adds each model's own image wrapper tokens around it.

A Jinja template is code from the model file: it runs in Jinja's sandbox in a process of its
own, bounded in time, output and memory (``template_sandbox``; ``RENDER_SECONDS`` and after).

A Jinja template is read the way the model's own processor feeds it. What it needs is found by
rendering small probes once, as llama.cpp's Jinja engine does (``common/jinja/caps.cpp``), never
by model name:

* whether a role's content must be a list of typed parts (``[{"type": "image"}, {"type":
  "text", "text": …}]``, Idefics3/SmolVLM, Gemma, Qwen-VL) or a plain string;
* what the template writes for an image part (``<image>``, ``<start_of_image>``,
  ``<|vision_start|><|image_pad|><|vision_end|>``): that text becomes the media marker;
* whether it keeps a system message; if not, the system text goes at the front of the first
  user turn, as llama.cpp does;
* whether it opens a thinking block and can turn it off (``enable_thinking``).

Longer than our ~400 lines on purpose: the probes and the renderer share what the probes
found (the image text, each role's content shape), which is this module's one job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ModelFileError
from .template_sandbox import (
    OUTPUT_CHARS,
    RENDER_MEMORY,
    RendererStopped,
    TemplateFailed,
    shared_renderer,
)

MEDIA_MARKER = "<__media__>"  # the engine tells libmtmd to use exactly this marker

# LLaVA-1.5's training conversation (upstream llava/conversation.py, conv_vicuna_v1).
LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Names that --chat-format and a registry entry's chat_format accept besides llama.cpp's
# built-in template names.
OWN_FORMATS = ("auto", "gguf", "llava")

# Thinking blocks as reasoning models write them: (opening text, closing text).
THINKING_TAGS = (
    ("<think>", "</think>"),  # Qwen3, Qwen3.5, QwQ, DeepSeek-R1, MiMo-VL
    ("<|channel>thought", "<channel|>"),  # Gemma 4
)

BuiltinApply = Callable[[str, Sequence[tuple[str, str]], bool], str]

# A Jinja template is code from the model file. It is rendered in a child process (see
# _Renderer): one that runs too long is killed there, wherever it is stuck (a comparison of
# two deep structures can run for hours inside one C call, out of reach of any check made
# from Python), and one that allocates too much fails there, so the CLI itself stays small
# and only has to say what happened, in one line.
RENDER_SECONDS = 1.0  # one rendering of a short conversation, and
RENDER_SECONDS_PER_MESSAGE = 0.01  # per message more (Gemma 4's template scans ahead from each)
PREPARE_SECONDS = 2.0  # parsing the template and rendering every probe, all together


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    n_images: int = 0  # user turns: how many images come with it (placed before the text)
    thinking: str = ""  # assistant turns: the reasoning that came before the answer


@dataclass(frozen=True)
class Rendered:
    text: str
    add_bos: bool  # the tokenizer should add BOS (the text does not start with it already)


@dataclass(frozen=True)
class Thinking:
    """How a reasoning model's template marks its thinking."""

    open: str
    close: str
    can_turn_off: bool  # the template reads enable_thinking
    starts_open: bool  # with thinking on, the prompt already opened the block


class ChatFormat(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def thinking(self) -> Thinking | None: ...

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        think: bool = False,
    ) -> Rendered: ...


def _clean(text: str, *also: str) -> str:
    """User text must not smuggle in image slots."""
    for marker in (MEDIA_MARKER, *also):
        if marker:
            text = text.replace(marker, "")
    return text


def _string_content(m: Message, *, image_line: bool = True) -> str:
    """A turn as one string, its images' markers first. ``image_line``: each marker on a line
    of its own, as LLaVA-style models were trained (``<image>\\nQuestion``); without it the
    markers run straight into the text, as llama.cpp's own tools write them."""
    if m.role == "user":
        return (MEDIA_MARKER + ("\n" if image_line else "")) * m.n_images + _clean(m.content)
    return _clean(m.content)


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    """For templates without a system role: the system text goes in front of the first user
    turn's question, after its images, which stay first as LLaVA-style models were trained
    (llama.cpp folds it the same way but in front of the images); with no user turn it is
    dropped."""
    system = [m.content for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    if not system:
        return rest
    text = "\n".join(system)
    for i, m in enumerate(rest):
        if m.role == "user":
            rest[i] = Message("user", text + "\n" + m.content, m.n_images)
            break
    return rest


@dataclass(frozen=True)
class LegacyLlava:
    """LLaVA-1.5's ``conv_vicuna_v1``: ``SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: …``."""

    default_system: str = LLAVA_SYSTEM
    name: str = "llava (LLaVA-1.5 Vicuna v1)"
    thinking: Thinking | None = None

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        think: bool = False,
    ) -> Rendered:
        system = self.default_system
        parts: list[str] = []
        for m in messages:
            if m.role == "system":
                system = _clean(m.content)
            elif m.role == "user":
                parts.append(f"USER: {_string_content(m)} ")
            else:
                parts.append(f"ASSISTANT: {m.content.strip()}</s>")
        text = (system + " " if system else "") + "".join(parts)
        if add_generation_prompt:
            text += "ASSISTANT:"
        return Rendered(text, add_bos=True)


@dataclass(frozen=True)
class BuiltinFormat:
    """One of llama.cpp's built-in formats (``vicuna``, ``mistral-v7``, …), rendered by
    llama.cpp itself (``llama_chat_apply_template``, through the engine). Images go as
    llama.cpp's ``llama-mtmd-cli`` puts them: their markers right before the text."""

    template: str
    apply: BuiltinApply = field(repr=False)
    origin: str = "the model"
    thinking: Thinking | None = None

    @property
    def name(self) -> str:
        return f"{self.template} (llama.cpp built-in)"

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        think: bool = False,
    ) -> Rendered:
        pairs = [(m.role, _string_content(m, image_line=False)) for m in messages]
        try:
            text = self.apply(self.template, pairs, add_generation_prompt)
        except ValueError as exc:
            raise ModelFileError(
                f"{self.origin}: llama.cpp's {self.template!r} chat format failed: {exc}",
                "choose another with --chat-format; --show-prompt shows the prompt",
            ) from None
        return Rendered(text, add_bos=True)


@dataclass(frozen=True)
class _Caps:
    """What a Jinja template needs, found by probing it (see the module docstring)."""

    typed: dict[str, bool]  # per role: content as a list of typed parts (else a string)
    image_text: str | None  # what the template writes for an image part (typed user turns)
    system_role: bool
    thinking: Thinking | None


_PROBE = "llava-probe-7f3a"  # text no template writes of its own; lowercase, no edge spaces
_PROBE_2 = "llava-probe-2c9e"
_PROBE_SYSTEM = "llava-probe-system-5d1b"


@dataclass
class JinjaFormat:
    """A Hugging Face-style Jinja chat template, rendered in a sandbox."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "the model"  # the file it came from, for error messages
    hint: str = "--show-prompt shows the prompt; --chat-format NAME picks another format"
    name: str = "gguf chat template"
    caps: _Caps = field(init=False, repr=False)
    _prepare_until: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Parsing and the probes share one budget: ten slow probes cannot take ten seconds.
        self._prepare_until = time.monotonic() + PREPARE_SECONDS
        reply = self._ask({"source": self.source}, PREPARE_SECONDS, "parse")
        if "invalid" in reply:
            raise ModelFileError(
                f"{self.origin}: the chat template does not parse: {reply['invalid']}", self.hint
            )
        self.caps = self._probe()
        self._prepare_until = None

    @property
    def thinking(self) -> Thinking | None:
        return self.caps.thinking

    # -- probes ---------------------------------------------------------------------------

    def _try(self, messages: list[dict[str, Any]], **extra: Any) -> str | None:
        try:
            return self._raw(messages, add_generation_prompt=True, **extra)
        except TemplateFailed:  # a probe the template rejects tells us what it needs
            return None

    def _probe(self) -> _Caps:
        def text(value: str, typed: bool) -> Any:
            return [{"type": "text", "text": value}] if typed else value

        def user(value: str, typed: bool) -> dict[str, Any]:
            return {"role": "user", "content": text(value, typed)}

        def shows(out: str | None, *needles: str) -> bool:
            # A template that prints a list of parts as Python text has not read the parts.
            printed_parts = out is not None and ("'type': 'text'" in out or '"type": "text"' in out)
            return out is not None and not printed_parts and all(n in out for n in needles)

        typed_out = self._try([user(_PROBE, True)])
        typed_user = shows(typed_out, _PROBE)
        string_user = shows(self._try([user(_PROBE, False)]), _PROBE)
        image_text = None
        if typed_user and typed_out is not None:
            with_image = self._try(
                [{"role": "user", "content": [{"type": "image"}, *text(_PROBE, True)]}]
            )
            if with_image is not None:
                image_text = _inserted(typed_out, with_image) or None
        typed = {"user": typed_user and (image_text is not None or not string_user)}

        answer = "llava-probe-answer-91e0"
        for t in (typed["user"], not typed["user"]):
            convo = [
                user(_PROBE, typed["user"]),
                {"role": "assistant", "content": text(answer, t)},
                user(_PROBE_2, typed["user"]),
            ]
            if shows(self._try(convo), answer, _PROBE_2):
                typed["assistant"] = t
                break
        else:
            typed["assistant"] = typed["user"]

        system_role = False
        typed["system"] = typed["user"]
        for t in (typed["user"], not typed["user"]):
            convo = [
                {"role": "system", "content": text(_PROBE_SYSTEM, t)},
                user(_PROBE, typed["user"]),
            ]
            if shows(self._try(convo), _PROBE_SYSTEM, _PROBE):
                system_role, typed["system"] = True, t
                break

        return _Caps(
            typed, image_text, system_role, self._probe_thinking(user(_PROBE, typed["user"]))
        )

    def _probe_thinking(self, message: dict[str, Any]) -> Thinking | None:
        tags = next((t for t in THINKING_TAGS if t[0] in self.source and t[1] in self.source), None)
        if tags is None:
            return None
        on = self._try([message], enable_thinking=True)
        off = self._try([message], enable_thinking=False)
        opened = on is not None and on.rstrip().endswith(tags[0])
        return Thinking(tags[0], tags[1], can_turn_off=on != off, starts_open=opened)

    # -- rendering ------------------------------------------------------------------------

    def _raw(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The template's text for these messages; raises ``TemplateFailed`` where the
        template raised, ``ModelFileError`` where it went past a limit."""
        variables = {
            "messages": messages,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **kwargs,
        }
        seconds = RENDER_SECONDS + RENDER_SECONDS_PER_MESSAGE * len(messages)
        max_chars = OUTPUT_CHARS + 2 * len(json.dumps(messages))
        request = {"source": self.source, "variables": variables, "max_chars": max_chars}
        doing = "render a probe" if self._prepare_until is not None else "render"
        reply = self._ask(request, seconds, doing)
        if "failed" in reply:
            raise TemplateFailed(reply["failed"])
        return str(reply["text"])

    def _ask(self, request: dict[str, Any], seconds: float, doing: str) -> dict[str, Any]:
        """The renderer's reply; its limits broken are the model file's error."""
        took = f"more than {seconds:.2g} s to {doing}"
        if self._prepare_until is not None:
            left = self._prepare_until - time.monotonic()
            if left < seconds:
                seconds, took = left, f"more than {PREPARE_SECONDS:g} s to parse and probe"
        try:
            reply = shared_renderer.ask(request, seconds)
        except RendererStopped as stop:
            if not stop.timed_out:
                raise ModelFileError(
                    f"{self.origin}: the chat template's renderer died ({stop.how})", self.hint
                ) from None
            raise ModelFileError(
                f"{self.origin}: the chat template took {took}; it was stopped",
                self.hint,
            ) from None
        limit = reply.get("limit")
        if limit == "output":
            what = f"wrote more than {request['max_chars']:,} characters"
        elif limit == "size":
            what = f"tried to build {reply['detail']}"
        elif limit == "memory":
            what = f"used more than {RENDER_MEMORY >> 20:,} MiB of memory"
        else:
            return reply
        raise ModelFileError(f"{self.origin}: the chat template {what}; it was stopped", self.hint)

    def _message(self, m: Message) -> dict[str, Any]:
        typed = self.caps.typed.get(m.role, self.caps.typed["user"])
        image_text = self.caps.image_text or ""
        if m.role == "user" and typed:
            parts: list[dict[str, Any]] = [{"type": "image"}] * m.n_images
            if body := _clean(m.content, image_text):
                parts.append({"type": "text", "text": body})
            return {"role": "user", "content": parts}
        content = _string_content(m) if m.role == "user" else _clean(m.content, image_text)
        out: dict[str, Any] = {
            "role": m.role,
            "content": [{"type": "text", "text": content}] if typed else content,
        }
        if m.thinking:  # templates that keep reasoning read this key; the others ignore it
            out["reasoning_content"] = m.thinking
        return out

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        think: bool = False,
    ) -> Rendered:
        turns = list(messages) if self.caps.system_role else _fold_system(messages)
        extra: dict[str, Any] = {}
        if self.caps.thinking is not None and self.caps.thinking.can_turn_off:
            extra["enable_thinking"] = think
        try:
            text = self._raw(
                [self._message(m) for m in turns],
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        except TemplateFailed as exc:  # a template is code: anything can go wrong in it
            raise ModelFileError(
                f"{self.origin}: the chat template failed: {exc}", self.hint
            ) from None
        n_images = sum(m.n_images for m in turns if m.role == "user")
        uses_typed_images = self.caps.typed["user"] and self.caps.image_text
        marker = self.caps.image_text if uses_typed_images else MEDIA_MARKER
        assert marker is not None
        if text.count(marker) != n_images:
            raise ModelFileError(
                f"{self.origin}: the chat template placed {text.count(marker)} of {n_images} "
                "images",
                self.hint,
            )
        text = text.replace(marker, MEDIA_MARKER)
        add_bos = not (self.bos_token and text.startswith(self.bos_token))
        return Rendered(text, add_bos=add_bos)


def _inserted(without: str, with_it: str) -> str:
    """The text a template wrote for an image part: what ``with_it`` has where ``without``
    differs, around the common start and end, without surrounding whitespace."""
    start = 0
    limit = min(len(without), len(with_it))
    while start < limit and without[start] == with_it[start]:
        start += 1
    end = 0
    while end < limit - start and without[-1 - end] == with_it[-1 - end]:
        end += 1
    return with_it[start : len(with_it) - end].strip()


def check_format_name(name: str, builtin_names: Sequence[str]) -> str:
    """A --chat-format (or registry chat_format) value, checked; raises ``UsageError``."""
    from .errors import UsageError

    if name in OWN_FORMATS or name in builtin_names:
        return name
    import difflib

    close = difflib.get_close_matches(name, [*OWN_FORMATS, *builtin_names], n=1)
    guess = f"did you mean {close[0]}? " if close else ""
    raise UsageError(
        f"unknown chat format {name!r}",
        f"{guess}use auto, gguf, llava or one of llama.cpp's: " + ", ".join(builtin_names),
    )


def chat_format_for(
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    prefer: str = "auto",
    builtin_names: Sequence[str] = (),
    apply_builtin: BuiltinApply | None = None,
    origin: str = "the model",
    suggest: str | None = None,
) -> ChatFormat:
    """The format to use.

    ``prefer``: "auto" (the GGUF's template when it has one, else the LLaVA-1.5 layout),
    "gguf" (the GGUF's template, or an error), "llava", or a llama.cpp built-in name.
    A GGUF whose ``tokenizer.chat_template`` is itself a built-in name (Moondream2's
    ``vicuna``) gets that built-in. ``suggest``: a format to name in error hints (the
    registry's, or the one llama.cpp reads the template as).
    """
    hint = "--show-prompt shows the prompt"
    if suggest and suggest != prefer:
        hint = f"try --chat-format {suggest}; " + hint
    else:
        hint += "; --chat-format NAME picks another format (auto, llava, or a llama.cpp name)"

    def builtin(name: str) -> BuiltinFormat:
        if apply_builtin is None:
            raise ModelFileError(f"llama.cpp's chat format {name!r} is not available here", hint)
        return BuiltinFormat(name, apply_builtin, origin=origin)

    empty = template is None or not template.strip()
    if prefer == "llava" or (prefer == "auto" and empty):
        return LegacyLlava()
    if prefer not in ("auto", "gguf"):
        return builtin(prefer)
    if template is None or empty:
        raise ModelFileError(
            f"{origin} has no chat template (tokenizer.chat_template)",
            "use --chat-format llava or a llama.cpp name (see llava ask --help)",
        )
    if template.strip() in builtin_names:
        return builtin(template.strip())
    return JinjaFormat(template, bos_token=bos_token, eos_token=eos_token, origin=origin, hint=hint)

"""Chat formats: the GGUF's own ``tokenizer.chat_template``, llama.cpp's built-in formats by name,
and the legacy LLaVA-1.5 (Vicuna v1) layout.

A format turns a list of messages into one prompt string with ``MEDIA_MARKER`` wherever an
image goes; libmtmd adds each model's own image wrapper tokens around it.

A Jinja template is code from the model file: it runs in Jinja's sandbox in a process of its
own, bounded in time, output and memory (see ``RENDER_SECONDS`` and the limits after it).

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
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .errors import LlavaError, ModelFileError

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
OUTPUT_CHARS = 4 << 20  # what a rendering may write, beyond twice the conversation's own text;
# no string or list it builds may be longer either
RENDER_MEMORY = 512 << 20  # address space the renderer may add to what it starts with (Linux)
_INT_BITS = 1 << 16  # the largest integer a template may build


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
        except _TemplateFailed:  # a probe the template rejects tells us what it needs
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
        """The template's text for these messages; raises ``_TemplateFailed`` where the
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
            raise _TemplateFailed(reply["failed"])
        return str(reply["text"])

    def _ask(self, request: dict[str, Any], seconds: float, doing: str) -> dict[str, Any]:
        """The renderer's reply; its limits broken are the model file's error."""
        took = f"more than {seconds:.2g} s to {doing}"
        if self._prepare_until is not None:
            left = self._prepare_until - time.monotonic()
            if left < seconds:
                seconds, took = left, f"more than {PREPARE_SECONDS:g} s to parse and probe"
        try:
            reply = _shared_renderer.ask(request, seconds)
        except _RendererStopped as stop:
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
        except _TemplateFailed as exc:  # a template is code: anything can go wrong in it
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


# -- the renderer: a child process -------------------------------------------------------------


class _TemplateFailed(Exception):
    """The template raised (``raise_exception``, an undefined value, a type error, …)."""


class _RendererStopped(Exception):
    def __init__(self, timed_out: bool, how: str = "") -> None:
        super().__init__(how)
        self.timed_out = timed_out
        self.how = how


_START_SECONDS = 60.0  # a Python start and ``import jinja2``, on a machine however busy
_SELF_STOP_GRACE = 1.0  # the renderer ends itself this long after a request's time is up
_CHILD_CODE = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from llava_cli.templates import _serve_renders; _serve_renders()"
)


class _Renderer:
    """The child process that renders chat templates for this one (``_serve_renders``), one
    JSON request and one JSON reply per line. A template past its time is killed with it."""

    def __init__(self) -> None:
        self.owner = os.getpid()  # a forked copy of this process starts its own
        root = str(Path(__file__).resolve().parents[1])
        try:
            # -P: nothing from the working directory is imported; a session of its own: Ctrl-C
            # is for the CLI, which then stops the renderer if it is busy.
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _CHILD_CODE.format(root=root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise LlavaError(
                f"cannot start the chat-template renderer ({sys.executable}): "
                f"{exc.strerror or exc}",
                "reinstall llava (make install)",
            ) from None
        try:
            self._reply(time.monotonic() + _START_SECONDS)  # {"ready": true}
        except (_RendererStopped, ValueError) as exc:
            self.close()
            raise LlavaError(
                f"the chat-template renderer did not start ({exc or 'no answer'})",
                "reinstall llava (make install)",
            ) from None

    def ask(self, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({**request, "seconds": seconds}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise _RendererStopped(False, self._how_it_ended()) from None
        return self._reply(deadline)

    def _reply(self, deadline: float) -> dict[str, Any]:
        import selectors

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        received = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not received.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise _RendererStopped(True)
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    how = self._how_it_ended()
                    raise _RendererStopped(how == "SIGALRM", how)
                received += chunk
        reply: dict[str, Any] = json.loads(received)
        return reply

    def _how_it_ended(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if code < 0:
            import signal

            return signal.Signals(-code).name
        return f"exit status {code}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class _SharedRenderer:
    """This process's one renderer: started on first use, and again after it was stopped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: _Renderer | None = None

    def ask(self, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Raises ``_RendererStopped`` when the renderer ran past ``seconds`` or died."""
        if seconds <= 0:
            raise _RendererStopped(True)
        with self.lock:
            renderer = self.current
            if (
                renderer is None
                or renderer.owner != os.getpid()
                or renderer.proc.poll() is not None
            ):
                self.stop()
                renderer = self.current = _Renderer()
            try:
                reply = renderer.ask(request, seconds)
            except BaseException:  # past its time, dead, or we were interrupted as it worked
                self.stop()
                raise
            if reply.get("limit") == "memory":  # it ends itself after that: start afresh
                self.stop()
            return reply

    def stop(self) -> None:
        if self.current is not None and self.current.owner == os.getpid():
            self.current.close()
        self.current = None


_shared_renderer = _SharedRenderer()
atexit.register(_shared_renderer.stop)


def _serve_renders() -> None:
    """The renderer's side (``python -c``, started by ``_Renderer``): a request per line on
    stdin, a reply per line on stdout, until stdin closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _cap_address_space(RENDER_MEMORY)
    env = _sandbox()
    compiled: dict[str, Any] = {}

    def send(reply: dict[str, Any]) -> None:
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.buffer.flush()

    send({"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        # Should the CLI be gone before it stops us, SIGALRM's default action ends us even
        # inside one endless C call.
        signal.setitimer(signal.ITIMER_REAL, request["seconds"] + _SELF_STOP_GRACE)
        reply = _answer(env, compiled, request)
        signal.setitimer(signal.ITIMER_REAL, 0)
        send(reply)
        if reply.get("limit") == "memory":
            return


def _cap_address_space(extra: int) -> None:
    """Limit the address space to what it is now plus ``extra``: an allocation past that is a
    ``MemoryError`` here instead of the machine's memory running out. Linux only (macOS
    ignores RLIMIT_AS); this process runs nothing but templates, so the limit is safe."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size + extra
        for other in (soft, hard):
            if other != resource.RLIM_INFINITY:
                cap = min(cap, other)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):
        pass


def _answer(env: Any, compiled: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    source = request["source"]
    try:
        template = compiled.get(source)
        if template is None:
            if len(compiled) >= 16:
                compiled.clear()
            template = compiled[source] = env.from_string(source)
    except MemoryError:
        return {"limit": "memory"}
    except Exception as exc:  # a syntax error; or nesting too deep for Python to compile
        return {"invalid": str(exc) or type(exc).__name__}
    if "variables" not in request:
        return {"parsed": True}
    env.max_chars = request["max_chars"]
    pieces: list[str] = []
    written = 0
    try:
        for piece in template.generate(**request["variables"]):
            written += len(piece)
            if written > env.max_chars:
                return {"limit": "output"}
            pieces.append(piece)
    except _TooLarge as exc:
        return {"limit": "size", "detail": str(exc)}
    except MemoryError:
        return {"limit": "memory"}
    except Exception as exc:
        return {"failed": str(exc) or type(exc).__name__}
    return {"text": "".join(pieces)}


# -- the sandbox, in the renderer ------------------------------------------------------------
# Checks made before the operations that build big values in one step, so that such a
# template gets a precise message (and macOS, where the address space cannot be capped, a
# bound); the renderer's address space and the deadline catch whatever they miss.


class _TooLarge(Exception):
    pass


def _refuse_over(size: int, limit: int, what: str, unit: str = "characters") -> None:
    if size > limit:
        raise _TooLarge(f"{what} of {size:,} {unit} (at most {limit:,})")


def _unit(value: Any) -> str:
    return "items" if isinstance(value, list | tuple) else "characters"


def _text_size(value: Any, limit: int) -> int:
    """About how long ``str(value)`` is (every string nested in it counted by its length),
    without building it: a list holding one long string a thousand times is a thousand
    times as long. Counting stops a little past ``limit``."""
    seen: dict[int, int] = {}

    def size(v: Any) -> int:
        if isinstance(v, str):
            return len(v) + 2
        if isinstance(v, bytes):
            return 4 * len(v) + 3
        if not isinstance(v, list | tuple | set | frozenset | dict):
            return 24
        if id(v) in seen:
            return seen[id(v)]
        seen[id(v)] = 5  # printed as [...] where it holds itself
        total = 2
        for item in v.items() if isinstance(v, dict) else v:
            total += size(item) + 2
            if total > limit:
                break
        seen[id(v)] = total
        return total

    return len(value) if isinstance(value, str) else size(value)


def _as_int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) else default


def _check_binop(operator: str, left: Any, right: Any, limit: int) -> None:
    sized = (str, bytes, list, tuple)
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            _refuse_over(bits, _INT_BITS, "an integer", "bits")
        elif isinstance(left, sized) and isinstance(right, int):
            _refuse_over(len(left) * right, limit, "a repeated value", _unit(left))
        elif isinstance(right, sized) and isinstance(left, int):
            _refuse_over(len(right) * left, limit, "a repeated value", _unit(right))
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _refuse_over(abs(left).bit_length() * right, _INT_BITS, "a power", "bits")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        _refuse_over(len(left) + len(right), limit, "a joined value", _unit(left))
    elif operator == "%" and isinstance(left, str | bytes):
        _refuse_over(_percent_size(left, right, limit), limit, "a formatted string")


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _percent_size(template: str | bytes, args: Any, limit: int) -> int:
    """An upper bound for ``template % args``: widths and precisions asked for, and every
    field as long as all the arguments together."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    fields = _PERCENT_FIELD.findall(text)
    values = args if isinstance(args, tuple) else (args,)
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    widths = sum(int(n) if n.isdigit() else star for f in fields for n in f if n)
    return len(text) + widths + len(fields) * _text_size(args, limit)


def _format_size(template: str, args: Sequence[Any], kwargs: dict[str, Any], limit: int) -> int:
    """An upper bound for ``template.format(*args, **kwargs)``, as ``_percent_size``."""
    import string

    values = (*args, *kwargs.values())
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    fields = widths = 0
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            fields += 1
            widths += sum(int(n) for n in re.findall(r"\d+", spec or ""))
            widths += star if "{" in (spec or "") else 0
    return len(template) + widths + fields * _text_size(values, limit)


def _check_call(
    obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int
) -> tuple[Any, ...]:
    """Methods of strings and integers that can build much more than they are given; the
    arguments to call them with (what ``join`` joins, as a list: it is read first)."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    first: Any = args[0] if args else None
    if isinstance(owner, str | bytes):
        if name == "join" and len(args) == 1:
            items = list(first)
            size = _text_size(items, limit) + len(owner) * len(items)
            _refuse_over(size, limit, "a joined string")
            return (items,)
        if name in ("center", "ljust", "rjust", "zfill"):
            _refuse_over(_as_int(first if args else kwargs.get("width")), limit, "a padded string")
        elif name == "expandtabs":
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            size = tabs * _as_int(first if args else kwargs.get("tabsize"), 8)
            _refuse_over(len(owner) + size, limit, "an expanded string")
        elif name == "replace" and len(args) >= 2:
            _refuse_over(_replaced_size(owner, args[0], args[1]), limit, "a replaced string")
        elif name == "translate":
            table = first.values() if isinstance(first, dict) else ()
            longest = max((len(v) for v in table if isinstance(v, str | bytes)), default=1)
            _refuse_over(len(owner) * longest, limit, "a translated string")
    elif isinstance(owner, int) and name == "to_bytes":
        _refuse_over(_as_int(first if args else kwargs.get("length"), 1), limit, "a value", "bytes")
    return args


def _replaced_size(text: Any, old: Any, new: Any) -> int:
    if not isinstance(text, str | bytes) or not isinstance(new, str | bytes):
        return 0
    found = text.count(old) if old else len(text) + 1
    return len(text) + found * len(new)


def _sandbox() -> Any:
    """Jinja's immutable sandbox, set up as Hugging Face renders chat templates (trimmed
    blocks, loop controls, ``tojson``, ``raise_exception``, ``strftime_now``), with size checks
    on the operations, methods and filters that build big values at once."""
    import functools

    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.nodes import Concat
    from jinja2.runtime import Context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class CheckedConcat(CodeGenerator):
        def visit_Concat(self, node: Concat, frame: Frame) -> None:
            # ``a ~ b`` goes through a check too, like the intercepted binary operators.
            self.write("environment.checked_concat((")
            for part in node.nodes:
                self.visit(part, frame)
                self.write(", ")
            self.write("))")

    class Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = CheckedConcat
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        max_chars = OUTPUT_CHARS

        def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right, self.max_chars)
            return super().call_binop(context, operator, left, right)

        def checked_concat(self, parts: tuple[Any, ...]) -> str:
            size = sum(_text_size(part, self.max_chars) for part in parts)
            _refuse_over(size, self.max_chars, "a joined string")
            return "".join(map(str, parts))

        def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            args = _check_call(obj, args, kwargs, self.max_chars)
            return super().call(context, obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            template, is_map = value.__self__, value.__name__ == "format_map"

            def checked(*args: Any, **kwargs: Any) -> str:
                given = (
                    (args[0] if args and isinstance(args[0], dict) else {}) if is_map else kwargs
                )
                size = _format_size(template, () if is_map else args, given, self.max_chars)
                _refuse_over(size, self.max_chars, "a formatted string")
                return wrapped(*args, **kwargs)

            return checked

    env = Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
    )
    env.finalize = lambda value: _checked_output(value, env.max_chars)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson

    def guard(name: str, size: Callable[..., int], what: str, unit: str = "characters") -> None:
        """Check the filter's result size, from its arguments, before it runs."""
        original = env.filters[name]
        skip = 1 if getattr(original, "jinja_pass_arg", None) is not None else 0

        @functools.wraps(original)
        def checked(*args: Any, **kwargs: Any) -> Any:
            _refuse_over(size(*args[skip:], **kwargs), env.max_chars, what, unit)
            return original(*args, **kwargs)

        env.filters[name] = checked

    def text(value: Any) -> int:
        return _text_size(value, env.max_chars)

    def lines(value: Any) -> int:
        return str(value).count("\n") + 1 if isinstance(value, str) else 1

    original_join = env.filters["join"]

    @functools.wraps(original_join)
    def join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        items = list(value)  # read once, to count, then joined
        size = text(items) + len(str(d)) * len(items)
        _refuse_over(size, env.max_chars, "a joined string")
        return original_join(eval_ctx, items, d, attribute)

    env.filters["join"] = join
    guard("center", lambda v, width=80, **_: max(text(v), _as_int(width)), "a centred string")
    guard(
        "indent",
        lambda v, width=4, *_, **__: text(v) + lines(v) * (_as_int(width) or len(str(width))),
        "an indented string",
    )
    guard(
        "replace",
        lambda v, old="", new="", *_, **__: text(v) + _replaced_size(v, old, new),
        "a replaced string",
    )
    guard(
        "wordwrap",
        lambda v, width=79, long=True, wrap=None, *_, wrapstring=None, **__: (
            text(v) * (2 + len(str(wrap or wrapstring or "")))
        ),
        "a wrapped string",
    )
    guard(
        "format",
        lambda v, *a, **k: _percent_size(str(v), k or a, env.max_chars),
        "a formatted string",
    )
    guard("batch", lambda v, count=0, *_, **__: _as_int(count), "a batch", "items")
    guard("tojson", lambda v, *_, indent=None, **__: text(v) * (1 + _as_int(indent)), "JSON text")
    for name in ("string", "pprint", "e", "escape", "forceescape", "safe", "lower", "upper",
                 "title", "capitalize", "trim", "striptags", "wordcount", "urlize",
                 "truncate", "urlencode", "xmlattr"):  # fmt: skip
        guard(name, lambda v, *_, **__: text(v), "a string")
    return env


def _checked_output(value: Any, limit: int) -> Any:
    """``{{ value }}``: printed only if its text is not too long (a list can hold one long
    string many times)."""
    if not isinstance(value, str):
        _refuse_over(_text_size(value, limit), limit, "printed text")
    return value


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

"""Running chat templates safely: a Jinja sandbox in a child process of its own.

A chat template is code from a model file. Jinja's sandbox keeps it from reaching Python's
internals, but not from running long or building huge values, and some of that happens inside
one C call (comparing two lists nested sixty deep takes 2^60 steps) where no hook in this
process gets a turn. So templates run in a persistent child process: a render past its time is
killed with the child, which is started again on the next request; on Linux the child's
address space is capped, and size checks before the operations that build big values in one
step give a precise message everywhere.

Longer than our ~400 lines on purpose: the parent's side (start, request, kill, restart)
and the child's renderer speak one private protocol, and the size checks must match the child's
limits exactly; split, the two halves could drift apart unseen.
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
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import LlavaError

OUTPUT_CHARS = 4 << 20  # what a rendering may write, beyond twice the conversation's own text;
# no string or list it builds may be longer either
RENDER_MEMORY = 512 << 20  # address space the renderer may add to what it starts with (Linux)
_INT_BITS = 1 << 16  # the largest integer a template may build


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

    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


# -- the renderer: a child process -------------------------------------------------------------


class TemplateFailed(Exception):
    """The template raised (``raise_exception``, an undefined value, a type error, …)."""


class RendererStopped(Exception):
    def __init__(self, timed_out: bool, how: str = "") -> None:
        super().__init__(how)
        self.timed_out = timed_out
        self.how = how


_START_SECONDS = 60.0  # a Python start and ``import jinja2``, on a machine however busy
_SELF_STOP_GRACE = 1.0  # the renderer ends itself this long after a request's time is up
_CHILD_CODE = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from llava_cli.template_sandbox import _serve_renders; _serve_renders()"
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
        except (RendererStopped, ValueError) as exc:
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
            raise RendererStopped(False, self._how_it_ended()) from None
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
                    raise RendererStopped(True)
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    how = self._how_it_ended()
                    raise RendererStopped(how == "SIGALRM", how)
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
        """Raises ``RendererStopped`` when the renderer ran past ``seconds`` or died."""
        if seconds <= 0:
            raise RendererStopped(True)
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


shared_renderer = _SharedRenderer()
atexit.register(shared_renderer.stop)


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

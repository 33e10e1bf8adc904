"""Chat templates are code from the model file: each rendering is bounded in time, output and
memory, and a template past a bound is one clear error naming the file (exit 4).

Templates run in a renderer process of their own (``llava_cli.template_sandbox``): the CLI
kills it past the deadline, wherever it is stuck, and it cannot grow past its address-space
cap. Checks before the operations that build big values at once give those a precise
message. Every case here runs the real sandbox; nothing is mocked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import pytest

from llava_cli import template_sandbox
from llava_cli.errors import ModelFileError
from llava_cli.synthetic import CHATML_TEMPLATE
from llava_cli.template_sandbox import OUTPUT_CHARS, RENDER_MEMORY
from llava_cli.templates import PREPARE_SECONDS, RENDER_SECONDS, JinjaFormat, Message

FOLDER = Path(__file__).parent / "templates"
BIG = "{% set s = 'x' * 1000000 %}"  # a string the limits allow, to build bigger ones from
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DOUBLE = "{% set ns = namespace(s=X) %}{% for i in range(100) %}{% set ns.s = OP %}{% endfor %}"

TOO_LONG = "took more than"
TOO_BIG = "tried to build"
TOO_MUCH_OUTPUT = "wrote more than"
NO_PARSE = "does not parse"
FAILED = "the chat template failed"

# (template, what the one line says)
CATALOGUE = {
    # time: loops jinja compiles to plain Python loops, with nothing to intercept
    "nested empty loops at the sandbox's largest range": (SPIN, TOO_LONG),
    "recursion by macros that fans out": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        TOO_LONG,
    ),
    # one comparison of two deep structures that share their parts: 2**60 steps in one C call
    "comparison of shared deep lists": (
        "{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(60) %}"
        "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
        TOO_LONG,
    ),
    "sum of lists (quadratic, in C)": (
        "{{ ([range(100000) | list] * 100000) | sum(start=[]) | length }}",
        TOO_LONG,
    ),
    "lorem ipsum of a billion paragraphs": ("{{ lipsum(10**9) }}", TOO_LONG),
    # size of one operation, refused before it runs
    "string multiplication": ("{{ 'x' * 10**10 }}", TOO_BIG),
    "list multiplication": ("{{ ([1] * 10**10) | length }}", TOO_BIG),
    "doubling by ~ in a namespace loop": (
        DOUBLE.replace("X", "'x'").replace("OP", "ns.s ~ ns.s") + "{{ ns.s | length }}",
        TOO_BIG,
    ),
    "doubling by + in a namespace loop": (
        DOUBLE.replace("X", "'x'").replace("OP", "ns.s + ns.s") + "{{ ns.s | length }}",
        TOO_BIG,
    ),
    "doubling a list": (
        DOUBLE.replace("X", "[1]").replace("OP", "ns.s + ns.s") + "{{ ns.s | length }}",
        TOO_BIG,
    ),
    "** with a huge result": ("{{ 10 ** 10000000 % 7 }}", TOO_BIG),
    "squaring a big integer in a loop": (
        DOUBLE.replace("X", "10**1000").replace("OP", "ns.s * ns.s") + "{{ ns.s % 7 }}",
        TOO_BIG,
    ),
    "center with a huge width": ("{{ 'x' | center(10**10) }}", TOO_BIG),
    "indent of many lines by a lot": ("{{ ('x\\n' * 1000000) | indent(1000) }}", TOO_BIG),
    "replace that multiplies": (BIG + "{{ s | replace('x', s) }}", TOO_BIG),
    "wordwrap with a long wrapstring": (
        BIG + "{{ s | wordwrap(1, wrapstring=s) }}",
        TOO_BIG,
    ),
    "format with a huge width": ("{{ '%1000000000d' | format(1) }}", TOO_BIG),
    "% with a width from the arguments": ("{{ '%*d' % (10**9, 1) }}", TOO_BIG),
    "str.format with a huge width": ("{{ '{:>1000000000}'.format(1) }}", TOO_BIG),
    "str.center": ("{{ 'x'.center(10**10) }}", TOO_BIG),
    "str.ljust": ("{{ 'x'.ljust(10**10) }}", TOO_BIG),
    "str.zfill": ("{{ 'x'.zfill(10**10) }}", TOO_BIG),
    "str.expandtabs": ("{{ ('\\t' * 1000000).expandtabs(100000) }}", TOO_BIG),
    "str.replace": (BIG + "{{ s.replace('x', s) }}", TOO_BIG),
    "str.translate": (BIG + "{{ s.translate({120: s}) }}", TOO_BIG),
    "str.join of one string many times": (BIG + "{{ ''.join([s] * 1000) }}", TOO_BIG),
    "int.to_bytes": ("{{ (1).to_bytes(10**10, 'big') }}", TOO_BIG),
    "join of one string many times": (BIG + "{{ ([s] * 1000) | join }}", TOO_BIG),
    "printing a list of one string many times": (BIG + "{{ [s] * 1000 }}", TOO_BIG),
    "tojson of one string many times": (BIG + "{{ ([s] * 1000) | tojson }}", TOO_BIG),
    "string filter of one string many times": (BIG + "{{ ([s] * 1000) | string }}", TOO_BIG),
    "printing lists that share their parts": (
        "{% set ns = namespace(a=['x' * 1000]) %}{% for i in range(60) %}"
        "{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
        TOO_BIG,
    ),
    "batch with a huge count": ("{{ [1] | batch(10**10, 0) | list | length }}", TOO_BIG),
    # output
    "nested loops writing": (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        TOO_MUCH_OUTPUT,
    ),
    # memory: many distinct big strings, each allowed, kept together
    "many big strings kept": (
        "{% set ns = namespace(l=[], s='x' * 4000000) %}{% for i in range(100000) %}"
        "{% set ns.l = ns.l + [ns.s ~ i] %}{% endfor %}{{ ns.l | length }}",
        "used more than",
    ),
    # depth
    "endless macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", FAILED),
    "ifs nested 5000 deep": ("{% if true %}" * 5000 + "x" + "{% endif %}" * 5000, NO_PARSE),
    "loops nested 30 deep": ("{% for i in [1] %}" * 30 + "x" + "{% endfor %}" * 30, NO_PARSE),
    "parentheses nested 100000 deep": ("{{ " + "(" * 100000 + "1" + ")" * 100000 + " }}", NO_PARSE),
    "a list nested 5000 deep, printed": (
        "{% set ns = namespace(a=1) %}{% for i in range(5000) %}{% set ns.a = [ns.a] %}"
        "{% endfor %}{{ ns.a }}",
        FAILED,
    ),
}
LINUX = sys.platform.startswith("linux")


def hostile_render(template: str) -> ModelFileError:
    with pytest.raises(ModelFileError) as err:
        JinjaFormat(template, origin="evil.gguf").render([Message("user", "x", n_images=1)])
    return err.value


@pytest.mark.slow
@pytest.mark.parametrize(("template", "says"), CATALOGUE.values(), ids=CATALOGUE.keys())
def test_a_hostile_template_is_stopped_in_time_with_one_clear_line(
    template: str, says: str
) -> None:
    if says == "used more than" and not LINUX:
        pytest.skip("the renderer's address space is capped on Linux only")
    start = time.monotonic()
    error = hostile_render(template)
    seconds = time.monotonic() - start
    line = error.one_line()
    assert error.exit_code == 4
    assert line.startswith("evil.gguf: the chat template") and "\n" not in line
    if says == "used more than":  # on a loaded machine, filling 512 MiB can outlast the second
        assert says in line or TOO_LONG in line, line
    else:
        assert says in line
    assert "--show-prompt" in line  # the hint says what to do
    assert seconds < PREPARE_SECONDS + 2  # the limit, plus slack for a loaded CI machine


# Runs one template in a fresh process, as the CLI would, under a safety net of 4 GiB of
# address space; reports the renderer's peak RSS and the process's own.
_ISOLATED = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from llava_cli import template_sandbox, templates
from llava_cli.errors import LlavaError
start = time.monotonic()
try:
    fmt = templates.JinjaFormat(sys.argv[1], origin="evil.gguf")
    fmt.render([templates.Message("user", "x", n_images=1)])
    outcome = {"line": None}
except LlavaError as exc:
    outcome = {"line": exc.one_line()}
outcome["seconds"] = time.monotonic() - start
template_sandbox.shared_renderer.stop()  # reaped: its peak counts among the children's
outcome["renderer_peak"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10
# VmHWM, not ru_maxrss, which keeps the peak of the (big) test process that forked this one
status = open("/proc/self/status").read()
outcome["own_peak"] = int(status.split("VmHWM:")[1].split()[0]) << 10
print(json.dumps(outcome))
"""


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="the renderer's address space is capped on Linux only")
@pytest.mark.parametrize(
    "case",
    [
        "many big strings kept",
        "doubling by ~ in a namespace loop",
        "str.join of one string many times",
        "printing a list of one string many times",
        "nested loops writing",
    ],
)
def test_memory_stays_bounded_and_out_of_the_cli(case: str) -> None:
    template, says = CATALOGUE[case]
    done = subprocess.run(
        [sys.executable, "-c", _ISOLATED, template],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome = json.loads(done.stdout)
    assert says in outcome["line"] or (says == "used more than" and TOO_LONG in outcome["line"])
    assert outcome["renderer_peak"] < RENDER_MEMORY + (128 << 20)
    assert outcome["own_peak"] < 128 << 20  # python, llava_cli.templates, a conversation


@pytest.mark.slow
def test_ten_slow_probes_share_one_budget() -> None:
    """Each rendering takes 0.45 s, well inside its own limit; the probes at start (eight
    here, with a thinking block) would take 3.6 s, but all of them get PREPARE_SECONDS."""
    wait = (
        "{% set ns = namespace(start=strftime_now('%s.%f') | float, done=false) %}"
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% if (strftime_now('%s.%f') | float) - ns.start > 0.45 %}"
        "{% set ns.done = true %}{% break %}{% endif %}{% endfor %}"
        "{% if ns.done %}{% break %}{% endif %}{% endfor %}"
    )
    assert RENDER_SECONDS > 0.45  # each probe alone is allowed
    start = time.monotonic()
    with pytest.raises(ModelFileError, match=f"took more than {PREPARE_SECONDS:g} s to parse"):
        JinjaFormat(wait + "<think></think>{{ raise_exception('no') }}", origin="evil.gguf")
    assert PREPARE_SECONDS - 0.1 < time.monotonic() - start < PREPARE_SECONDS + 2


@pytest.mark.slow
def test_after_a_stop_the_next_template_renders() -> None:
    hostile_render(SPIN)
    assert (
        JinjaFormat(CHATML_TEMPLATE)
        .render([Message("user", "hi")])
        .text.endswith("<|im_start|>assistant\n")
    )


@pytest.mark.slow
def test_an_interrupt_while_rendering_stops_the_renderer_and_the_next_render_works() -> None:
    fmt = JinjaFormat(
        "{{ messages[-1].content }}{% if messages[-1].content == 'spin' %}" + SPIN + "{% endif %}"
    )
    fmt.render([Message("user", "warm")])
    assert template_sandbox.shared_renderer.current is not None
    busy = template_sandbox.shared_renderer.current.proc

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            fmt.render([Message("user", "spin")])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert busy.poll() is not None  # killed, not left spinning
    assert fmt.render([Message("user", "again")]).text == "again"


@pytest.mark.slow
def test_a_renderer_left_alone_ends_itself() -> None:
    """Should the CLI die while a template spins in C, the renderer does not spin on."""
    renderer = template_sandbox._Renderer()
    try:
        assert renderer.proc.stdin is not None
        request = {"source": SPIN, "variables": {}, "max_chars": 100, "seconds": 0.2}
        renderer.proc.stdin.write(json.dumps(request).encode() + b"\n")
        renderer.proc.stdin.flush()
        assert renderer.proc.wait(timeout=10) == -signal.SIGALRM
    finally:
        renderer.close()


def test_a_long_conversation_may_write_more_than_the_output_limit() -> None:
    out = JinjaFormat(CHATML_TEMPLATE).render([Message("user", "x" * (OUTPUT_CHARS + 10))])
    assert len(out.text) > OUTPUT_CHARS + 10


@pytest.mark.slow
def test_a_long_conversation_gets_more_time() -> None:
    """Google's Gemma 4 template scans ahead from every message (quadratic): 800 messages
    take over a second here, within what a conversation that long is allowed."""
    fmt = JinjaFormat((FOLDER / "gemma-4.jinja").read_text(), bos_token="<bos>")
    turns = [Message("user", f"question {i}") for i in range(400)]
    conversation = [m for t in turns for m in (t, Message("assistant", "an answer"))]
    text = fmt.render([*conversation, Message("user", "last")]).text
    assert text.count("question") == 400


def test_rendering_real_templates_costs_little() -> None:
    """The renderer is a round trip per rendering: well under a millisecond here."""
    for family in ("qwen3.5", "gemma-3", "smolvlm"):
        fmt = JinjaFormat((FOLDER / f"{family}.jinja").read_text())
        turns = [Message("user", "What colour?", n_images=1)]
        fmt.render(turns)
        start = time.perf_counter()
        for _ in range(20):
            fmt.render(turns)
        assert (time.perf_counter() - start) / 20 < 0.05


def test_the_renderer_does_not_read_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``jinja2.py`` where llava runs is not imported by the renderer."""
    (tmp_path / "jinja2.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    template_sandbox.shared_renderer.stop()
    assert JinjaFormat("{{ messages[0].content }}").render([Message("user", "ok")]).text == "ok"

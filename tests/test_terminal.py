"""Terminals and locales: the transient status line, TERM=dumb, non-UTF-8 locales, table
widths, plurals. Real terminals are pseudo-terminals (``pty``) or tmux; no timing assertions.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_cli import render, synthetic, text, units

from .conftest import llava

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
ESC = b"\x1b"


def model_args(pair: synthetic.ModelPair) -> list[str]:
    return ["--model", str(pair.model), "--mmproj", str(pair.mmproj)]


def on_pty(
    argv: list[str], env: dict[str, str], *, stderr_pipe: bool = False
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with stdin, stdout (and stderr, unless ``stderr_pipe``) on one
    pseudo-terminal; what the terminal received, and what the stderr pipe did."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE if stderr_pipe else slave,
        env={**os.environ, **env},
    )
    os.close(slave)
    got = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        got += data
    err = proc.stderr.read() if proc.stderr else b""
    os.close(master)
    return proc.wait(timeout=30), got, err


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "llava_cli", *map(str, args)]


# -- the status line ---------------------------------------------------------------------------

STATUS_SCRIPT = (
    "from llava_cli import render\n"
    "render.guard_standard_streams()\n"
    "render.status('loading model…')\n"
    "render.status('encoding image 1/1')\n"
    "render.stream_answer(iter(['The answer ', 'is red.']))\n"
)


def test_status_shows_on_a_terminal_and_goes_when_the_answer_starts() -> None:
    code, shown, _ = on_pty([sys.executable, "-c", STATUS_SCRIPT], {"TERM": "xterm"})
    assert code == 0
    assert "loading model…" in shown.decode() and "encoding image 1/1" in shown.decode()
    # Everything after the last erase is the answer: the status never shares its line.
    assert shown.rsplit(b"\x1b[2K", 1)[1] == b"The answer is red.\r\n"


@pytest.mark.slow
def test_no_status_where_stderr_is_a_pipe_or_a_dumb_terminal() -> None:
    code, shown, err = on_pty(
        [sys.executable, "-c", STATUS_SCRIPT], {"TERM": "xterm"}, stderr_pipe=True
    )
    assert code == 0 and err == b"" and shown == b"The answer is red.\r\n"
    code, shown, _ = on_pty([sys.executable, "-c", STATUS_SCRIPT], {"TERM": "dumb"})
    assert code == 0 and shown == b"The answer is red.\r\n"


def test_status_is_erased_by_other_output_and_at_exit() -> None:
    script = (
        "from llava_cli import render\n"
        "render.status('loading model…')\n"
        "render.info('a note')\n"
        "render.status('reading the prompt')\n"  # left showing: the exit erases it
    )
    code, shown, _ = on_pty([sys.executable, "-c", script], {"TERM": "xterm"})
    assert code == 0
    before, note, after = shown.partition(b"a note\r\n")
    assert note and before.endswith(b"\r\x1b[2K")  # erased before the note
    assert b"reading the prompt" in after and after.endswith(b"\r\x1b[2K")


def tmux_screen(command: str, tmp_path: Path) -> tuple[str, bytes]:
    """Run ``command`` in a real terminal (tmux, 100x30): the final screen, and every byte
    the terminal received."""
    tmux = ["tmux", "-L", f"llava-term-{os.getpid()}-{time.monotonic_ns()}"]
    log = tmp_path / "terminal.log"
    log.touch()
    shell = f"read go; {command}; echo __END__; sleep 60"
    try:
        subprocess.run(
            [*tmux, "new-session", "-d", "-x", "100", "-y", "30", "sh", "-c", shell], check=True
        )
        subprocess.run([*tmux, "pipe-pane", "-o", f"cat >> {log}"], check=True)
        subprocess.run([*tmux, "send-keys", "Enter"], check=True)
        deadline = time.monotonic() + 120
        screen = ""
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p"], capture_output=True, text=True, check=True
            ).stdout
            if "__END__" in screen and b"__END__" in log.read_bytes():
                break
            time.sleep(0.2)
        return screen, log.read_bytes()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.needs("tmux")
def test_ask_on_a_terminal_shows_a_status_that_the_answer_replaces(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    args = " ".join(f"'{a}'" for a in cli("ask", images / "red.png", "-p", "Colour?"))
    models = " ".join(f"'{a}'" for a in model_args(oracle))
    screen, received = tmux_screen(f"TERM=xterm-256color {args} {models}", tmp_path)
    assert "red" in screen and "__END__" in screen
    assert b"\r\x1b[2K" in received and any(c in received.decode() for c in SPINNER)
    assert not any(c in screen for c in SPINNER)  # nothing of it left on the screen
    assert "loading" not in screen and "encoding" not in screen and "reading" not in screen


# -- TERM=dumb ---------------------------------------------------------------------------------

DUMB = {"TERM": "dumb", "COLUMNS": "80"}


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--help",), ("list", "-a"), ("ask", "--help")])
def test_dumb_terminal_gets_no_escape_sequence(args: tuple[str, ...]) -> None:
    env = dict(DUMB)
    code, shown, _ = on_pty(cli(*args), env)
    assert code == 0 and shown and ESC not in shown


@pytest.mark.slow
def test_dumb_terminal_ask_with_an_image_gets_no_escape_sequence(
    oracle: synthetic.ModelPair, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_COLOR")  # colour would be allowed, but for TERM=dumb
    argv = cli("ask", images / "red.png", "-p", "Colour?", "--verbose", *model_args(oracle))
    code, shown, _ = on_pty(argv, DUMB)
    assert code == 0 and b"red" in shown and ESC not in shown
    code, shown, _ = on_pty(argv, {"TERM": "xterm"})  # the same on a terminal that takes them
    assert code == 0 and ESC in shown


def test_escapes_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    assert render.escapes_allowed(Tty()) and not render.escapes_allowed(io.StringIO())
    assert not render.color_allowed(Tty())  # NO_COLOR is set in every test
    monkeypatch.delenv("NO_COLOR")
    assert render.color_allowed(Tty())
    monkeypatch.setenv("TERM", "dumb")
    assert not render.escapes_allowed(Tty()) and not render.color_allowed(Tty())


# -- locales -----------------------------------------------------------------------------------

# C without Python's UTF-8 mode is ASCII; PYTHONIOENCODING stands in for a Latin-1 locale,
# which this machine may not have installed.
LOCALES = [
    {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
    {"LC_ALL": "C"},
    {"PYTHONIOENCODING": "latin-1"},
    {"PYTHONIOENCODING": "ascii"},
]


@pytest.mark.slow
@pytest.mark.parametrize("env", LOCALES, ids=lambda e: " ".join(f"{k}={v}" for k, v in e.items()))
def test_list_available_under_a_narrow_locale(env: dict[str, str]) -> None:
    result = llava("list", "-a", env=env)
    assert result.returncode == 0, result.stderr
    assert b"smolvlm-256m" in result.stdout
    # stderr holds only the legend for unknown sizes, in the locale's encoding too
    assert (
        result.stderr.startswith(b"?: no size in the registry") and result.stderr.count(b"\n") == 1
    )
    encoding = env.get("PYTHONIOENCODING", "ascii" if "PYTHONUTF8" in env else "utf-8")
    result.stdout.decode(encoding)
    result.stderr.decode(encoding)
    assert json.loads(llava("list", "-a", "--json", env=env).stdout)


def test_json_under_a_narrow_encoding_is_escaped_not_replaced() -> None:
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    render.json_line({"answer": "wait… 中"}, out)
    written = out.buffer.getvalue()
    assert written.isascii() and json.loads(written) == {"answer": "wait… 中"}


@pytest.mark.slow
def test_errors_and_answers_under_an_ascii_locale(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    env = LOCALES[0]
    result = llava("ask", images / "absent.png", *model_args(oracle), env=env)
    assert result.returncode == 4
    line = result.stderr.decode("ascii")  # the em dash became "--"
    assert line.startswith("Error: ") and " -- " in line
    result = llava("ask", images / "blue.png", "-p", "Colour?", *model_args(oracle), env=env)
    assert result.returncode == 0 and b"blue" in result.stdout


def test_stream_encoding_replaces_what_it_cannot_carry() -> None:
    from llava_cli.terminal import STDERR_ERRORS, STDOUT_ERRORS, fit_to_encoding

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    err = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    fit_to_encoding(out, STDOUT_ERRORS)
    fit_to_encoding(err, STDERR_ERRORS)
    out.write("wait… 3×4 — 中")
    err.write("wait… 3×4 — 中")
    out.flush()
    err.flush()
    assert out.buffer.getvalue() == b"wait... 3x4 -- ?"
    assert err.buffer.getvalue() == "wait... 3×4 -- <U+4E2D>".encode("latin-1")


# -- tables ------------------------------------------------------------------------------------

ROWS = [
    ["NAME", "SIZE", "DESCRIPTION"],
    ["smolvlm-256m", "278.8 MB", "Smallest model here, English only, terse answers " * 3],
    ["gemma-3-4b", "3.3 GB", "Google's Gemma 3 4B"],
    ["中文-model", "1 GB", "wide characters take two columns each " * 2],
]


def test_table_fits_the_width_by_cutting_the_named_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    render.table(ROWS, out, shrink=[2])
    lines = out.getvalue().splitlines()
    assert all(text.cell_width(line) <= 80 for line in lines)
    assert max(text.cell_width(line) for line in lines) == 80
    assert lines[1].startswith("smolvlm-256m  278.8 MB  Smallest") and lines[1].endswith("…")
    assert lines[2].endswith("Google's Gemma 3 4B")  # short cells are left whole
    assert lines[3].startswith("中文-model    1 GB      wide")


def test_table_without_a_width_keeps_every_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS")
    out = io.StringIO()  # a pipe: no limit
    render.table(ROWS, out, shrink=[2])
    assert "…" not in out.getvalue()
    assert out.getvalue().splitlines()[1].endswith("terse answers")
    monkeypatch.setenv("COLUMNS", "not a number")
    render.table(ROWS, out := io.StringIO(), shrink=[2])
    assert "…" not in out.getvalue()


def test_table_cannot_shrink_past_a_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "20")
    out = io.StringIO()
    render.table(ROWS, out, shrink=[2])
    lines = out.getvalue().splitlines()
    assert lines[1] == "smolvlm-256m  278.8 MB  Smallest …"  # ten columns, the rest whole


# -- words and numbers -------------------------------------------------------------------------


def test_plural() -> None:
    assert units.plural(1, "token") == "1 token"
    assert units.plural(0, "token") == "0 tokens"
    assert units.plural(2, "turn") == "2 turns"
    assert units.plural(1, "entry", "entries") == "1 entry"
    assert units.plural(3, "entry", "entries") == "3 entries"


def test_rate() -> None:
    assert units.rate(30, 2.0, "tokens") == "15.0 tokens/s"
    assert units.rate(0, 0.0, "tokens") == "tokens/s n/a"  # a one-token answer
    assert units.rate(5, 0.0, "tokens") == "tokens/s n/a"


def test_display_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert text.display_path(tmp_path / "models" / "x.gguf") == "~/models/x.gguf"
    assert text.display_path(tmp_path) == "~"
    assert text.display_path(f"{tmp_path}-other/x") == f"{tmp_path}-other/x"
    assert text.display_path("relative/x.gguf") == "relative/x.gguf"
    monkeypatch.setenv("HOME", "/")
    assert text.display_path("/etc/x") == "/etc/x"


def test_cut_to_width() -> None:
    assert text.cut_to_width("abcdef", 4) == "abc…"
    assert text.cut_to_width("abcdef", 6) == "abcdef"
    assert text.cut_to_width("中文中文", 5) == "中文…"
    assert text.cut_to_width("abcdef", 5, "...") == "ab..."
    assert text.cell_width("e\u0301") == 1

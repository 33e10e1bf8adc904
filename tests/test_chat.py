"""`llava chat`: prompt-toolkit driven through a pipe on the real tiny models.

The chat reads lines through the same LineReader a terminal gets (pipe input, dummy screen);
answers go to stdout, everything else to stderr, as in the real command.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from llava_cli import synthetic
from llava_cli.commands.chat import COMMANDS, Chat, ChatOptions, open_chat
from llava_cli.engine import Counters
from llava_cli.options import RuntimeOptions, SamplingParams
from llava_cli.repl import LineReader

from .conftest import llava


def drive(chat: Chat, *lines: str) -> None:
    """Type these lines (Enter after each) into the chat, then end the input (Ctrl-D)."""
    with create_pipe_input() as keys:
        keys.send_text("".join(line + "\r" for line in lines))
        keys.close()
        chat.run(LineReader(COMMANDS, None, input=keys, output=DummyOutput()).lines())


def open_test_chat(pair: synthetic.ModelPair, **runtime: int) -> Chat:
    opts = ChatOptions(
        model=str(pair.model),
        mmproj=str(pair.mmproj),
        sampling=SamplingParams(temperature=0),
        runtime=RuntimeOptions(**runtime),  # type: ignore[arg-type]
        history=False,
    )
    chat = open_chat(opts)
    chat.markdown = False
    return chat


@pytest.fixture
def chat(oracle: synthetic.ModelPair) -> Iterator[Chat]:
    c = open_test_chat(oracle)
    yield c
    c.close()


def work(chat: Chat) -> Counters:
    return chat.conversation.loaded.session.counters.snapshot()


def minus(a: Counters, b: Counters) -> tuple[int, int, int]:
    return (
        a.text_tokens_evaluated - b.text_tokens_evaluated,
        a.image_tokens_evaluated - b.image_tokens_evaluated,
        a.image_chunks_encoded - b.image_chunks_encoded,
    )


def test_answers_red_then_clear_and_blue(
    chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(
        chat,
        f"/image {images / 'red.png'}",
        "What colour is this?",
        "/clear",
        f"/image {images / 'blue.png'}",
        "And this one?",
    )
    out, err = capsys.readouterr()
    assert out == "red\nblue\n"
    assert "attached" in err and "48×40, 16 tokens" in err
    assert "new conversation" in err


def test_a_follow_up_evaluates_only_its_own_tokens(chat: Chat, images: Path) -> None:
    drive(chat, f"/image {images / 'red.png'}", "What colour is this?")
    session = chat.conversation.loaded.session
    cached, before = session.n_cells, work(chat)
    follow_up = "Are you sure?"
    expected_new = chat.conversation.measure(follow_up, []) - cached
    drive(chat, follow_up)
    assert minus(work(chat), before) == (expected_new, 0, 0)  # no image, no earlier turn
    assert chat.last_completion is not None
    assert chat.last_completion.usage.cached_tokens == cached
    assert 0 < expected_new < 40


def test_retry_evaluates_nothing_before_the_answer(
    chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(chat, f"/image {images / 'red.png'}", "What colour is this?")
    before = work(chat)
    drive(chat, "/retry")
    assert minus(work(chat), before) == (0, 0, 0)
    assert capsys.readouterr().out == "red\nred\n"
    assert [(e.prompt, e.answer) for e in chat.conversation.exchanges()] == [
        ("What colour is this?", "red")
    ]


def test_undo_rewinds_to_the_turn_before(chat: Chat, images: Path) -> None:
    drive(chat, f"/image {images / 'red.png'}", "What colour is this?")
    cells_after_first = chat.conversation.loaded.session.n_cells
    drive(chat, f"/image {images / 'blue.png'}", "And this one?", "/undo")
    assert [e.prompt for e in chat.conversation.exchanges()] == ["What colour is this?"]
    before = work(chat)
    drive(chat, "Once more?")
    assert chat.last_completion is not None
    # everything up to the undone turn is reused (and the start of its template too)
    assert chat.last_completion.usage.cached_tokens >= cells_after_first
    assert minus(work(chat), before)[1:] == (0, 0)  # the first image is still in the cache
    session = chat.conversation.loaded.session
    keys = [t for t in session.tokens() if isinstance(t, str)]
    assert keys == [chat.conversation.images[0].key]  # the undone image left the cache


@pytest.mark.parametrize("name", ["chat.md", "chat.json"])
def test_save_then_load_restores_the_conversation(
    chat: Chat,
    oracle: synthetic.ModelPair,
    images: Path,
    tmp_path: Path,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    drive(
        chat,
        "/system You name colours.",
        "/set seed 7",
        f"/image {images / 'red.png'}",
        "What colour is this?",
        f"/save {path}",
    )
    saved = chat.conversation.exchanges()
    text = path.read_text()
    if name.endswith(".md"):
        assert "## You" in text and str(images / "red.png") in text and "\nred\n" in text
    else:
        assert json.loads(text)["turns"][0]["answer"] == "red"

    other = open_test_chat(oracle)
    try:
        drive(other, f"/load {path}")
        assert [(e.prompt, e.answer) for e in other.conversation.exchanges()] == [
            (e.prompt, e.answer) for e in saved
        ]
        assert [i.sha256 for i in other.conversation.images] == [
            i.sha256 for i in chat.conversation.images
        ]
        assert other.conversation.system == "You name colours."
        assert other.sampling.seed == 7
        capsys.readouterr()
        drive(other, "And the colour again?")  # the loaded image reaches the model
        assert capsys.readouterr().out == "red\n"
    finally:
        other.close()


def test_load_refuses_a_changed_image(chat: Chat, images: Path, tmp_path: Path) -> None:
    picture = tmp_path / "pic.png"
    picture.write_bytes((images / "red.png").read_bytes())
    drive(chat, f"/image {picture}", "What colour is this?", f"/save {tmp_path / 'c.json'}")
    picture.write_bytes((images / "blue.png").read_bytes())
    drive(chat, "/clear", f"/load {tmp_path / 'c.json'}")
    assert chat.conversation.exchanges() == []  # nothing half-loaded


def test_set_takes_effect(random_pair: synthetic.ModelPair, images: Path) -> None:
    chat = open_test_chat(random_pair)
    try:
        drive(chat, "/set max-tokens 3", "/set temperature 0.7", f"/image {images / 'red.png'}")
        drive(chat, "Describe it.")
        assert chat.sampling.temperature == 0.7
        assert chat.last_completion is not None
        assert chat.last_completion.usage.completion_tokens == 3
        assert chat.last_completion.finish_reason == "length"
    finally:
        chat.close()


def test_bad_input_is_reported_and_the_chat_goes_on(
    chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(
        chat,
        "/image /nonexistent/picture.png",
        "/frobnicate",
        "/set top-p 2",
        "/set colour red",
        "/retry",
        f"/image {images / 'red.png'}",
        "What colour is this?",
    )
    out, err = capsys.readouterr()
    assert out == "red\n"
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 5, err
    assert "/nonexistent/picture.png" in errors[0]
    assert errors[1] == "Error: unknown command /frobnicate — /help lists the commands"
    assert errors[2] == "Error: top-p must be between 0 and 1, not 2"
    assert "unknown setting 'colour'" in errors[3]
    assert errors[4] == "Error: nothing to retry yet"


def test_a_full_context_drops_the_oldest_turn_first(
    oracle: synthetic.ModelPair, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chat = open_test_chat(oracle, ctx=256)
    try:
        drive(chat, f"/image {images / 'red.png'}", "What colour is this?")
        drive(chat, f"/image {images / 'blue.png'}", "And this one?")
        out, err = capsys.readouterr()
        assert out == "red\nblue\n"
        assert "dropping the oldest message and 1 image(s)" in err
        assert [e.prompt for e in chat.conversation.exchanges()] == ["And this one?"]
        drive(chat, "word " * 300)  # cannot fit at all: said before anything is dropped
        err = capsys.readouterr().err
        assert "Error: this message needs" in err and "the context holds 256" in err
        assert "dropping" not in err
        assert [e.prompt for e in chat.conversation.exchanges()] == ["And this one?"]
        drive(chat, "/clear", f"/image {images / 'red.png'}", "What colour is this?")
        assert capsys.readouterr().out == "red\n"
    finally:
        chat.close()


def test_a_piped_script_keeps_stdout_for_answers(oracle: synthetic.ModelPair, images: Path) -> None:
    script = f"What colour is this?\n/clear\n/image {images / 'blue.png'}\nAnd now?\n/stats\n"
    result = llava(
        "chat",
        images / "red.png",
        "--model",
        oracle.model,
        "--temperature",
        "0",
        stdin=script.encode(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"red\nblue\n"
    err = result.stderr.decode()
    assert err.startswith("llava chat · oracle-model.gguf · context 4096 tokens · CPU — /help")
    assert "images encoded: 1" in err  # /stats: the last turn encoded only the new image


def test_retry_on_a_longer_answer_gives_the_same_text(
    random_pair: synthetic.ModelPair, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The restored logits are the prompt's own: greedy decoding repeats itself exactly."""
    chat = open_test_chat(random_pair)
    try:
        drive(chat, "/set max-tokens 12", f"/image {images / 'grey.png'}", "Describe it.")
        drive(chat, "And then?")  # a second turn, on top of the first answer's tokens
        first = capsys.readouterr().out.splitlines()[-1]
        before = work(chat)
        drive(chat, "/retry")
        assert capsys.readouterr().out == first + "\n"
        assert minus(work(chat), before) == (0, 0, 0)
        assert len(first.strip()) > 1
    finally:
        chat.close()


def test_a_real_terminal_ctrl_c_stops_the_answer_and_exit_ends_the_chat(
    random_pair: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """tmux: start, ask, Ctrl-C during a long answer, the chat is still there, /exit is 0."""
    tmux = ["tmux", "-L", f"llava-test-{os.getpid()}"]
    done = tmp_path / "exit-code"
    keep = ("PATH", "LLAVA_HOME", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")  # colour on
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in keep if k in os.environ)
    command = (
        f"env {env} TERM=xterm-256color {shlex.quote(sys.executable)} -m llava_cli chat "
        f"{images / 'red.png'} --model {random_pair.model} --mmproj {random_pair.mmproj} "
        f"--max-tokens 100000 --ctx 16384; echo $? > {done}"  # an answer of many seconds
    )

    def pane() -> str:
        shown = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, check=False)
        return shown.stdout.decode(errors="replace")

    def wait_for(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{pane()}"
            time.sleep(0.1)

    def keys(*names: str) -> None:
        subprocess.run([*tmux, "send-keys", *names], check=True)

    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", command], check=True)
    try:
        wait_for(lambda: "attached" in pane() and pane().rstrip().endswith(">"), "the prompt")
        keys("Tell me a long story", "Enter")

        def answering() -> bool:
            _, asked, after = pane().partition("Tell me a long story")
            return bool(asked) and len(after.strip()) > 40

        wait_for(answering, "the answer to stream")
        time.sleep(0.5)
        keys("C-c")
        wait_for(lambda: "(stopped; the answer so far stays" in pane(), "the stop")
        wait_for(lambda: pane().rstrip().endswith(">"), "the prompt again")
        keys("/stats", "Enter")
        wait_for(lambda: "tokens/s (interrupted)" in pane(), "/stats after the stop")
        keys("/exit", "Enter")
        wait_for(done.exists, "the exit")
        assert done.read_text().strip() == "0"
        history = Path(os.environ["LLAVA_HOME"]) / "chat_history"
        assert "Tell me a long story" in history.read_text()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


def test_ctrl_c_at_the_prompt_clears_the_line(
    chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(chat, f"/image {images / 'red.png'}", "half a thought\x03What colour is this?")
    assert capsys.readouterr().out == "red\n"
    assert [e.prompt for e in chat.conversation.exchanges()] == ["What colour is this?"]


def test_completion_of_commands_and_paths(tmp_path: Path) -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from llava_cli.repl import ChatCompleter

    (tmp_path / "photo.png").write_bytes(b"")
    completer = ChatCompleter(COMMANDS)

    def complete(text: str) -> list[str]:
        found = completer.get_completions(Document(text, len(text)), CompleteEvent())
        return [c.text for c in found]

    assert complete("/st") == ["/stats"]
    assert complete("/im") == ["/image", "/images"]
    assert complete(f"/image {tmp_path}/ph") == ["oto.png"]
    assert complete("hello /st") == []  # only at the start of the line
    (tmp_path / "my photos").mkdir()
    assert complete(f"/image {tmp_path}/my") == [f'"{tmp_path}/my photos']  # quoted
    assert complete(f'/image "{tmp_path}/my p') == ["hotos"]


def test_answers_are_markdown_never_rich_markup(capsys: pytest.CaptureFixture[str]) -> None:
    from llava_cli import render

    render.stream_markdown(["Use [red]this[/red] ", "and **that**:\n\n- one\n- two"])
    out = capsys.readouterr().out
    assert "[red]this[/red]" in out  # printed as written
    assert "**" not in out and "that" in out  # Markdown is rendered
    assert "• one" in out


def test_failed_save_and_load_leave_the_chat_as_it_was(
    chat: Chat, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(chat, f"/image {images / 'red.png'}", "What colour is this?")
    bad = tmp_path / "bad.json"
    drive(chat, f"/save {bad}")
    record = json.loads(bad.read_text())
    record["settings"]["top-p"] = 5
    record["turns"][0]["prompt"] = "Something else"
    bad.write_text(json.dumps(record))
    capsys.readouterr()
    drive(chat, f"/save {tmp_path}", f"/load {bad}", "And again?")
    out, err = capsys.readouterr()
    assert f"Error: {tmp_path} is a directory, not a file" in err
    assert "Error: top-p must be between 0 and 1, not 5" in err
    assert [e.prompt for e in chat.conversation.exchanges()] == [
        "What colour is this?",
        "And again?",
    ]
    assert out == "red\n"


def test_ctrl_c_in_the_renderer_still_keeps_the_partial_answer(
    random_pair: synthetic.ModelPair,
    images: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C can land while a chunk is being drawn, outside the answer generator."""
    from llava_cli import render

    def draw_then_interrupt(chunks: Iterator[str]) -> None:
        for chunk in chunks:
            if chunk.strip():
                raise KeyboardInterrupt

    chat = open_test_chat(random_pair)
    try:
        drive(chat, f"/image {images / 'red.png'}")
        monkeypatch.setattr(render, "stream_answer", draw_then_interrupt)
        drive(chat, "Describe it.")
        err = capsys.readouterr().err
        assert "(stopped; the answer so far stays in the conversation)" in err
        [exchange] = chat.conversation.exchanges()
        assert exchange.answer  # the part drawn so far
        assert chat.last_completion is not None
        assert chat.last_completion.finish_reason == "interrupted"
        assert chat.pending == []  # the image went with the message
    finally:
        chat.close()


def test_thinking_streams_to_stderr_above_a_live_markdown_answer() -> None:
    """stdout and stderr each a terminal of their own: the thinking (dimmed) reaches only
    stderr, the Markdown answer only stdout, even while Rich's live view is up."""
    import pty
    import select

    script = (
        "from llava_cli import render\n"
        "echo = render.ThinkingEcho()\n"
        "def answer():\n"
        "    echo('Let me '); echo('think.')\n"
        "    yield 'The answer '\n"
        "    echo('late thought')\n"  # never happens in practice; must still not reach stdout
        "    yield 'is **red**.'\n"
        "render.stream_markdown(echo.answer(answer()))\n"
    )
    out_master, out_slave = pty.openpty()
    err_master, err_slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=out_slave, stderr=err_slave, env=env
    )
    os.close(out_slave)
    os.close(err_slave)
    got = {out_master: b"", err_master: b""}
    open_fds = set(got)
    deadline = time.monotonic() + 30
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_fds), [], [], 1)
        for fd in ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the other end closed
                data = b""
            if data:
                got[fd] += data
            else:
                open_fds.discard(fd)
    assert proc.wait(timeout=10) == 0
    stdout, stderr = got[out_master].decode(), got[err_master].decode()
    assert "think." in stderr and "\x1b[2m" in stderr and "late thought" in stderr
    assert "think" not in stdout and "thought" not in stdout
    assert "red" in stdout and "red" not in stderr

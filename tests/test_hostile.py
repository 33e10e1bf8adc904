"""Hostile and unusual input, through the real CLI: every run bounded in memory and time.

Each case runs ``llava`` as a subprocess under an address-space limit and a timeout, and
asserts the documented exit code, exactly one line on stderr (``Error: …``), never
``unexpected`` or a traceback, a peak RSS well under 1 GB (the models here are tiny, so that
is all llava's own), and no half-written file left behind. Module-level suites cover the same
ground in depth (test_images, test_gguf_file, test_template_limits, test_pull, …); this one is
the catalogue, run the way a user would meet it.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from llava_cli import synthetic
from llava_cli.commands.chat import COMMANDS, Chat
from llava_cli.repl import LineReader

from .conftest import png_bytes
from .test_chat import drive, open_test_chat
from .test_gguf_file import ARCH, ARRAY, gguf, kv, nested_arrays

ADDRESS_SPACE = 4 << 30  # a safety net: a runaway read or allocation fails instead of the VM
PEAK_RSS = 1 << 30  # what the issue allows beyond the model; the models here are ~1 MB


@dataclass
class Run:
    code: int
    out: bytes
    err: str
    peak_rss: int  # bytes
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.err.splitlines()


# Runs llava in a grandchild so that its own peak RSS can be read with wait4, under the limit.
_LAUNCHER = r"""
import os, resource, sys
limit, report = int(sys.argv[1]), sys.argv[2]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(sys.executable, [sys.executable, "-m", "llava_cli", *sys.argv[3:]])
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(report, "w") as f:
    f.write(f"{code} {usage.ru_maxrss * 1024}")
sys.exit(0)
"""


def bounded(
    *args: str | Path,
    stdin: bytes | int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Run:
    """``llava ARGS`` limited to ADDRESS_SPACE and ``timeout``; its exit code (negative: the
    signal that killed it) and its own peak RSS."""
    report = Path(os.environ["LLAVA_HOME"]).parent / f"run-{time.monotonic_ns()}.txt"
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(ADDRESS_SPACE), str(report), *map(str, args)],
        stdin=subprocess.PIPE if isinstance(stdin, bytes) or stdin is None else stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin if isinstance(stdin, bytes) else b"", timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"llava {' '.join(map(str, args))} ran past {timeout} s")
    code, rss = map(int, report.read_text().split())
    report.unlink()
    return Run(code, out, err.decode("utf-8", "replace"), rss, time.monotonic() - start)


def assert_refused(run: Run, code: int, *words: str) -> None:
    """One ``Error:`` line with the documented code, bounded, naming what it should."""
    assert run.code == code, run.err
    assert len(run.lines) == 1 and run.lines[0].startswith("Error: "), run.err
    assert "unexpected" not in run.err and "Traceback" not in run.err, run.err
    assert run.peak_rss < PEAK_RSS, f"peak RSS {run.peak_rss >> 20} MB"
    for word in words:
        assert word in run.err, run.err


@pytest.fixture
def pair_args(oracle: synthetic.ModelPair) -> list[str]:
    return ["-m", str(oracle.model), "--mmproj", str(oracle.mmproj)]


# -- images: bounded reads, any decoder failure, no native chatter ----------------------------

PILLOW = Path(__file__).parent / "pillow_images"  # Pillow 13.0.0's own test images (README)


@pytest.mark.slow
def test_a_thin_strip_within_the_pixel_limit_is_refused_from_its_header(
    tmp_path: Path, pair_args: list[str]
) -> None:
    """1 x 99,000,000 pixels, a 385 KB PNG: 5.6 GB end to end before (libmtmd pads it to a
    square); now refused from the header, and 4096 px is the most a side reaches libmtmd."""
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_bytes(1, 99_000_000, 8, 2, b"\x00" * 8))
    assert_refused(bounded("ask", strip, *pair_args), 4, "one side is over 1024 times")


@pytest.mark.slow
def test_a_big_image_is_scaled_to_what_a_model_reads(tmp_path: Path, pair_args: list[str]) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 4000), (230, 30, 30)).save(big, compress_level=1)
    run = bounded("ask", big, *pair_args, "-v")
    assert (run.code, run.out) == (0, b"red\n"), run.err
    assert "scaled to 4096x2731" in run.err
    assert run.peak_rss < PEAK_RSS


@pytest.mark.slow
def test_an_endless_stdin_is_cut_at_the_byte_limit(pair_args: list[str]) -> None:
    """`head -c 8G /dev/zero | llava ask -`: refused as the bytes arrive, not read to the end."""
    with subprocess.Popen(["head", "-c", "8G", "/dev/zero"], stdout=subprocess.PIPE) as head:
        assert head.stdout is not None
        run = bounded("ask", "-", *pair_args, "--max-image-bytes", "10000000", stdin=head.stdout)
        head.kill()
    assert_refused(run, 4, "standard input is more than 10,000,000 bytes", "--max-image-bytes")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_is_refused_without_reading_it(device: str, pair_args: list[str]) -> None:
    assert_refused(bounded("ask", device, *pair_args), 4, device, "character device")


@pytest.mark.slow
def test_a_fifo_without_a_writer_is_refused_at_once(tmp_path: Path, pair_args: list[str]) -> None:
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    run = bounded("ask", fifo, *pair_args, timeout=30)
    assert_refused(run, 4, "FIFO", "-")


@pytest.mark.slow
def test_a_sparse_4_gb_png_is_refused_by_its_size(tmp_path: Path, pair_args: list[str]) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(4 << 30)
    assert_refused(bounded("ask", huge, *pair_args), 4, "over the limit", "--max-image-bytes")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("unimplemented_pixel_format.dds", "Unimplemented pixel format"),  # NotImplementedError
        ("hopper_webp.tif", "WEBP compression support is not configured"),  # libtiff warns 3x
    ],
)
def test_pillow_failures_are_bad_input_and_libtiff_stays_quiet(
    name: str, why: str, pair_args: list[str]
) -> None:
    assert_refused(bounded("ask", PILLOW / name, *pair_args), 4, name, why)


# -- model files, the prefix cache and its setting ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["model", "mmproj"])
def test_deeply_nested_gguf_metadata_is_bad_input(
    which: str, oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    crafted = tmp_path / f"nested-{which}.gguf"
    crafted.write_bytes(gguf([ARCH, kv("deep", ARRAY, nested_arrays(100_000))]))
    files = {"model": oracle.model, "mmproj": oracle.mmproj, which: crafted}
    run = bounded("ask", images / "red.png", "-m", files["model"], "--mmproj", files["mmproj"])
    assert_refused(run, 4, str(crafted))


@pytest.mark.slow
def test_a_chat_template_too_long_to_read_is_an_error_unless_another_format_is_chosen(
    tmp_path_factory: pytest.TempPathFactory, images: Path
) -> None:
    pair = synthetic.build_colour_oracle(
        tmp_path_factory.mktemp("long-template"), chat_template="{# x #}" * 1_000_000
    )
    files = ["-m", pair.model, "--mmproj", pair.mmproj]
    run = bounded("ask", images / "red.png", *files)
    assert_refused(run, 4, "its chat template is 7,000,000 bytes", "--chat-format")
    run = bounded("ask", images / "red.png", *files, "--chat-format", "llava")
    assert (run.code, run.out) == (0, b"red\n"), run.err


@pytest.mark.slow
def test_a_vocab_only_gguf_as_the_model_says_it_has_no_weights(images: Path) -> None:
    vocab = Path(__file__).parent / "gguf" / "ggml-vocab-llama-spm.gguf"  # llama.cpp's (README)
    assert_refused(bounded("ask", images / "red.png", "-m", vocab), 4, "vocab-only", "no weights")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["cache info", "ask"])
@pytest.mark.parametrize("value", ["1" * 400, "nan", "-1", "2PiB"])
def test_a_bad_cache_size_is_a_usage_error(
    command: str, value: str, images: Path, pair_args: list[str]
) -> None:
    args = ["ask", images / "red.png", *pair_args] if command == "ask" else command.split()
    run = bounded(*args, env={"LLAVA_CACHE_SIZE": value})
    assert_refused(run, 2, "LLAVA_CACHE_SIZE", "from 0 to 1 PiB")
    assert run.out == b""


@pytest.mark.slow
def test_a_fifo_in_place_of_a_cache_entry_does_not_hang(images: Path, pair_args: list[str]) -> None:
    assert bounded("ask", images / "red.png", *pair_args).out == b"red\n"
    (entry,) = (Path(os.environ["LLAVA_HOME"]) / "cache" / "prefix").glob("*.kv")
    entry.unlink()
    os.mkfifo(entry)
    run = bounded("ask", images / "red.png", *pair_args, timeout=30)
    assert (run.code, run.out) == (0, b"red\n"), run.err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("template", "says"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "took more than",
        ),
        (
            "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "tried to build",
        ),
        ("{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}", "wrote more than"),
    ],
    ids=["nested-loops", "doubling", "output"],
)  # fmt: skip
def test_a_hostile_chat_template_is_stopped(
    template: str, says: str, tmp_path_factory: pytest.TempPathFactory, images: Path
) -> None:
    pair = synthetic.build_colour_oracle(tmp_path_factory.mktemp("evil"), chat_template=template)
    run = bounded("ask", images / "red.png", "-m", pair.model, "--mmproj", pair.mmproj)
    assert_refused(run, 4, str(pair.model.name), says)
    assert run.seconds < 30  # stopped, not run to its end (test_template_limits times it)


# -- options and settings ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--top-p", "2"),
        ("--top-p", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "nan"),
        ("--seed", "4294967296"),
        ("--top-k", "99999999999999"),
        ("--ctx", "4294967360"),
        ("--ctx", "12"),
        ("--threads", "100000"),
        ("--max-tokens", "0"),
        ("--chat-format", "bogus"),
    ],
)
def test_a_bad_option_value_is_one_line_before_anything_loads(
    option: str, value: str, images: Path
) -> None:
    run = bounded("ask", images / "red.png", option, value, "--offline")
    assert_refused(run, 2, option if option != "--chat-format" else "bogus")
    assert "see llava ask --help" in run.err or "--chat-format" in option


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variable", "value"),
    [("LLAVA_CTX", "nan"), ("LLAVA_CTX", "1e99"), ("LLAVA_TEMPERATURE", "-1")],
)
def test_a_bad_numeric_environment_value_is_a_usage_error(
    variable: str, value: str, images: Path
) -> None:
    run = bounded("ask", images / "red.png", "--offline", env={variable: value})
    assert_refused(run, 2, variable)


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"])
@pytest.mark.parametrize("value", ["abc", "-5", "1e9"])
def test_a_bad_hub_timeout_is_a_usage_error_not_a_crash_in_huggingface_hub(
    variable: str, value: str
) -> None:
    run = bounded("pull", "smolvlm-500m", env={variable: value, "HF_HUB_OFFLINE": "0"})
    assert_refused(run, 2, f"{variable}={value!r}", "seconds")


@pytest.mark.slow
def test_an_option_without_its_value_names_the_command_help(images: Path) -> None:
    assert_refused(bounded("ask", images / "red.png", "-p"), 2, "see llava ask --help")


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["cache"]])
def test_a_command_group_alone_prints_its_help_on_stdout(args: list[str]) -> None:
    run = bounded(*args)
    assert run.code == 0 and run.err == ""
    assert run.out.startswith(b"Usage: llava")


@pytest.mark.slow
def test_an_unknown_option_is_one_line_naming_the_help() -> None:
    run = bounded("ask", "--bogus")
    assert_refused(run, 2, "no such option: --bogus", "see llava ask --help")


@pytest.mark.slow
def test_a_context_above_the_training_context_is_clamped_with_a_notice(
    oracle: synthetic.ModelPair, images: Path, pair_args: list[str]
) -> None:
    run = bounded("ask", images / "red.png", *pair_args, "--ctx", "1000000000")
    assert run.code == 0, run.err
    assert run.out == b"red\n"
    assert "more than oracle-model.gguf was trained for; using 4,096 tokens" in run.err
    assert run.peak_rss < PEAK_RSS


@pytest.mark.slow
def test_a_context_that_cannot_fit_in_memory_is_refused_with_the_numbers(
    tmp_path_factory: pytest.TempPathFactory, images: Path
) -> None:
    """A model that claims a 2^31-token training context: the KV cache for 10^9 tokens is
    refused before llama.cpp allocates it, not killed by the OOM killer."""
    pair = synthetic.build_random(tmp_path_factory.mktemp("long"), context=2**31 - 1)
    run = bounded(
        "ask", images / "red.png", "-m", pair.model, "--mmproj", pair.mmproj,
        "--ctx", "1000000000", "--max-tokens", "2",
    )  # fmt: skip
    assert_refused(run, 1, "a context of 1,000,000,000 tokens needs at least", "--ctx")


# -- prompts: bounded before they are read whole or tokenized -------------------------------


@pytest.mark.slow
def test_an_endless_prompt_on_stdin_is_cut_at_16_mib(images: Path, pair_args: list[str]) -> None:
    with subprocess.Popen(["head", "-c", "8G", "/dev/zero"], stdout=subprocess.PIPE) as head:
        run = bounded("ask", images / "red.png", *pair_args, stdin=head.stdout)
        head.kill()
    assert_refused(run, 4, "the prompt on standard input is more than 16 MiB")


@pytest.mark.slow
@pytest.mark.parametrize("text", [b"\0" * (1 << 20), b"a" * (10 << 20), b"a " * (1 << 20)])
def test_a_prompt_longer_than_the_context_is_refused_without_tokenizing_it_whole(
    text: bytes, images: Path, pair_args: list[str]
) -> None:
    """A megabyte of NUL bytes took llama.cpp's tokenizer 50 s (it is superlinear on runs
    without spaces); counted a piece at a time, it is refused at once."""
    run = bounded("ask", images / "red.png", *pair_args, stdin=text, timeout=30)
    assert_refused(run, 1, "this message needs more than 4,096 tokens", "--ctx")
    assert run.seconds < 20


@pytest.mark.slow
def test_a_chat_line_over_16_mib_is_skipped_and_the_chat_goes_on(
    images: Path, pair_args: list[str]
) -> None:
    script = b"x" * (17 << 20) + b"\nWhat colour is this?\n"
    run = bounded("chat", images / "red.png", *pair_args, stdin=script)
    assert run.code == 0, run.err
    assert run.out == b"red\n"
    assert "Error: a line of more than 16 MiB was skipped" in run.err
    assert run.peak_rss < PEAK_RSS


@pytest.mark.slow
@pytest.mark.parametrize("length", [256, 5000])
def test_a_model_reference_too_long_for_a_path_is_a_usage_error(length: int, images: Path) -> None:
    run = bounded("ask", images / "red.png", "-m", "a" * length)
    assert_refused(run, 2, f"a model reference of {length:,} characters")


@pytest.mark.slow
def test_json_output_escapes_what_would_act_on_a_terminal(
    tmp_path: Path, pair_args: list[str]
) -> None:
    """A file name with a right-to-left override: the JSON line carries it as an escape (the
    same string for a program), never the raw character."""
    name = tmp_path / "photo\u202egnp.png"
    Image.new("RGB", (32, 32), (230, 30, 30)).save(name, "PNG")
    run = bounded("ask", name, *pair_args, "--json")
    assert run.code == 0, run.err
    assert "\u202e".encode() not in run.out and b"\\u202e" in run.out
    assert json.loads(run.out)["image"] == str(name)


# -- where the answer goes -----------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_on_stdout_is_one_line_and_exit_1(images: Path, pair_args: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "llava_cli", "ask", str(images / "red.png"), *pair_args],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err == (
        "Error: cannot write to standard output: No space left on device — "
        "check where the output goes\n"
    )


@pytest.mark.slow
def test_a_closed_stdout_is_an_error_and_no_file_takes_its_place(
    images: Path, pair_args: list[str]
) -> None:
    """With descriptor 1 closed, the first file opened would become "stdout": the model file
    must not receive the answer."""
    before = Path(pair_args[1]).read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "llava_cli", "ask", str(images / "red.png"), *pair_args],
        capture_output=True,
        preexec_fn=lambda: os.close(1),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().startswith("Error: cannot write to standard output: standard")
    assert Path(pair_args[1]).read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("target", [">/dev/full", ">&-"])
def test_chat_ends_with_one_line_when_stdout_cannot_take_answers(
    target: str, images: Path, pair_args: list[str]
) -> None:
    command = " ".join(
        [shlex.quote(sys.executable), "-m", "llava_cli", "chat", str(images / "red.png")]
        + [shlex.quote(a) for a in pair_args]
    )
    proc = subprocess.run(
        f"echo 'What colour?' | {command} {target}",
        shell=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.splitlines()[-1].startswith("Error: cannot write to standard output"), err
    assert "unexpected" not in err


@pytest.mark.slow
def test_a_closed_stderr_keeps_the_exit_code(images: Path, pair_args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llava_cli", "ask", str(images / "missing.png"), *pair_args],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 4
    assert proc.stdout == b""


# -- chat: /set, /save, /load --------------------------------------------------------------


@pytest.fixture
def chat(oracle: synthetic.ModelPair) -> Iterator[Chat]:
    c = open_test_chat(oracle)
    yield c
    c.close()


@pytest.mark.parametrize(
    "line",
    [
        "/set temperature nan",
        "/set temperature inf",
        "/set top-p nan",
        "/set seed 4294967296",
        "/set top-k 1e3",
        "/set max-tokens 99999999999",
    ],
)
def test_set_refuses_what_the_options_refuse(
    chat: Chat, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = chat.sampling
    drive(chat, line)
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    assert chat.sampling == before


def _special_targets(tmp_path: Path) -> dict[str, Path]:
    real = tmp_path / "real.md"
    real.write_text("keep me\n")
    link = tmp_path / "link.md"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.md"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.md"
    folder.mkdir()
    return {"link": link, "fifo": fifo, "folder": folder, "device": Path("/dev/null")}


@pytest.mark.slow
def test_save_refuses_links_fifos_folders_and_devices(
    chat: Chat, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(chat, f"/image {images / 'red.png'}", "What colour is this?")
    capsys.readouterr()
    targets = _special_targets(tmp_path)
    for target in targets.values():
        drive(chat, f"/save {target}")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(targets), err
    assert "is a symbolic link (to" in err[0]
    assert "is a FIFO (named pipe), not a file" in err[1]
    assert "is a directory, not a file" in err[2]
    assert "is a character device, not a file" in err[3]
    assert (tmp_path / "real.md").read_text() == "keep me\n"
    assert targets["link"].is_symlink() and Path("/dev/null").is_char_device()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_a_folder_that_does_not_exist(
    chat: Chat, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(chat, f"/save {tmp_path / 'nowhere' / 'chat.md'}")
    err = capsys.readouterr().err
    assert err.startswith("Error: folder ") and "does not exist" in err, err
    assert not (tmp_path / "nowhere").exists()


def test_load_refuses_fifos_devices_and_huge_files_without_reading_them(
    chat: Chat, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "chat.fifo"
    os.mkfifo(fifo)  # no writer: opening it for a blocking read would wait forever
    huge = tmp_path / "huge.md"
    with huge.open("wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GB that take no disk
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    for path in (fifo, Path("/dev/zero"), huge, nested):
        drive(chat, f"/load {path}")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4, err
    assert "is a FIFO" in err[0] and "is a character device" in err[1]
    assert "over the limit" in err[2] and "not a chat saved by llava" in err[3]


@pytest.mark.parametrize("kind", ["fifo", "huge", "link"])
def test_an_unusable_input_history_is_left_alone(kind: str, tmp_path: Path) -> None:
    """prompt-toolkit reads the whole history file when the chat starts: a FIFO there would
    hang it, a huge file fill memory. Such a history is not read; the chat still starts."""
    history = tmp_path / "chat_history"
    if kind == "fifo":
        os.mkfifo(history)
    elif kind == "huge":
        with history.open("wb") as f:
            f.truncate(4 << 30)
    else:
        history.symlink_to("/dev/zero")
    with create_pipe_input() as keys:
        reader = LineReader(COMMANDS, history, input=keys, output=DummyOutput())
        assert isinstance(reader.session.history, InMemoryHistory)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"prompt": "\ud800"}, "a prompt holds a lone surrogate"),
        ({"prompt": ["x"]}, "a prompt is not text"),
        ({"answer": {"a": 1}}, "an answer is not text"),
        ({"images": [{"path": "/x", "sha256": "0", "width": 10**12, "height": -1}]}, "an image"),
    ],
)
def test_load_refuses_what_save_never_writes(
    change: dict[str, object],
    why: str,
    chat: Chat,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    turn = {"prompt": "hello", "images": [], "answer": "none", **change}
    record = {"format": "llava-chat/1", "model": "x", "system": None, "turns": [turn]}
    saved = tmp_path / "odd.json"
    saved.write_text(json.dumps(record))
    drive(chat, f"/load {saved}", "/prompt")
    err = capsys.readouterr().err
    assert f"is not a chat saved by llava ({why}" in err, err
    assert "unexpected" not in err and not chat.conversation.messages


def test_load_of_markdown_without_its_record_end_is_refused(
    chat: Chat, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive(chat, f"/save {tmp_path / 'chat.md'}")
    cut = tmp_path / "cut.md"
    cut.write_text((tmp_path / "chat.md").read_text().replace("-->", ""))
    capsys.readouterr()
    drive(chat, f"/load {cut}")
    err = capsys.readouterr().err
    assert "is not a chat saved by llava (its record has no end (-->))" in err, err


def test_a_nul_byte_in_a_path_is_bad_input_not_a_crash(tmp_path: Path) -> None:
    """A path from a settings file or a chat command can hold a NUL, which os.open refuses
    with ValueError."""
    from llava_cli.errors import BadInput
    from llava_cli.files import read_regular
    from llava_cli.gguf_file import read_gguf

    with pytest.raises(BadInput, match="holds a NUL byte"):
        read_regular(tmp_path / "chat\0.md", 100, "chat file")
    with pytest.raises(BadInput, match="holds a NUL byte"):
        read_gguf(tmp_path / "model\0.gguf")


@pytest.mark.slow
def test_a_long_transcript_fits_the_context_in_a_few_renders(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saved chat of 100,000 turns loaded into a 512-token context: the turns that fit are
    found from the newest, doubling then bisecting, each measurement rendering only what it
    keeps; never the whole chat, never one turn at a time."""
    record = {
        "format": "llava-chat/1",
        "model": "x",
        "system": None,
        "settings": {},
        "turns": [{"prompt": f"q{i}", "images": [], "answer": "none"} for i in range(100_000)],
    }
    saved = tmp_path / "long.json"
    saved.write_text(json.dumps(record))
    chat = open_test_chat(oracle, ctx=512)
    measured = 0
    measure = chat.conversation.measure

    def counting(*args: object, **kwargs: object) -> int:
        nonlocal measured
        measured += 1
        return measure(*args, **kwargs)  # type: ignore[arg-type]

    chat.conversation.measure = counting  # type: ignore[method-assign]
    try:
        drive(chat, f"/load {saved}", f"/image {images / 'red.png'}", "What colour is this?")
        out, err = capsys.readouterr()
        assert out == "red\n", err
        assert measured <= 16, measured
        kept = chat.conversation.exchanges()
        assert 1 < len(kept) < 100 and kept[-1].prompt == "What colour is this?"
        assert f"dropping the {100_001 - len(kept)} oldest messages" in err
    finally:
        chat.close()


# -- a generated set: truncations and byte flips, fixed seed ---------------------------------


def _mutants(data: bytes, seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    for i in range(count):
        if i % 2 == 0:
            cut = rng.randrange(1, len(data))
            yield f"truncated at {cut}", data[:cut]
        else:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 9)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            yield "bytes flipped", bytes(flipped)


@pytest.mark.slow
def test_mutated_images_are_answered_or_refused_cleanly(
    tmp_path: Path, pair_args: list[str]
) -> None:
    """Twelve truncations and flips of a PNG, a JPEG and a TIFF, all in one run: each gets
    an answer or one error line (exit 4), never anything else."""
    sources = []
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif")):
        path = tmp_path / f"src.{ext}"
        Image.new("RGB", (40, 30), (200, 30, 30)).save(path, fmt)
        sources.append(path)
    paths = []
    for k, source in enumerate(sources):
        for j, (_, data) in enumerate(_mutants(source.read_bytes(), seed=k, count=4)):
            path = tmp_path / f"m{k}-{j}{source.suffix}"
            path.write_bytes(data)
            paths.append(path)
    run = bounded("ask", *paths, *pair_args, "--json")
    refused = [json.loads(line) for line in run.out.decode().splitlines()]
    if len(refused) < len(paths):  # some failed the check before the model: nothing was asked
        assert run.code == 4 and all("error" in r for r in refused), run.err
        assert run.lines[:-1] == [f"Error: {r['error']}" for r in refused], run.err
        assert run.lines[-1].startswith("nothing was asked: "), run.err
        assert run.peak_rss < PEAK_RSS
        # the rest, once more: read, decoded and answered (or refused) with the model loaded
        paths = [p for p in paths if str(p) not in {r["image"] for r in refused}]
        run = bounded("ask", *paths, *pair_args, "--json")
    answers = [json.loads(line) for line in run.out.decode().splitlines()]
    assert len(answers) == len(paths)
    errors = [a["error"] for a in answers if "error" in a]
    assert run.code == (4 if errors else 0), run.err
    assert len(run.lines) == len(errors), run.err
    assert "unexpected" not in run.err and "Traceback" not in run.err
    assert run.peak_rss < PEAK_RSS


@pytest.mark.slow
@pytest.mark.parametrize("which", ["model", "mmproj"])
def test_mutated_gguf_files_are_answered_or_refused_cleanly(
    which: str, oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """Truncations and flips of the model and of the projector, through the whole CLI (header
    checks, then llama.cpp's own loader): an answer or one line with exit 4 or 1."""
    source = oracle.model if which == "model" else oracle.mmproj
    data = source.read_bytes()
    for label, mutant in _mutants(data, seed=7, count=6):
        path = tmp_path / f"mutant-{which}.gguf"
        path.write_bytes(mutant)
        files = {"model": oracle.model, "mmproj": oracle.mmproj, which: path}
        run = bounded(
            "ask", images / "red.png", "-m", files["model"], "--mmproj", files["mmproj"],
            "--max-tokens", "4",
        )  # fmt: skip
        if run.code == 0:
            continue
        assert run.code in (1, 4), (label, run.err)
        assert_refused(run, run.code)


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    home = Path(os.environ["LLAVA_HOME"])
    leftovers = [p for p in home.rglob("*") if p.name.endswith(".tmp")] if home.exists() else []
    assert leftovers == []

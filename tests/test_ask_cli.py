"""``llava ask`` end to end, as a real subprocess: stdout, stderr and exit codes apart."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_cli import synthetic
from tests.conftest import llava, png_bytes

# Every test here runs the CLI in a subprocess: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

Q = "What colour is this?"


def model_args(pair: synthetic.ModelPair) -> list[str]:
    return ["--model", str(pair.model), "--mmproj", str(pair.mmproj)]


@pytest.mark.parametrize(
    ("colour", "expected"), [("red", "red"), ("green", "green"), ("blue", "blue"), ("grey", "none")]
)
def test_colour_oracle_answers_exactly(
    oracle: synthetic.ModelPair, images: Path, colour: str, expected: str
) -> None:
    result = llava("ask", images / f"{colour}.png", "-p", Q, *model_args(oracle))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{expected}\n".encode()
    assert result.stderr == b""  # no llama.cpp / libmtmd log lines, nothing else


def test_image_from_stdin(oracle: synthetic.ModelPair, images: Path) -> None:
    blue = (images / "blue.png").read_bytes()
    result = llava("ask", "-", "-p", Q, *model_args(oracle), stdin=blue)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"blue\n", b"")


def test_batch_answers_in_order(oracle: synthetic.ModelPair, images: Path) -> None:
    colours = ("red", "green", "blue")
    files = [images / f"{c}.png" for c in colours]
    result = llava("ask", *files, "-p", Q, *model_args(oracle))
    # Each answer after its image's name, as head(1) writes several files.
    expected = "\n".join(f"==> {images / c}.png <==\n{c}\n" for c in colours)
    assert (result.returncode, result.stdout.decode(), result.stderr) == (0, expected, b"")
    bare = llava("ask", *files, "-p", Q, "--no-label", *model_args(oracle))
    assert (bare.returncode, bare.stdout, bare.stderr) == (0, b"red\ngreen\nblue\n", b"")


def test_prompt_from_stdin_and_env_vars(oracle: synthetic.ModelPair, images: Path) -> None:
    env = {"LLAVA_MODEL": str(oracle.model), "LLAVA_MMPROJ": str(oracle.mmproj)}
    result = llava("ask", images / "green.png", stdin=b"What colour?\n", env=env)
    assert (result.returncode, result.stdout) == (0, b"green\n")
    assert (
        json.loads(llava("ask", images / "green.png", "--json", stdin=b"Hm?", env=env).stdout)[
            "prompt"
        ]
        == "Hm?"
    )


def test_mmproj_found_beside_the_model(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    d = tmp_path / "models dir ü"
    d.mkdir()
    shutil.copy(oracle.model, d / "model.gguf")
    shutil.copy(oracle.mmproj, d / "mmproj-model-f16.gguf")
    result = llava("ask", images / "red.png", "-p", Q, "--model", d / "model.gguf")
    assert (result.returncode, result.stdout) == (0, b"red\n")


def test_unicode_path_with_spaces(oracle: synthetic.ModelPair, tmp_path: Path) -> None:
    path = tmp_path / "mein rotes Bild ✓.png"
    Image.new("RGB", (30, 30), (240, 10, 10)).save(path)
    result = llava("ask", path, "-p", Q, *model_args(oracle))
    assert (result.returncode, result.stdout) == (0, b"red\n")


def test_random_model_deterministic_and_json_fields(
    random_pair: synthetic.ModelPair, images: Path
) -> None:
    args = ["ask", images / "red.png", "-p", "Tell me.", *model_args(random_pair)]
    fixed = ["--temperature", "0.8", "--seed", "42", "--max-tokens", "16"]
    first = llava(*args, *fixed)
    second = llava(*args, *fixed)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.endswith(b"\n") and not first.stdout.endswith(b"\n\n")
    assert first.stderr == b""

    as_json = llava(*args, *fixed, "--json")
    assert as_json.returncode == 0
    lines = as_json.stdout.decode().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["answer"] + "\n" == first.stdout.decode()  # streamed text == final text
    assert record["image"] == str(images / "red.png")
    assert record["sha256"] == hashlib.sha256((images / "red.png").read_bytes()).hexdigest()
    assert record["model"] == random_pair.model.name
    assert record["prompt"] == "Tell me."
    assert record["seed"] == 42
    assert record["finish_reason"] == "length"
    usage = record["usage"]
    assert usage["completion_tokens"] == 16
    assert usage["image_tokens"] == 16
    assert usage["prompt_tokens"] > usage["image_tokens"]
    timings = record["timings"]
    assert set(timings) == {
        "load_s",
        "image_encode_s",
        "prefill_s",
        "ttft_s",
        "decode_s",
        "decode_tokens_per_s",
    }
    assert all(v >= 0 for v in timings.values())


def test_max_tokens_exact_through_the_cli(random_pair: synthetic.ModelPair, images: Path) -> None:
    for n in (1, 9):
        out = llava(
            "ask", images / "blue.png", *model_args(random_pair), "--max-tokens", str(n), "--json"
        )
        assert json.loads(out.stdout)["usage"]["completion_tokens"] == n


def test_together_gives_one_answer(oracle: synthetic.ModelPair, images: Path) -> None:
    result = llava(
        "ask", images / "blue.png", images / "blue.png", "--together", "-p", Q, "--json",
        *model_args(oracle),
    )  # fmt: skip
    assert result.returncode == 0
    record = json.loads(result.stdout)
    assert record["answer"] == "blue"
    assert [i["image"] for i in record["images"]] == [str(images / "blue.png")] * 2
    assert record["usage"]["image_tokens"] == 32


def test_verbose_sends_logs_and_details_to_stderr_only(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    result = llava("ask", images / "red.png", "-p", Q, "--verbose", *model_args(oracle))
    assert result.stdout == b"red\n"
    err = result.stderr.decode()
    assert "llama_model_loader" in err or "load_tensors" in err
    assert "clip_model_loader" in err
    assert "image " + str(images / "red.png") + ": 48x40 PNG RGB, 16 context tokens" in err


def test_batch_with_an_image_that_fails_to_decode_continues_and_exits_4(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """An image whose header reads but whose pixels do not (truncated) fails alone, once the
    model is loaded; the others are answered."""
    full = tmp_path / "noise.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    red, blue = images / "red.png", images / "blue.png"
    result = llava("ask", red, cut, blue, "-p", Q, *model_args(oracle))
    assert result.returncode == 4
    assert result.stdout.decode() == f"==> {red} <==\nred\n\n==> {blue} <==\nblue\n"
    err = result.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: {cut} is truncated or corrupt")

    as_json = llava("ask", red, cut, "--json", "-p", Q, *model_args(oracle))
    assert as_json.returncode == 4
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert records[0]["answer"] == "red"
    assert records[1]["image"] == str(cut) and "truncated" in records[1]["error"]


def _bad_inputs(tmp: Path, oracle: synthetic.ModelPair, images: Path) -> dict[str, list[object]]:
    """Each case: the arguments after ``ask``; all must exit 4 with one line on stderr."""
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "notes.jpg").write_text("dear diary, this is not a JPEG\n")
    (tmp / "folder").mkdir()
    full = tmp / "noise.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    (tmp / "cut.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (tmp / "bomb.png").write_bytes(png_bytes(40_000, 40_000, 8, 2, b"\x00" * 64))
    wrong = synthetic.build_random(tmp / "wrong", mmproj_embd=48)
    cut_model = tmp / "cut-model.gguf"
    cut_model.write_bytes(oracle.model.read_bytes()[:5000])
    red = images / "red.png"
    m = model_args(oracle)
    return {
        "missing file": [tmp / "nope.png", *m],
        "directory": [tmp / "folder", *m],
        "empty file": [tmp / "empty.png", *m],
        "truncated png": [tmp / "cut.png", *m],
        "text named jpg": [tmp / "notes.jpg", *m],
        "decompression bomb": [tmp / "bomb.png", *m],
        "mismatched mmproj": [red, "--model", oracle.model, "--mmproj", wrong.mmproj],
        "truncated gguf": [red, "--model", cut_model, "--mmproj", oracle.mmproj],
        "missing mmproj": [red, "--model", oracle.model, "--mmproj", tmp / "no-mmproj.gguf"],
    }


CASES = [
    ("missing file", "does not exist"),
    ("directory", "is a directory"),
    ("empty file", "is empty"),
    ("truncated png", "truncated or corrupt"),
    ("text named jpg", "is not an image"),
    ("decompression bomb", "over the limit"),
    ("mismatched mmproj", "do not fit"),
    ("truncated gguf", "truncated or corrupt"),
    ("missing mmproj", "does not exist"),
]


@pytest.mark.parametrize(("case", "message"), CASES)
def test_bad_input_exits_4_with_one_line(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path, case: str, message: str
) -> None:
    args = _bad_inputs(tmp_path, oracle, images)[case]
    result = llava("ask", *map(str, args), "-p", Q)
    assert result.returncode == 4, result.stderr
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in lines[0] and " — " in lines[0]  # what went wrong — what to do


def test_model_not_pulled_while_offline_exits_3_with_the_pull_command(images: Path) -> None:
    result = llava("ask", images / "red.png", "--model", "llava")  # an alias
    assert result.returncode == 3
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "Error: llava-1.5-7b:Q4_K_M is not on this machine and offline mode is on"
        " — run: llava pull llava-1.5-7b:Q4_K_M\n"
    )
    # No model named at all: the registry default, with the same advice.
    default = llava("ask", images / "red.png")
    assert default.returncode == 3
    assert b"llava pull smolvlm-500m:Q8_0" in default.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["ask"],
        ["ask", "x.png", "--temperature", "hot"],
        ["ask", "-", "-", "--model", "m.gguf"],
        ["ask", "x.png", "--chat-format", "alpaca"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = llava(*args)
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert result.stdout == b""


def test_ctrl_c_while_streaming_exits_130_quietly(
    random_pair: synthetic.ModelPair, images: Path
) -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_cli", "ask", str(images / "red.png"),
         *model_args(random_pair), "--max-tokens", "100000", "--ctx", "4096"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ},
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # streaming has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert first
    assert proc.returncode == 130
    assert b"Traceback" not in err


def test_greedy_is_deterministic_whatever_the_seed(
    random_pair: synthetic.ModelPair, images: Path
) -> None:
    args = ["ask", images / "grey.png", *model_args(random_pair), "--temperature", "0"]
    outs = {llava(*args, "--seed", seed, "--max-tokens", "20").stdout for seed in ("1", "2")}
    assert len(outs) == 1 and len(next(iter(outs))) > 1


def test_prompt_bytes_that_are_not_utf8_still_work(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    m = model_args(oracle)
    piped = llava("ask", images / "red.png", *m, "--json", stdin=b"What colour\xff?")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["prompt"] == "What colour\ufffd?"
    arg = llava("ask", images / "red.png", *m, "-p", os.fsdecode(b"colour\xff?"))
    assert (arg.returncode, arg.stdout) == (0, b"red\n")


def test_closed_stdin_means_the_default_prompt(oracle: synthetic.ModelPair, images: Path) -> None:
    cmd = [sys.executable, "-m", "llava_cli", "ask", str(images / "red.png"), *model_args(oracle)]
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", *cmd, "--json"], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt"] == "Describe this image."


def test_image_on_stdin_uses_the_default_prompt(oracle: synthetic.ModelPair, images: Path) -> None:
    out = llava("ask", "-", *model_args(oracle), "--json", stdin=(images / "red.png").read_bytes())
    record = json.loads(out.stdout)
    assert (record["image"], record["prompt"], record["answer"]) == (
        "-",
        "Describe this image.",
        "red",
    )


def test_stop_string_ends_the_answer(random_pair: synthetic.ModelPair, images: Path) -> None:
    args = ["ask", images / "red.png", *model_args(random_pair), "--temperature", "0"]
    full = llava(*args, "--max-tokens", "40").stdout.decode().rstrip("\n")
    import re

    found = re.compile(r"[A-Za-z0-9]{2}").search(full, 5)
    assert found, full
    stop = found.group()
    cut = llava(*args, "--max-tokens", "40", "--stop", stop, "--json")
    record = json.loads(cut.stdout)
    assert record["answer"] == full[: full.index(stop)].strip()
    assert record["finish_reason"] == "stop"


def test_sampling_options_from_the_environment(
    random_pair: synthetic.ModelPair, images: Path
) -> None:
    env = {"LLAVA_MAX_TOKENS": "6", "LLAVA_SEED": "99", "LLAVA_TEMPERATURE": "0.7"}
    out = llava("ask", images / "red.png", *model_args(random_pair), "--json", env=env)
    record = json.loads(out.stdout)
    assert (record["usage"]["completion_tokens"], record["seed"]) == (6, 99)
    flags = llava(
        "ask", images / "red.png", *model_args(random_pair), "--json",
        "--max-tokens", "6", "--seed", "99", "--temperature", "0.7",
    )  # fmt: skip
    assert json.loads(flags.stdout)["answer"] == record["answer"]
    assert llava("ask", images / "red.png", env={"LLAVA_CTX": "big"}).returncode == 2


def test_system_prompt(oracle: synthetic.ModelPair, images: Path) -> None:
    m = model_args(oracle)
    default = json.loads(llava("ask", images / "green.png", *m, "-p", Q, "--json").stdout)
    custom = llava("ask", images / "green.png", *m, "-p", Q, "--json", "--system", "Be terse.")
    record = json.loads(custom.stdout)
    assert record["answer"] == "green"
    assert record["usage"]["prompt_tokens"] < default["usage"]["prompt_tokens"]


def test_repeated_image_in_a_batch_is_counted_but_not_reencoded(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    red = images / "red.png"
    out = llava("ask", red, red, *model_args(oracle), "-p", Q, "--json")
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["usage"]["image_tokens"] == second["usage"]["image_tokens"] == 16
    assert second["usage"]["cached_tokens"] == second["usage"]["prompt_tokens"]  # all of it
    assert second["timings"]["image_encode_s"] == 0


def test_single_bad_image_with_json_still_gets_its_record(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    out = llava("ask", tmp_path / "gone.png", *model_args(oracle), "--json")
    assert out.returncode == 4
    record = json.loads(out.stdout)
    assert record["image"] == str(tmp_path / "gone.png") and record["exit_code"] == 4


def test_a_bad_chat_format_is_refused_before_any_model_is_resolved(images: Path) -> None:
    result = llava("ask", images / "red.png", "-m", "no-such-model", "--chat-format", "vicuan")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith("Error: unknown chat format 'vicuan' — did you mean vicuna?")
    assert err.count("\n") == 1 and "no-such-model" not in err


def test_show_prompt_with_a_builtin_format_encodes_nothing(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    args = [*model_args(oracle), "--chat-format", "vicuna", "--system", "Be brief."]
    result = llava(
        "ask", images / "red.png", images / "blue.png", "-p", "Q?", "--show-prompt", *args
    )
    one = "Be brief.\n\nUSER: <__media__>Q?\nASSISTANT:"  # llama.cpp's own vicuna layout
    assert (result.returncode, result.stdout.decode(), result.stderr) == (0, one + "\n" + one, b"")
    lines = (
        llava(
            "ask",
            images / "red.png",
            images / "blue.png",
            "-p",
            "Q?",
            "--show-prompt",
            "--json",
            *args,
        )
        .stdout.decode()
        .splitlines()
    )
    assert [json.loads(line) for line in lines] == [
        {"image": str(images / "red.png"), "prompt": one},
        {"image": str(images / "blue.png"), "prompt": one},
    ]
    together = llava(
        "ask",
        images / "red.png",
        images / "blue.png",
        "-p",
        "Q?",
        "--together",
        "--show-prompt",
        *args,
    )
    two = "Be brief.\n\nUSER: <__media__><__media__>Q?\nASSISTANT:"
    assert together.stdout.decode() == two
    missing = llava("ask", images / "nope.png", "--show-prompt", *args)
    assert missing.returncode == 4 and missing.stdout == b""


def test_a_failing_template_is_one_line_naming_the_model_file(tmp_path: Path, images: Path) -> None:
    pair = synthetic.build_colour_oracle(
        tmp_path / "m",
        chat_template="{{ raise_exception('Only user and assistant roles are supported!') }}",
    )
    result = llava("ask", images / "red.png", *model_args(pair))
    assert (result.returncode, result.stdout) == (4, b"")
    err = result.stderr.decode()
    assert err.startswith(
        "Error: oracle-model.gguf: the chat template failed: Only user and assistant roles"
    )
    assert err.count("\n") == 1 and "--show-prompt" in err and "--chat-format llava" not in err


def test_thinking_never_reaches_stdout(tmp_path: Path, images: Path) -> None:
    """A template that always opens a thinking block (as QwQ's and DeepSeek-R1's do, dropping
    earlier thinking with ``split('</think>')``): the oracle's word lands inside it, so
    the answer is empty; the thinking is in --json's field, and nowhere on a pipe."""
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content.split('</think>')[-1] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: <think>\n{% endif %}"
    )
    pair = synthetic.build_colour_oracle(tmp_path / "m", chat_template=template)
    plain = llava("ask", images / "red.png", "-p", Q, *model_args(pair))
    assert (plain.returncode, plain.stdout) == (0, b"\n")
    assert plain.stderr == b"the model thought but gave no answer\n"  # no thinking: a pipe
    record = json.loads(
        llava("ask", images / "red.png", "-p", Q, "--json", *model_args(pair)).stdout
    )
    assert (record["answer"], record["thinking"]) == ("", "red")

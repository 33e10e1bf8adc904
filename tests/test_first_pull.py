"""First contact: the pull that `ask` makes of a model nobody pulled says what it fetches, and on a
terminal asks before a big one; the README's quick start, the registry default and `llava list`'s
hint name one model; tables fit 80 columns."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava_cli import registry, synthetic
from llava_cli.text import cell_width
from llava_cli.units import human_bytes

from .conftest import REPO as CHECKOUT
from .conftest import llava
from .fakehub import FakeHub, write_user_entry

# Every test here runs the CLI in a subprocess: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

REPO = "test/colour-oracle-GGUF"
MODEL = "oracle-F16.gguf"
MMPROJ = "mmproj-oracle-F16.gguf"


@dataclass(frozen=True)
class Hub:
    hub: FakeHub
    env: dict[str, str]


@pytest.fixture
def hub(oracle: synthetic.ModelPair, tmp_path: Path) -> Iterator[Hub]:
    """The oracle served as a hub repo; HOME is the test's folder, so the cache is under ~."""
    with FakeHub() as fake:
        fake.add_repo(REPO, {MODEL: oracle.model.read_bytes(), MMPROJ: oracle.mmproj.read_bytes()})
        env = {
            "HF_ENDPOINT": fake.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            "HOME": str(tmp_path),
        }
        yield Hub(fake, env)


def sizes(oracle: synthetic.ModelPair) -> tuple[int, int]:
    """The served model's and projector's sizes in bytes, from the built fixture."""
    return oracle.model.stat().st_size, oracle.mmproj.stat().st_size


def test_an_implicit_pull_says_what_it_fetches(
    hub: Hub, images: Path, oracle: synthetic.ModelPair
) -> None:
    """No terminal: the notice, then the pull goes ahead as before, whatever the size."""
    model, mmproj = sizes(oracle)
    result = llava("ask", images / "red.png", "-m", REPO, "--temperature", "0", env=hub.env)
    assert (result.returncode, result.stdout) == (0, b"red\n"), result.stderr
    first = result.stderr.decode().splitlines()[0]
    assert first == (
        f"pulling {REPO}:F16: model {human_bytes(model)} + projector {human_bytes(mmproj)} "
        f"= {human_bytes(model + mmproj)} into ~/hf-home/hub"
    )
    again = llava("ask", images / "red.png", "-m", REPO, env={**hub.env, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and b"pulling" not in again.stderr  # on disk: nothing to say


def test_a_partial_download_counts_only_what_is_left(
    hub: Hub, images: Path, oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    import hashlib

    model = oracle.model.read_bytes()
    left, mmproj = len(model) - 74_300, oracle.mmproj.stat().st_size
    blobs = tmp_path / "hf-home" / "hub" / "models--test--colour-oracle-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{hashlib.sha256(model).hexdigest()}.llava-partial").write_bytes(model[:74_300])
    result = llava("ask", images / "red.png", "-m", REPO, env=hub.env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().startswith(
        f"pulling {REPO}:F16: model {human_bytes(left)} (the rest of {human_bytes(len(model))}) "
        f"+ projector {human_bytes(mmproj)} = {human_bytes(left + mmproj)} into ~/hf-home/hub\n"
    )


def on_a_terminal(
    args: list[str | Path], env: dict[str, str], answer: bytes | None, piped: bytes | None = None
) -> tuple[int, str]:
    """Run the CLI with stdin and stderr on a terminal (stdout a pipe); answer the question
    with ``answer`` once it shows. Returns the exit code and what the terminal showed.
    ``piped``: standard input is a pipe carrying these bytes instead, and the terminal is the
    process's controlling terminal (``echo question | llava ask`` in a shell)."""
    primary, secondary = pty.openpty()

    def take_terminal() -> None:  # in the child, after setsid: the pty becomes /dev/tty
        fcntl.ioctl(secondary, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_cli", *map(str, args)],
        stdin=secondary if piped is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**os.environ, **env},
        start_new_session=True,
        preexec_fn=take_terminal,  # noqa: PLW1509 (one ioctl; no lock taken)
    )
    if piped is not None:
        assert proc.stdin is not None
        proc.stdin.write(piped)
        proc.stdin.close()
        proc.stdin = None  # communicate() below must not flush it again
    os.close(secondary)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 4096)
                except OSError:  # the other end closed: the process is done with the terminal
                    break
                if not chunk:
                    break
                shown += chunk
                if answer is not None and shown.endswith(b"[y/N] "):
                    os.write(primary, answer)
                    answer = None
            elif proc.poll() is not None:
                break
        proc.communicate(timeout=30)
    finally:
        os.close(primary)
    return proc.returncode, shown.decode(errors="replace").replace("\r\n", "\n")


def test_a_big_implicit_pull_is_asked_about_on_a_terminal(hub: Hub, images: Path) -> None:
    hub.hub.claim_size(MODEL, 2_000_000_000)  # the hub says 2 GB: over the 1 GB threshold
    code, shown = on_a_terminal(["ask", images / "red.png", "-m", REPO], hub.env, b"n\n")
    assert code == 3, shown
    assert (
        f"pulling {REPO}:F16: model 2.0 GB + projector 60.5 kB = 2.0 GB into ~/hf-home/hub" in shown
    )
    assert "Download 2.0 GB now? [y/N] " in shown
    assert shown.rstrip().endswith(
        f"Error: {REPO}:F16 was not downloaded — pull it when it suits you with "
        f"`llava pull {REPO}:F16`, or pass -y (or set LLAVA_YES=1) to download without this "
        "question"
    )
    assert hub.hub.gets(MODEL) == []  # not a byte fetched

    code, shown = on_a_terminal(["ask", images / "red.png", "-m", REPO], hub.env, b"y\n")
    assert "Download 2.0 GB now? [y/N] " in shown
    assert hub.hub.gets(MODEL)  # it went ahead (and found the hub's claim false)


def test_the_question_is_asked_on_the_terminal_when_stdin_is_piped(hub: Hub, images: Path) -> None:
    """`echo 'What colour?' | llava ask red.png`: the prompt comes down the pipe, so the
    answer to the download question is read from the terminal itself."""
    hub.hub.claim_size(MODEL, 2_000_000_000)
    code, shown = on_a_terminal(["ask", images / "red.png", "-m", REPO], hub.env, b"n\n",
                                piped=b"What colour?\n")  # fmt: skip
    assert code == 3, shown
    assert "Download 2.0 GB now? [y/N] " in shown
    assert hub.hub.gets(MODEL) == []


@pytest.mark.parametrize("skip", [["-y"], ["--yes"], []])
def test_yes_skips_the_question(hub: Hub, images: Path, skip: list[str]) -> None:
    hub.hub.claim_size(MODEL, 2_000_000_000)
    env = hub.env if skip else {**hub.env, "LLAVA_YES": "1"}
    _, shown = on_a_terminal(["ask", images / "red.png", "-m", REPO, *skip], env, None)
    assert "pulling" in shown and "[y/N]" not in shown
    assert hub.hub.gets(MODEL)


def test_no_question_without_a_terminal(hub: Hub, images: Path) -> None:
    hub.hub.claim_size(MODEL, 2_000_000_000)
    result = llava("ask", images / "red.png", "-m", REPO, env=hub.env)
    assert b"[y/N]" not in result.stderr
    assert hub.hub.gets(MODEL)


# ---- one model named everywhere a newcomer looks first ----


def quick_start_pull() -> str:
    """The model the README's quick start pulls (its `## Quick start` code blocks)."""
    text = (CHECKOUT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    pulls = [m for block in blocks for m in re.findall(r"llava pull (\S+)", block)]
    assert len(pulls) == 1, pulls
    return pulls[0]


def test_the_quick_start_the_default_and_the_empty_list_agree() -> None:
    default = registry.load().default
    assert quick_start_pull() == default
    empty = llava("list")
    assert empty.returncode == 0 and empty.stdout == b""
    assert empty.stderr.decode() == f"no models pulled yet — try: llava pull {default}\n"
    spec = registry.load().get(default)
    _, file = spec.quant(None)
    assert file.size and spec.mmproj.size and file.sha256 and spec.mmproj.sha256  # pinned
    assert file.size + spec.mmproj.size < 1_000_000_000  # fetched without a question


# ---- tables fit the terminal ----


def widths(output: bytes) -> list[int]:
    return [cell_width(line) for line in output.decode().splitlines()]


def test_list_available_fits_80_columns() -> None:
    result = llava("list", "--available", env={"COLUMNS": "80"})
    assert result.returncode == 0
    assert max(widths(result.stdout)) <= 80
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "ALIASES", "PARAMS", "QUANT", "DOWNLOAD", "PULLED"]
    gemma = next(line for line in lines if line.startswith("gemma-3-4b "))
    assert "gemma3" in gemma.split()[1]  # the alias the README uses is shown
    assert sum(line.split()[-1] == "?" for line in lines[1:12]) == 3  # of the 11 first: sized
    wide = llava("list", "--available", env={"COLUMNS": "200"})
    assert max(widths(wide.stdout)) <= 200 and b"DESCRIPTION" in wide.stdout


def test_list_fits_80_columns_with_home_as_tilde(hub: Hub) -> None:
    pulled = llava("pull", REPO, env=hub.env)
    assert pulled.returncode == 0, pulled.stderr
    assert "in ~/hf-home/hub/models--test--colour-oracle-GGUF/" in pulled.stderr.decode()
    narrow = llava("list", env={"COLUMNS": "80", "HOME": hub.env["HOME"]})
    assert max(widths(narrow.stdout)) <= 80
    row = narrow.stdout.decode().splitlines()[1]
    assert row.split()[-1].startswith("~/hf-home") and row.endswith("…/" + MODEL)
    whole = llava("list", env={"COLUMNS": "", "HOME": hub.env["HOME"]})  # a pipe: whole paths
    assert whole.stdout.decode().splitlines()[1].split()[-1].count("/") > 5


def test_list_available_asks_the_hub_for_sizes_nothing_else_gives(
    hub: Hub, oracle: synthetic.ModelPair
) -> None:
    write_user_entry("listed", REPO)

    def row(env: dict[str, str]) -> tuple[list[str], str]:
        result = llava("list", "--available", env={**env, "COLUMNS": "100"})
        assert result.returncode == 0, result.stderr
        line = next(x for x in result.stdout.decode().splitlines() if x.startswith("listed "))
        return line.split(), result.stderr.decode()

    online, err = row(hub.env)
    pair = human_bytes(sum(sizes(oracle))).split()
    assert online[-2:] == pair  # the model and its projector, as the hub lists them
    offline, err = row({**hub.env, "HF_HUB_OFFLINE": "1"})
    assert offline[-1] == "?"
    assert err == "?: no size in the registry; the hub is asked for it when online\n"

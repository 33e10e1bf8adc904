"""No network: a hub that is stopped, a port with nothing listening, a host name that never
resolves. Each is said in plain words, with the host, `--offline` and what is on disk; resuming
is spoken of only when a partial file exists. Also `llava show` offline and on local files."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.units import human_bytes

from .conftest import llava
from .fakehub import FakeHub, write_user_entry

REPO = "test/colour-oracle-GGUF"
MODEL = "oracle-F16.gguf"
MMPROJ = "mmproj-oracle-F16.gguf"
# Python exception names, in any message: "ConnectError", "gaierror", "OSError", …
CLASS_NAME = re.compile(r"[A-Za-z]+(Error|Exception|error)\b|Timeout[A-Z]|Errno")


@dataclass(frozen=True)
class Offline:
    model: bytes
    env: dict[str, str]  # online settings, pointed at a hub that cannot be reached
    host: str  # as the messages name it

    @property
    def cache(self) -> Path:
        return Path(os.environ["HF_HOME"]) / "hub" / "models--test--colour-oracle-GGUF"

    @property
    def partial(self) -> Path:
        sha = hashlib.sha256(self.model).hexdigest()
        return self.cache / "blobs" / f"{sha}.llava-partial"


def write_registry(model: bytes, mmproj: bytes) -> None:
    """A user models.toml entry `oracle`, pinned by sha256 and size like the shipped ones."""
    write_user_entry("oracle", REPO, model=(MODEL, model), mmproj=(MMPROJ, mmproj))


def online(endpoint: str) -> dict[str, str]:
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }


@pytest.fixture
def refused(oracle: synthetic.ModelPair) -> Iterator[Offline]:
    """A port where nothing listens: bound, never listening, so no one else takes it."""
    model, mmproj = oracle.model.read_bytes(), oracle.mmproj.read_bytes()
    write_registry(model, mmproj)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
        yield Offline(model, online(f"http://{host}"), host)


@pytest.fixture
def stopped(oracle: synthetic.ModelPair) -> Offline:
    """The fake hub, serving the model once, then stopped."""
    model, mmproj = oracle.model.read_bytes(), oracle.mmproj.read_bytes()
    write_registry(model, mmproj)
    with FakeHub() as hub:
        hub.add_repo(REPO, {MODEL: model, MMPROJ: mmproj})
        url = hub.url
    return Offline(model, online(url), url.removeprefix("http://"))


@pytest.fixture
def unresolvable(oracle: synthetic.ModelPair) -> Offline:
    model, mmproj = oracle.model.read_bytes(), oracle.mmproj.read_bytes()
    write_registry(model, mmproj)
    return Offline(model, online("http://nonexistent.invalid"), "nonexistent.invalid")


def the_error(result: subprocess.CompletedProcess[bytes], code: int) -> str:
    """The run failed with ``code`` and printed one line on stderr: the error, in plain words."""
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert result.stdout == b""
    lines = err.splitlines()
    assert len(lines) == 1, lines  # no "trying again" notes, no traceback
    assert lines[0].startswith("Error: ") and " — " in lines[0]
    assert not CLASS_NAME.search(lines[0].removeprefix("Error: ")), lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hub", "reason"),
    [
        ("refused", "the connection was refused"),
        ("stopped", "the connection was refused"),
        ("unresolvable", "its host name could not be resolved"),
    ],
)
def test_pull_without_a_hub_says_so_plainly(
    hub: str, reason: str, request: pytest.FixtureRequest
) -> None:
    setup: Offline = request.getfixturevalue(hub)
    line = the_error(llava("pull", "oracle", env=setup.env), 3)
    assert line == (
        f"Error: cannot reach the hub at {setup.host}: {reason} — check the network connection "
        "and HF_ENDPOINT; nothing was downloaded; no model is on disk yet to use with --offline"
    )
    assert "resume" not in line
    assert not setup.cache.exists()  # nothing written for a pull that never started


@pytest.mark.slow
def test_a_partial_file_is_named_with_how_much_is_kept(stopped: Offline) -> None:
    stopped.partial.parent.mkdir(parents=True)
    stopped.partial.write_bytes(stopped.model[:100_000])
    line = the_error(llava("pull", "oracle", env=stopped.env), 3)
    assert "nothing was downloaded" not in line
    size = human_bytes(len(stopped.model))
    assert f"100.0 kB of {MODEL} ({size}) is kept: `llava pull oracle` resumes from there" in line
    assert stopped.partial.stat().st_size == 100_000  # kept, untouched


@pytest.mark.slow
def test_models_on_disk_are_offered_for_offline_use(
    refused: Offline, oracle: synthetic.ModelPair, images: Path
) -> None:
    model, mmproj = oracle.model.read_bytes(), oracle.mmproj.read_bytes()
    with FakeHub() as hub:
        hub.add_repo(REPO, {MODEL: model, MMPROJ: mmproj})
        pulled = llava("pull", "oracle", env=online(hub.url))
        assert pulled.returncode == 0, pulled.stderr
    line = the_error(llava("pull", "smolvlm-500m", env=refused.env), 3)
    assert line.endswith("; nothing was downloaded; on disk, usable with --offline: oracle:F16")
    # ask says the same when it has to pull, and the model on disk works
    asked = the_error(llava("ask", images / "red.png", "-m", "smolvlm-500m", env=refused.env), 3)
    assert asked == line
    offline = llava("ask", images / "red.png", "-m", "oracle", "--offline", env=refused.env)
    assert (offline.returncode, offline.stdout) == (0, b"red\n"), offline.stderr


@pytest.mark.slow
def test_show_a_hub_repo_without_a_hub(refused: Offline) -> None:
    line = the_error(llava("show", "someone/Some-GGUF", env=refused.env), 3)
    assert line.startswith(f"Error: cannot reach the hub at {refused.host}: ")
    assert "no model is on disk yet to use with --offline" in line
    offline = the_error(llava("show", "someone/Some-GGUF", "--offline", env=refused.env), 3)
    assert offline == (
        "Error: someone/Some-GGUF is not pulled and offline mode is on — without --offline "
        "(and HF_HUB_OFFLINE), `llava show someone/Some-GGUF` asks the hub"
    )


@pytest.mark.slow
def test_show_a_registry_entry_offline_asks_nothing(refused: Offline) -> None:
    """`--offline`: what the registry knows, and no request (none could be answered here)."""
    result = llava("show", "smolvlm2-500m-video", "--offline", env=refused.env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert re.search(
        r"^repo +ggml-org/SmolVLM2-500M-Video-Instruct-GGUF$", result.stdout.decode(), re.M
    )
    online = llava("show", "smolvlm2-500m-video", env=refused.env)
    assert online.returncode == 0
    err = online.stderr.decode()
    assert err.startswith(f"file sizes unknown: cannot reach the hub at {refused.host}: ")
    assert not CLASS_NAME.search(err)


@pytest.mark.slow
def test_show_a_local_gguf(oracle: synthetic.ModelPair) -> None:
    result = llava("show", oracle.model, "--ctx", "512")
    assert result.returncode == 0, result.stderr
    fields = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.decode().splitlines()
    )
    assert fields["file"] == str(oracle.model)
    assert fields["architecture"] == "llama"
    assert fields["size"] == human_bytes(oracle.model.stat().st_size)
    assert re.fullmatch(r"\d+(\.\d+)?K", fields["parameters"])
    assert fields["context length"] == "4096"
    assert fields["mmproj"].startswith(f"{oracle.mmproj}, 60.5 kB, type mlp")
    assert fields["memory"].startswith("about ") and "for 512 tokens" in fields["memory"]
    projector = llava("show", oracle.mmproj)
    assert projector.returncode == 0
    assert re.search(r"^projector type +mlp$", projector.stdout.decode(), re.M)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["show", "./nope.gguf"],
        ["ask", "IMAGE", "-m", "./nope.gguf"],
        ["ask", "IMAGE", "--model", "./nope.gguf", "--mmproj", "./mmproj.gguf"],
        ["ask", "IMAGE", "-m", "./models/nope"],  # spelled as a path: not a reference
    ],
)
def test_a_missing_model_file_says_it_is_missing(
    args: list[str], images: Path, workdir: Path
) -> None:
    run = [images / "red.png" if a == "IMAGE" else a for a in args]
    line = the_error(llava(*run, cwd=workdir), 4)
    named = next(a for a in args if "nope" in a)
    assert line.startswith(f"Error: model file {named} does not exist — ")


@pytest.mark.slow
def test_list_available_waits_a_bounded_time_for_a_silent_hub() -> None:
    """A hub that takes the connection and never answers: `list -a` waits its deadline for
    the sizes, not every request's timeouts and retries (66 s before), then says so."""
    import socket
    import time

    from llava_cli.commands.listing import LISTING_DEADLINE

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "HF_HUB_OFFLINE": "0"}
        start = time.monotonic()
        result = llava("list", "-a", env=env, timeout=60)
        took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode() == "?: no size in the registry, and the hub did not answer\n"
    assert took < LISTING_DEADLINE + 10  # a hang guard, not a speed target

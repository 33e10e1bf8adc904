"""`llava pull` and friends against a local fake hub: the real CLI, the real HTTP protocol.

Every test runs the CLI in a subprocess with ``HF_ENDPOINT`` pointed at a FakeHub serving the
colour-oracle pair; the hub misbehaves on demand (drops, stalls, corrupt bytes, errors).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.units import human_bytes

from .conftest import llava
from .fakehub import FakeHub, write_user_entry

# Every test here runs the CLI in a subprocess: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

REPO = "test/colour-oracle-GGUF"
MODEL = "oracle-F16.gguf"
MMPROJ = "mmproj-oracle-F16.gguf"


@dataclass(frozen=True)
class Served:
    hub: FakeHub
    commit: str
    model: bytes
    mmproj: bytes
    env: dict[str, str]

    def sha(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @property
    def cache(self) -> Path:
        return Path(os.environ["HF_HOME"]) / "hub" / "models--test--colour-oracle-GGUF"

    def blob(self, data: bytes) -> Path:
        return self.cache / "blobs" / self.sha(data)

    def partial(self, data: bytes) -> Path:
        return self.cache / "blobs" / f"{self.sha(data)}.llava-partial"

    @property
    def model_size(self) -> str:
        """The model's size as llava prints it (``274.3 kB``), from the built fixture."""
        return human_bytes(len(self.model))

    @property
    def pair_size(self) -> str:
        return human_bytes(len(self.model) + len(self.mmproj))


@pytest.fixture
def served(oracle: synthetic.ModelPair) -> Iterator[Served]:
    model, mmproj = oracle.model.read_bytes(), oracle.mmproj.read_bytes()
    with FakeHub() as hub:
        commit = hub.add_repo(REPO, {MODEL: model, MMPROJ: mmproj, "README.md": b"# oracle\n"})
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        }
        served = Served(hub, commit, model, mmproj, env)
        write_registry(served)
        yield served


def write_registry(s: Served, *, model_sha: str | None = None, revision: str = "") -> None:
    """A user models.toml entry `oracle` for the served repo, pinned like the shipped ones."""
    write_user_entry("oracle", REPO, model=(MODEL, s.model), mmproj=(MMPROJ, s.mmproj),
                     model_sha=model_sha, mmproj_size=False, revision=revision or s.commit,
                     aliases=("colours",))  # fmt: skip


def ask_red(images: Path, model: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return llava("ask", images / "red.png", "-m", model, "--temperature", "0", env=env)


def test_pull_by_registry_name_then_ask(served: Served, images: Path) -> None:
    result = llava("pull", "colours", env=served.env)  # an alias
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    err = result.stderr.decode()
    # stderr is not a terminal: plain lines, no bar, no escape codes
    size = served.model_size
    assert err.splitlines()[0] == f"downloading {MODEL} ({size})"
    assert f"{MODEL}: {size}, {size} fetched in" in err and "sha256 verified" in err
    assert "oracle:F16: pulled" in err
    assert "\x1b" not in err
    # huggingface_hub's cache layout: blobs by sha256, a snapshot linking to them, no leftovers
    snapshot = served.cache / "snapshots" / served.commit
    assert (snapshot / MODEL).resolve() == served.blob(served.model)
    assert served.blob(served.model).read_bytes() == served.model
    assert served.blob(served.mmproj).read_bytes() == served.mmproj
    assert not list(served.cache.glob("blobs/*.llava-partial"))
    assert served.hub.bytes_sent(MODEL) == len(served.model)

    offline = {**served.env, "HF_HUB_OFFLINE": "1"}
    answer = ask_red(images, "oracle", offline)
    assert (answer.returncode, answer.stdout) == (0, b"red\n"), answer.stderr

    again = llava("pull", "oracle", env=served.env)
    assert again.returncode == 0
    assert "already pulled" in again.stderr.decode()
    assert served.hub.bytes_sent(MODEL) == len(served.model)  # nothing fetched twice


def test_pull_by_repo_id_then_ask(served: Served, images: Path) -> None:
    result = llava("pull", REPO, env=served.env)
    assert result.returncode == 0, result.stderr
    assert f"{REPO}:F16: pulled" in result.stderr.decode()
    refs_main = (served.cache / "refs" / "main").read_text()
    assert refs_main == served.commit
    answer = ask_red(images, REPO, {**served.env, "HF_HUB_OFFLINE": "1"})
    assert (answer.returncode, answer.stdout) == (0, b"red\n"), answer.stderr
    quant = ask_red(images, f"{REPO}:f16", {**served.env, "HF_HUB_OFFLINE": "1"})
    assert quant.stdout == b"red\n"
    missing = llava("pull", f"{REPO}:Q4_K_M", env=served.env)
    assert missing.returncode == 2
    assert "has no Q4_K_M file — choose one of F16" in missing.stderr.decode()


def test_ask_pulls_a_missing_model_itself(served: Served, images: Path) -> None:
    answer = ask_red(images, "oracle", served.env)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == b"red\n"  # progress went to stderr, never stdout
    assert "sha256 verified" in answer.stderr.decode()


def test_offline_sends_no_request_and_says_what_to_run(served: Served, images: Path) -> None:
    for env, flag in (({**served.env, "HF_HUB_OFFLINE": "1"}, []), (served.env, ["--offline"])):
        result = llava("ask", images / "red.png", "-m", "oracle", *flag, env=env)
        assert result.returncode == 3
        assert result.stderr.decode() == (
            "Error: oracle:F16 is not on this machine and offline mode is on"
            " — run: llava pull oracle:F16\n"
        )
        pulled = llava("pull", "oracle", *(flag or []), env=env)
        assert pulled.returncode == 3
        assert "offline mode is on" in pulled.stderr.decode()
    assert served.hub.requests == []


def test_resume_after_the_server_drops_the_connection(served: Served) -> None:
    half = len(served.model) // 2
    served.hub.drop_after(MODEL, half)
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 0, result.stderr
    assert "connection lost" in result.stderr.decode()
    first, second = served.hub.gets(MODEL)
    assert (first.range_start, first.body_bytes) == (None, half)
    assert (second.range_start, second.body_bytes) == (half, len(served.model) - half)
    assert served.blob(served.model).read_bytes() == served.model


def test_a_server_without_range_support_restarts_from_zero(served: Served) -> None:
    served.hub.drop_after(MODEL, 100_000)
    served.hub.ignore_range(MODEL)
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 0, result.stderr
    first, second = served.hub.gets(MODEL)
    assert first.body_bytes == 100_000
    assert (second.range_start, second.status) == (100_000, 200)  # asked to resume, got it all
    assert second.body_bytes == len(served.model)
    assert served.blob(served.model).read_bytes() == served.model


def test_a_busy_hub_is_asked_again(served: Served) -> None:
    served.hub.fail(MODEL, 503, times=1)  # the first metadata request
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 0, result.stderr
    assert "the hub answered 503" in result.stderr.decode()
    assert "trying again" in result.stderr.decode()


def test_downloads_name_the_commit_not_the_branch(served: Served) -> None:
    """With `revision = "main"`, both files come from the commit the first HEAD saw."""
    write_registry(served, revision="main")
    assert llava("pull", "oracle", env=served.env).returncode == 0
    resolves = [r for r in served.hub.requests if "/resolve/" in r.path]
    heads = [r.path for r in resolves if r.method == "HEAD"]
    assert heads[0] == f"/{REPO}/resolve/main/{MODEL}"
    assert heads[1] == f"/{REPO}/resolve/{served.commit}/{MMPROJ}"
    assert all(served.commit in r.path for r in resolves if r.method == "GET")
    assert (served.cache / "refs" / "main").read_text() == served.commit


def test_a_changed_registry_entry_is_pulled_anew(served: Served, images: Path) -> None:
    assert llava("pull", "oracle", env=served.env).returncode == 0
    new_model = served.model + b"\0" * 64  # a new upload of the file (GGUF allows trailing bytes)
    commit = served.hub.add_repo(REPO, {MODEL: new_model, MMPROJ: served.mmproj})
    write_registry(served, model_sha=served.sha(new_model), revision=commit)
    # the registry pins the new size too
    toml = Path(os.environ["LLAVA_HOME"]) / "models.toml"
    toml.write_text(
        toml.read_text().replace(f"size = {len(served.model)}", f"size = {len(new_model)}")
    )
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 0, result.stderr
    assert "oracle:F16: pulled" in result.stderr.decode()
    record = json.loads(llava("list", "--json").stdout)[0]
    assert record["model"]["digest"] == served.sha(new_model)
    answer = ask_red(images, "oracle", {**served.env, "HF_HUB_OFFLINE": "1"})
    assert answer.stdout == b"red\n", answer.stderr


def slow_pull_under_way(served: Served, min_bytes: int) -> subprocess.Popen[bytes]:
    """`llava pull oracle` in the background at 40 kB/s, once `min_bytes` are on disk."""
    served.hub.throttle(MODEL, 40_000)  # ~7 s for the whole file
    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_cli", "pull", "oracle"],
        env={**os.environ, **served.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    partial = served.partial(served.model)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        not partial.exists() or partial.stat().st_size < min_bytes
    ):
        time.sleep(0.05)
    return proc


def test_resume_after_kill_9(served: Served) -> None:
    proc = slow_pull_under_way(served, 50_000)
    partial = served.partial(served.model)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = partial.stat().st_size
    assert 50_000 <= kept < len(served.model)
    assert not served.blob(served.model).exists()

    served.hub.reset_faults()
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 0, result.stderr
    assert f"resuming at {human_bytes(kept)} of {served.model_size}" in result.stderr.decode()
    resumed = served.hub.gets(MODEL)[-1]
    assert resumed.range_start == kept
    assert resumed.body_bytes == len(served.model) - kept  # only the remaining bytes
    assert served.blob(served.model).read_bytes() == served.model
    assert not partial.exists()


def test_ctrl_c_keeps_the_partial_file_for_the_next_run(served: Served) -> None:
    proc = slow_pull_under_way(served, 20_000)
    partial = served.partial(served.model)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert out == b""
    assert b"Traceback" not in err
    assert partial.stat().st_size >= 20_000
    assert not served.blob(served.model).exists()
    # it says what the next run picks up
    assert re.search(
        rf"stopped; [\d.]+ kB of {MODEL} \([\d.]+ kB\) is kept: `llava pull oracle` resumes",
        err.decode(),
    ), err


def test_sha256_mismatch_deletes_the_download(served: Served) -> None:
    served.hub.corrupt(MODEL)
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 1
    err = result.stderr.decode().splitlines()[-1]
    assert err.startswith(f"Error: {MODEL}: sha256 mismatch (expected {served.sha(served.model)}")
    assert "has been deleted; run the pull again" in err
    assert list(served.cache.glob("blobs/*")) == []
    assert not served.partial(served.model).exists()
    assert llava("list", "--json").stdout.strip() == b"[]"


def test_registry_pin_that_disagrees_with_the_hub_downloads_nothing(served: Served) -> None:
    write_registry(served, model_sha="0" * 64)
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 1
    assert "differs from the registry's 0000" in result.stderr.decode()
    assert served.hub.gets(MODEL) == []


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        (lambda h: h.fail(MODEL, 404, times=None), 3, f"{MODEL} in {REPO} was not found"),
        (lambda h: h.fail(MODEL, 500, times=None), 1, f"the hub answered 500 for {MODEL}"),
        (lambda h: h.fail(MODEL, 401, times=None), 3, "the hub refused access"),
    ],
)
def test_http_errors_are_clear(served: Served, setup: object, code: int, message: str) -> None:
    setup(served.hub)  # type: ignore[operator]
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == code, result.stderr
    lines = result.stderr.decode().splitlines()
    assert lines[-1].startswith("Error: ") and message in lines[-1], lines
    assert "Traceback" not in result.stderr.decode()


def test_unknown_repo_and_gated_repo_hint_at_hf_token(served: Served, oracle: object) -> None:
    result = llava("pull", "nobody/nothing-GGUF", env=served.env)
    assert result.returncode == 3
    assert "repo nobody/nothing-GGUF not found" in result.stderr.decode()
    assert "set HF_TOKEN" in result.stderr.decode()

    served.hub.add_repo(
        "test/gated-GGUF",
        {MODEL: served.model, MMPROJ: served.mmproj},
        gated=True,
        token="hf_right",
    )
    secret = {**served.env, "HF_TOKEN": "hf_wrong_secret"}
    refused = llava("pull", "test/gated-GGUF", env=secret)
    assert refused.returncode == 3
    err = refused.stderr.decode()
    assert "test/gated-GGUF is gated" in err and "HF_TOKEN is set, but" in err
    assert "hf_wrong_secret" not in err
    allowed = llava("pull", "test/gated-GGUF", env={**served.env, "HF_TOKEN": "hf_right"})
    assert allowed.returncode == 0, allowed.stderr
    assert b"hf_right" not in allowed.stderr


def test_a_stalled_server_times_out_clearly(served: Served) -> None:
    served.hub.stall(MODEL, after=1000, seconds=20, times=1)  # some bytes, then nothing
    served.hub.stall(MODEL, after=0, seconds=20)  # and nothing on every retry
    env = {**served.env, "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    started = time.monotonic()
    result = llava("pull", "oracle", env=env)
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    err = result.stderr.decode().splitlines()[-1]
    assert err.startswith(
        f"Error: no answer from {served.hub.url.removeprefix('http://')} for {MODEL} in {REPO} "
        "within 1 s"
    )
    assert err.endswith(
        f"1.0 kB of {MODEL} ({served.model_size}) is kept: `llava pull oracle` resumes from there"
    )
    assert served.partial(served.model).stat().st_size == 1000  # kept for the next run


def test_two_concurrent_pulls_end_with_one_good_copy(served: Served) -> None:
    served.hub.throttle(MODEL, 150_000)
    env = {**os.environ, **served.env}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llava_cli", "pull", "oracle"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert any(b"another process is downloading it; waiting" in err for _, err in results)
    assert served.hub.bytes_sent(MODEL) == len(served.model)  # downloaded once
    assert served.blob(served.model).read_bytes() == served.model


def test_not_enough_disk_is_refused_before_downloading(served: Served) -> None:
    served.hub.add_repo("test/huge-GGUF", {"huge-Q4_K_M.gguf": b"x" * 100, MMPROJ: served.mmproj})
    served.hub.claim_size("huge-Q4_K_M.gguf", 10**16)
    result = llava("pull", "test/huge-GGUF", env=served.env)
    assert result.returncode == 1
    assert "not enough disk space: 10000000.0 GB to download" in result.stderr.decode()
    assert served.hub.gets("huge-Q4_K_M.gguf") == []
    assert served.hub.gets(MMPROJ) == []


def test_model_in_the_hf_cache_from_another_tool_is_used(served: Served, images: Path) -> None:
    """huggingface_hub's own hf_hub_download fills the cache; llava uses it without fetching."""
    script = (
        "import sys; from huggingface_hub import hf_hub_download as d\n"
        f"for f in ({MODEL!r}, {MMPROJ!r}): d({REPO!r}, f, revision={served.commit!r})\n"
    )
    env = {**os.environ, **served.env}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    fetched = served.hub.bytes_sent(MODEL)
    result = llava("pull", "oracle", env=served.env)
    assert result.returncode == 0, result.stderr
    assert "already pulled" in result.stderr.decode()
    assert served.hub.bytes_sent(MODEL) == fetched
    answer = ask_red(images, "oracle", {**served.env, "HF_HUB_OFFLINE": "1"})
    assert answer.stdout == b"red\n", answer.stderr


def test_list_show_and_rm(served: Served) -> None:
    assert llava("list").stderr.decode().startswith("no models pulled yet")
    assert llava("pull", "oracle", env=served.env).returncode == 0

    listed = llava("list")
    lines = listed.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "QUANT", "SIZE", "PULLED", "PATH"]
    assert lines[1].split()[:4] == ["oracle", "F16", *served.pair_size.split()]
    records = json.loads(llava("list", "--json").stdout)
    assert [r["ref"] for r in records] == ["oracle:F16"]
    assert records[0]["model"]["digest"] == served.sha(served.model)

    shown = llava("show", "oracle", "--ctx", "512").stdout.decode()
    assert re.search(rf"^repo +{REPO}$", shown, re.MULTILINE)
    assert "model path" in shown and MODEL in shown
    assert "KV cache" in shown and "for 512 tokens" in shown

    refused = llava("rm", "oracle")  # stdin is not a terminal and no -y
    assert refused.returncode == 2
    assert "pass -y" in refused.stderr.decode()
    assert served.blob(served.model).exists()
    removed = llava("rm", "-y", "oracle")
    assert removed.returncode == 0, removed.stderr
    assert "removed oracle:F16" in removed.stderr.decode()
    assert not served.cache.exists()
    assert json.loads(llava("list", "--json").stdout) == []
    again = llava("rm", "-y", "oracle")
    assert again.returncode == 3


def test_rm_keeps_a_projector_another_pulled_quant_uses(served: Served) -> None:
    q8 = served.model + b"\0" * 32
    served.hub.add_repo(REPO, {MODEL: served.model, "oracle-Q8_0.gguf": q8, MMPROJ: served.mmproj})
    for quant in ("F16", "q8_0"):
        assert llava("pull", f"{REPO}:{quant}", env=served.env).returncode == 0
    ambiguous = llava("rm", "-y", REPO)
    assert ambiguous.returncode == 2
    assert f"choose one: {REPO}:F16, {REPO}:Q8_0" in ambiguous.stderr.decode()
    removed = llava("rm", "-y", f"{REPO}:Q8_0")
    assert removed.returncode == 0, removed.stderr
    assert not served.blob(q8).exists()
    assert served.blob(served.mmproj).exists()  # still F16's projector
    left = json.loads(llava("list", "--json").stdout)
    assert [(r["ref"], r["present"]) for r in left] == [(f"{REPO}:F16", True)]


def test_a_folder_named_like_a_model_is_not_a_path(served: Served, images: Path) -> None:
    work = Path(os.environ["LLAVA_HOME"]).parent / "cwd"
    (work / "oracle").mkdir(parents=True)
    result = llava("ask", images / "red.png", "-m", "oracle", "--offline", cwd=work)
    assert result.returncode == 3  # the registry entry, not pulled, rather than a folder
    assert b"llava pull oracle:F16" in result.stderr


def test_the_config_file_names_the_default_model(served: Served, images: Path) -> None:
    assert llava("pull", "oracle", env=served.env).returncode == 0
    config = Path(os.environ["LLAVA_HOME"]) / "config.toml"
    config.write_text('model = "colours"\n')
    offline = {**served.env, "HF_HUB_OFFLINE": "1"}
    answer = llava("ask", images / "red.png", "--temperature", "0", env=offline)
    assert (answer.returncode, answer.stdout) == (0, b"red\n"), answer.stderr
    config.write_text('model = "colours"\nmodle = "typo"\n')
    bad = llava("ask", images / "red.png", env=offline)
    assert bad.returncode == 2
    assert bad.stderr.decode() == (
        f"Error: {config}: unknown key 'modle' — known keys: model, rpc\n"
    )


def test_rm_asks_on_a_terminal(served: Served) -> None:
    assert llava("pull", "oracle", env=served.env).returncode == 0
    for answer, kept in ((b"n\n", True), (b"y\n", False)):
        primary, secondary = os.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "llava_cli", "rm", "oracle"],
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(secondary)
        os.write(primary, answer)
        out, err = proc.communicate(timeout=30)
        os.close(primary)
        assert proc.returncode == 0, err
        assert out == b""
        assert err.decode().startswith(f"Remove oracle:F16 ({served.pair_size})? [y/N] ")
        assert served.blob(served.model).exists() == kept


def test_list_available_shows_the_registry() -> None:
    result = llava("list", "--available", env={"COLUMNS": ""})  # a pipe: no width limit
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == [
        "NAME",
        "ALIASES",
        "PARAMS",
        "QUANT",
        "DOWNLOAD",
        "PULLED",
        "LICENSE",
        "DESCRIPTION",
    ]  # a pipe gets every column, whole
    default = next(line for line in lines if line.startswith("smolvlm-500m"))
    assert "(default)" in default and "Q8_0" in default and "545.6 MB" in default
    gemma = next(line for line in lines if line.startswith("gemma-3-4b "))
    assert "3.3 GB" in gemma  # 2489757856 + 851251104 bytes, from the pins
    assert "gemma3, gemma-3-4b-it" in gemma
    moondream = next(line for line in lines if line.startswith("moondream2 "))
    assert "~3.7 GB" in moondream  # the entry's approximate figure: its files are not sized
    data = json.loads(llava("list", "--available", "--json").stdout)
    assert {d["key"] for d in data} >= {"llava-1.5-7b", "qwen2.5-vl-7b", "moondream2"}


def test_an_entry_that_names_no_files_takes_them_from_the_listing(
    served: Served, images: Path
) -> None:
    """The current-generation entries leave file names and pins to the hub."""
    write_user_entry("listed", REPO, chat_format="vicuna")
    show = llava("show", "listed", env={**served.env, "HF_HUB_OFFLINE": "1"})
    assert "chosen from the repo's listing at pull time" in show.stdout.decode()
    result = llava("pull", "listed", env=served.env)
    assert result.returncode == 0, result.stderr
    assert "listed:F16: pulled" in result.stderr.decode()
    assert served.blob(served.model).read_bytes() == served.model  # checked by its sha256
    offline = {**served.env, "HF_HUB_OFFLINE": "1"}
    prompt = llava(
        "ask", images / "red.png", "-m", "listed", "-p", "Q?", "--show-prompt", env=offline
    )
    assert prompt.stdout == b"USER: <__media__>Q?\nASSISTANT:"  # the entry's format
    answer = ask_red(images, "listed", offline)
    assert (answer.returncode, answer.stdout) == (0, b"red\n"), answer.stderr
    again = llava("pull", "listed", env=served.env)
    assert "already pulled" in again.stderr.decode()
    assert served.hub.bytes_sent(MODEL) == len(served.model)
    wrong = llava("pull", "listed:Q4_K_M", env=served.env)
    assert wrong.returncode == 2 and "has no Q4_K_M file" in wrong.stderr.decode()


def test_a_registry_chat_format_llava_does_not_know_stops_before_the_pull(
    served: Served, images: Path
) -> None:
    user_file = Path(os.environ["LLAVA_HOME"]) / "models.toml"
    user_file.write_text(user_file.read_text().replace('"gguf"', '"vicunna"'))
    for result in (llava("pull", "oracle", env=served.env), ask_red(images, "oracle", served.env)):
        assert (result.returncode, result.stdout) == (2, b"")
        err = result.stderr.decode()
        assert "models.oracle.chat_format: 'vicunna' is not a format llava knows" in err
        assert "did you mean vicuna?" in err and err.count("\n") == 1
    assert served.hub.bytes_sent(MODEL) == 0  # refused before anything was fetched


# ---- faults on disk and hostile text: a small repo of plain bytes (pull never parses them) ----

SMALL = "test/small-GGUF"
SMALL_MODEL = "small-Q4_K_M.gguf"
SMALL_MMPROJ = "mmproj-small-F16.gguf"


@dataclass(frozen=True)
class SmallHub:
    hub: FakeHub
    model: bytes
    env: dict[str, str]

    @property
    def cache(self) -> Path:
        return Path(os.environ["HF_HOME"]) / "hub" / "models--test--small-GGUF"

    @property
    def partial(self) -> Path:
        return self.cache / "blobs" / f"{hashlib.sha256(self.model).hexdigest()}.llava-partial"


@pytest.fixture
def small() -> Iterator[SmallHub]:
    model = bytes(range(256)) * 1200  # 307,200 bytes
    with FakeHub() as hub:
        hub.add_repo(SMALL, {SMALL_MODEL: model, SMALL_MMPROJ: b"p" * 1000})
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        }
        yield SmallHub(hub, model, env)


def one_error_line(result: subprocess.CompletedProcess[bytes], code: int) -> str:
    """The run failed with `code`, and its last stderr line is the one clean error."""
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert result.stdout == b""
    assert "unexpected" not in err and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("Error: ") and " — " in last
    return last


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Make a folder unwritable even for root: `chattr +i` (or mode 555 for other users)."""
    made: list[Path] = []

    def freeze(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            chattr = shutil.which("chattr")
            frozen = chattr and subprocess.run(
                [chattr, "+i", str(folder)], capture_output=True, check=False
            )
            if not frozen or frozen.returncode:
                pytest.skip("chattr +i is not available here (root ignores mode bits)")
        made.append(folder)

    yield freeze
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


@pytest.mark.parametrize("frozen", ["hf-home", "hf-home/hub"])
def test_an_unwritable_cache_is_one_line_with_the_path(
    small: SmallHub, immutable: Callable[[Path], None], frozen: str, images: Path
) -> None:
    folder = Path(os.environ["HF_HOME"]).parent / frozen
    immutable(folder)
    last = one_error_line(llava("pull", SMALL, env=small.env), 1)
    assert last.startswith(f"Error: cannot write to {folder}/")
    assert ("operation not permitted" if os.geteuid() == 0 else "permission denied") in last
    assert last.endswith("point HF_HOME (or HF_HUB_CACHE) at a writable folder")
    assert small.hub.gets(SMALL_MODEL) == []  # refused before any byte was fetched
    # ask pulls a missing model itself: the same line, the same exit code
    ask = llava("ask", "--model", SMALL, images / "red.png", env=small.env)
    assert one_error_line(ask, 1) == last


@pytest.mark.parametrize(
    ("in_the_way", "env_name"),
    [
        ("hf-home", "HF_HOME"),  # HF_HOME is a file: huggingface_hub trips on it first
        ("hf-home/hub", "HF_HOME"),
        ("hf-home/hub/models--test--small-GGUF/blobs", "HF_HOME"),
        ("elsewhere/cache", "HF_HUB_CACHE"),
    ],
)
def test_a_file_where_a_cache_folder_should_be(
    small: SmallHub, in_the_way: str, env_name: str
) -> None:
    blocker = Path(os.environ["HF_HOME"]).parent / in_the_way
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a folder")
    env = dict(small.env)
    if env_name == "HF_HUB_CACHE":
        env["HF_HUB_CACHE"] = str(blocker)
    last = one_error_line(llava("pull", SMALL, env=env), 1)
    assert last == (
        f"Error: {blocker} is a file where a folder should be"
        " — move it away, or point HF_HOME (or HF_HUB_CACHE) at a folder"
    )
    assert blocker.read_bytes() == b"not a folder"


def test_an_unwritable_record_folder_names_llava_home(
    small: SmallHub, immutable: Callable[[Path], None]
) -> None:
    immutable(Path(os.environ["LLAVA_HOME"]))
    last = one_error_line(llava("pull", SMALL, env=small.env), 1)
    assert last.startswith(f"Error: cannot write to {os.environ['LLAVA_HOME']}/pulled")
    assert last.endswith("point LLAVA_HOME at a writable folder")


def _file_size_limit(limit: int) -> Callable[[], None]:
    """In the child: writes past `limit` bytes fail with EFBIG, as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_disk_that_fills_mid_pull_keeps_the_partial_and_says_how_much_more(
    small: SmallHub,
) -> None:
    limit = 100_000
    result = subprocess.run(
        [sys.executable, "-m", "llava_cli", "pull", SMALL],
        env={**os.environ, **small.env},
        capture_output=True,
        timeout=60,
        preexec_fn=_file_size_limit(limit),
        check=False,
    )
    last = one_error_line(result, 1)
    blobs = small.cache / "blobs"
    assert last == (
        f"Error: disk full at {blobs}: 207.2 kB more needed for {SMALL_MODEL}"
        " (100.0 kB of 307.2 kB downloaded)"
        " — free space and run `llava pull` again to resume"
    )
    assert small.partial.read_bytes() == small.model[:limit]  # kept, and exactly the prefix

    again = llava("pull", SMALL, env=small.env)
    assert again.returncode == 0, again.stderr
    assert "resuming at 100.0 kB of 307.2 kB" in again.stderr.decode()
    resumed = small.hub.gets(SMALL_MODEL)[-1]
    assert (resumed.range_start, resumed.body_bytes) == (limit, len(small.model) - limit)
    assert (blobs / hashlib.sha256(small.model).hexdigest()).read_bytes() == small.model


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("evil\u202egguf.gguf", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("two\nlines-Q8_0.gguf", "U+000A (control character)"),
        ("isolate\u2066-F16.gguf", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
        ("..\\escape-Q8_0.gguf", "the file name '..\\\\escape-Q8_0.gguf'"),
        ("sub/../../escape.gguf", "the file name 'sub/../../escape.gguf'"),
    ],
)
def test_a_listing_with_hostile_file_names_is_refused(
    small: SmallHub, name: str, shown: str
) -> None:
    small.hub.add_repo(SMALL, {SMALL_MODEL: small.model, SMALL_MMPROJ: b"p", name: b"x"})
    last = one_error_line(llava("pull", SMALL, env=small.env), 1)
    assert last.startswith(f"Error: {SMALL} lists ")
    assert shown in last and "refusing a repo whose file names are not plain" in last
    assert not any(c in last for c in "\u202e\u2066\n")
    assert small.hub.gets(SMALL_MODEL) == []


def test_a_malformed_commit_id_from_the_hub_is_refused(small: SmallHub) -> None:
    small.hub.add_repo(SMALL, {SMALL_MODEL: small.model, SMALL_MMPROJ: b"p"}, commit="../../x")
    last = one_error_line(llava("pull", SMALL, env=small.env), 1)
    assert last == (
        f"Error: the hub gave {SMALL} a malformed commit id '../../x'"
        " — nothing was downloaded; check HF_ENDPOINT"
    )
    assert not (small.cache / "snapshots").exists()


def test_a_registry_entry_with_a_bidi_override_stops_before_the_hub(small: SmallHub) -> None:
    """It used to be retried against the hub ("cannot reach … RemoteProtocolError"), and the
    override reached the terminal as it was."""
    user_file = Path(os.environ["LLAVA_HOME"]) / "models.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text(
        f"""
[models.evil]
name = "Evil"
description = "A file name that reads backwards."
repo = "{SMALL}"
revision = "main"
license = "mit"
parameters = "1M"
context_length = 512
chat_format = "gguf"
default_quant = "Q4_K_M"
[models.evil.quants.Q4_K_M]
file = "small-Q4_K_M\\u202egguf.exe"
[models.evil.mmproj]
file = "{SMALL_MMPROJ}"
""",
        encoding="utf-8",
    )
    for result in (llava("pull", "evil", env=small.env), llava("show", "evil", env=small.env)):
        last = one_error_line(result, 2)
        assert last == (
            f"Error: {user_file}: models.evil.quants.Q4_K_M.file: its value holds"
            " U+202E (RIGHT-TO-LEFT OVERRIDE)"
            " — names and text in a registry are plain: remove control and bidi characters"
        )
        assert "\u202e" not in result.stderr.decode()
    assert small.hub.requests == []


# ---- what llava keeps about pulls: records are files anyone can edit ----

SMALL_REF = f"{SMALL}:Q4_K_M"


def record_file(ref: str = SMALL_REF) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", ref) + ".json"
    return Path(os.environ["LLAVA_HOME"]) / "pulled" / name


def pull_small(small: SmallHub) -> dict[str, object]:
    """Pull the small repo with the real CLI; its record, as JSON."""
    result = llava("pull", SMALL, env=small.env)
    assert result.returncode == 0, result.stderr
    record: dict[str, object] = json.loads(record_file().read_text())
    return record


def victim_tree(root: Path) -> Path:
    """Files that are none of llava's business: a tree `_prune` used to remove whole."""
    (root / "blobs").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "blobs" / "f").write_bytes(b"x")
    (root / "docs" / "important.txt").write_bytes(b"precious")
    return root


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: a file's bytes, a link's target, a folder's mark."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "/"
        else:
            found[key] = path.read_bytes()
    return found


@pytest.mark.parametrize(
    "where",
    [
        "outside the hub",  # the review's case: the whole victim/ tree was removed
        "a link outside the hub",  # mmproj.path a link: it was unlinked
        "another repo's folder",
        "dot-dot out of the snapshot",
        "a snapshot folder that links outside",
        "the repo folder itself a link",
    ],
)
def test_rm_deletes_nothing_a_record_names_outside_the_repos_own_folder(
    small: SmallHub, where: str, tmp_path: Path
) -> None:
    record = pull_small(small)
    victim = victim_tree(tmp_path / "victim")
    model = dict(record["model"])  # type: ignore[call-overload]
    snapshot = Path(model["path"]).parent
    hub_root = small.cache.parent
    if where == "outside the hub":
        model["path"] = str(victim / "blobs" / "f")
    elif where == "a link outside the hub":
        (tmp_path / "link").symlink_to(victim / "docs" / "important.txt")
        model["path"] = str(tmp_path / "link")
    elif where == "another repo's folder":
        other = victim_tree(hub_root / "models--someone--else")
        model["path"] = str(other / "blobs" / "f")
        victim = other
    elif where == "dot-dot out of the snapshot":  # snapshots/<commit>/../../../../victim
        victim = victim_tree(hub_root.parent / "victim")
        model["path"] = str(snapshot / ".." / ".." / ".." / ".." / "victim" / "blobs" / "f")
    elif where == "a snapshot folder that links outside":
        forged = small.cache / "snapshots" / ("f" * 40)
        forged.symlink_to(victim / "blobs")
        model["path"] = str(forged / "f")
    else:
        moved = tmp_path / "moved"
        small.cache.rename(moved)
        small.cache.symlink_to(moved)
        victim = moved
    record["model"] = model
    record_file().write_text(json.dumps(record))
    before = tree(victim)
    last = one_error_line(llava("rm", "-y", SMALL), 4)
    assert last.startswith(f"Error: {record_file()} names a model file outside {small.cache}")
    assert "nothing was removed" in last and "delete the record file by hand" in last
    assert tree(victim) == before
    assert record_file().exists()  # the record too: nothing was changed
    if where != "the repo folder itself a link":
        assert (small.cache / "blobs" / hashlib.sha256(small.model).hexdigest()).exists()


def test_rm_removes_only_folders_it_emptied(small: SmallHub) -> None:
    record = pull_small(small)
    foreign = small.cache / ".no_exist" / "c"  # another tool's file in the repo's folder
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(b"theirs")
    removed = llava("rm", "-y", SMALL)
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr.decode() == f"removed {SMALL_REF} (308.2 kB freed)\n"
    assert tree(small.cache) == {".no_exist": "/", ".no_exist/c": b"theirs"}
    assert not record_file().exists()
    assert record["model"]["path"].startswith(str(small.cache / "snapshots"))  # type: ignore[index]


def test_rm_keeps_a_blob_another_revision_links_to(small: SmallHub) -> None:
    pull_small(small)
    digest = hashlib.sha256(small.model).hexdigest()
    other = small.cache / "snapshots" / ("e" * 40) / "sub" / SMALL_MODEL  # another tool's
    other.parent.mkdir(parents=True)
    other.symlink_to(small.cache / "blobs" / digest)
    removed = llava("rm", "-y", SMALL)
    assert removed.returncode == 0, removed.stderr
    assert (small.cache / "blobs" / digest).read_bytes() == small.model
    assert other.resolve() == small.cache / "blobs" / digest
    assert not record_file().exists()


GOOD = {
    "ref": "good:Q8_0",
    "name": "good",
    "repo": "o/r",
    "revision": "main",
    "commit": "1" * 40,
    "quant": "Q8_0",
    "chat_format": "chatml",
    "model": {"file": "m.gguf", "digest": "0" * 64, "size": 1, "path": "/nowhere/m.gguf"},
    "mmproj": {"file": "p.gguf", "digest": "2" * 64, "size": 1, "path": "/nowhere/p.gguf"},
    "pulled_at": 1.0e9,
}


def _with(path: str, value: object) -> dict[str, object]:
    record = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    target = record
    for part in parents:
        target = target[part]
    target[last] = value
    record["ref"] = "bad:Q8_0"
    return record  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (_with("pulled_at", 1e300), "pulled_at is not a time"),  # was OverflowError in list
        (_with("pulled_at", float("nan")), "pulled_at is not a time"),  # ValueError
        (_with("pulled_at", -1e18), "pulled_at is not a time"),  # OSError EOVERFLOW
        (_with("pulled_at", "x"), "pulled_at is not a time"),  # TypeError
        (_with("pulled_at", True), "pulled_at is not a time"),
        (_with("model.size", 10**400), "model.size is not a size in bytes"),  # OverflowError
        (_with("model.size", -5), "model.size is not a size in bytes"),
        (_with("mmproj.size", 1.5), "mmproj.size is not a size in bytes"),
        (_with("model.path", "relative/m.gguf"), "model.path is not an absolute path"),
        (_with("model.path", "/a\0b"), "model.path is not an absolute path"),
        (_with("mmproj.digest", 7), "mmproj: file, digest and path are not text"),
        (_with("model", "m.gguf"), "model does not name a file"),
        (_with("quant", None), "quant is not text"),
        (_with("quant", "X\x1b]0;T\x07\u202eY"), "quant holds U+001B"),  # was raw in show
        (_with("model.file", "m\u202egguf.exe"), "model.file holds U+202E"),
        (_with("repo", "../../x"), "repo is not a hub repo id"),
        ({**GOOD, "ref": "other:Q8_0"}, "it is not the record of other:Q8_0"),
        ({**GOOD, "ref": "bad:Q8_0", "extra": 1}, "its fields are not those"),
        ([GOOD], "not a JSON object"),
    ],
)  # fmt: skip
def test_a_record_with_values_llava_never_writes_is_skipped_with_a_note(
    record: object, why: str
) -> None:
    folder = Path(os.environ["LLAVA_HOME"]) / "pulled"
    folder.mkdir(parents=True)
    (folder / "good--Q8_0.json").write_text(json.dumps(GOOD))
    bad = folder / "bad--Q8_0.json"
    bad.write_text(json.dumps(record))
    for args in (["list"], ["list", "--json"]):
        result = llava(*args)
        assert result.returncode == 0, result.stderr
        assert b"good" in result.stdout and b"bad" not in result.stdout
        [line] = result.stderr.decode().splitlines()
        assert line.startswith(f"skipped {bad}: ") and why in line, line
        assert line.endswith(" — delete it, or pull the model again")


def test_many_unreadable_records_are_one_line() -> None:
    folder = Path(os.environ["LLAVA_HOME"]) / "pulled"
    folder.mkdir(parents=True)
    (folder / "good--Q8_0.json").write_text(json.dumps(GOOD))
    (folder / "a-folder.json").mkdir()  # was `unexpected IsADirectoryError`
    os.mkfifo(folder / "a-fifo.json")
    for i in range(200):
        (folder / f"x{i}.json").write_text("{}")
    result = llava("list", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[1].startswith("good ")
    [line] = result.stderr.decode().splitlines()
    assert line == (
        f"skipped {folder}/a-fifo.json: not a readable regular file of at most 1 MiB"
        f" (and 201 more files in {folder}) — delete it, or pull the model again"
    )

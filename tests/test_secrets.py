"""HF_TOKEN never leaves llava except towards the hub: not on stdout, not on stderr (not even in
an LLAVA_DEBUG=1 traceback), not in any file a pull writes, not to the host a download is
redirected to.

Each test runs the real CLI in a subprocess against a fake hub that refuses (401), fails (500)
or answers malformed JSON, for the call that looks the repo up and for a file's download. The
repo is private to the token, so every run that gets past the lookup used it; the hub's log
shows it was sent. A hub that echoes the token in its error text gets it blotted out; a
control run with that blotting turned off prints the token, so the checks here can see a leak
when there is one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .fakehub import FakeHub

TOKEN = "hf_LlavaCanary7Qx2Zm9WvR4pL8sN3kT6yB1e"  # not a real token: distinctive, never printed
REPO = "test/secret-GGUF"
MODEL = "secret-Q4_K_M.gguf"
MMPROJ = "mmproj-secret-F16.gguf"
WINDOW = 10  # a leak found even when cut short ("hf_Llava…") or wrapped across two lines


def leaks(data: bytes) -> list[str]:
    """The pieces of the token (every WINDOW characters in a row) that occur in ``data``."""
    pieces = {TOKEN[i : i + WINDOW] for i in range(len(TOKEN) - WINDOW + 1)}
    return sorted(p for p in pieces if p.encode() in data)


def leaks_on_disk(root: Path) -> list[str]:
    """Every file (and name) under ``root`` that holds a piece of the token."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if leaks(name.encode()):
                found.append(f"{path} (its name)")
            if (
                name in files
                and path.is_file()
                and not path.is_symlink()
                and leaks(path.read_bytes())
            ):
                found.append(str(path))
    return found


@dataclass(frozen=True)
class Hub:
    hub: FakeHub
    root: Path  # LLAVA_HOME, HF_HOME, HOME, TMPDIR, XDG folders and the working folder: all here
    env: dict[str, str]

    def pull(
        self, *, debug: bool, command: list[str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """``llava pull REPO`` in a subprocess (``command`` replaces ``python -m llava_cli``)."""
        env = {**os.environ, **self.env, "LLAVA_DEBUG": "1" if debug else ""}
        return subprocess.run(
            [*(command or [sys.executable, "-m", "llava_cli"]), "pull", REPO],
            env=env,
            cwd=self.root / "cwd",
            capture_output=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with FakeHub() as fake:
        fake.add_repo(REPO, {MODEL: bytes(range(256)) * 800, MMPROJ: b"p" * 1000}, token=TOKEN)
        env = {
            "HF_ENDPOINT": fake.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "2",
            "HF_TOKEN": TOKEN,
            "LLAVA_HOME": str(tmp_path / "llava-home"),
            "HF_HOME": str(tmp_path / "hf-home"),
            "HOME": str(tmp_path / "home"),  # anything written to ~ or a temporary file is
            "TMPDIR": str(tmp_path / "tmp"),  # looked at too
            **{
                f"XDG_{k}_HOME": str(tmp_path / "xdg" / k.lower())
                for k in ("CACHE", "CONFIG", "DATA", "STATE")
            },
        }
        (tmp_path / "cwd").mkdir()
        (tmp_path / "tmp").mkdir()
        yield Hub(fake, tmp_path, env)


MALFORMED = b'{"id": "test/secret-GGUF", "siblings": [{"rfilename": '

FAULTS: dict[str, Callable[[FakeHub], None]] = {
    "lookup 401": lambda h: h.fail_api(REPO, 401),
    "lookup 500": lambda h: h.fail_api(REPO, 500),
    "lookup 200, malformed JSON": lambda h: h.fail_api(REPO, 200, body=MALFORMED),
    "lookup 500, malformed JSON": lambda h: h.fail_api(REPO, 500, body=b'{"error": "'),
    "file metadata 401": lambda h: h.fail(MODEL, 401),
    "file metadata 500": lambda h: h.fail(MODEL, 500),
    "download 401": lambda h: h.fail_download(MODEL, 401),
    "download 500": lambda h: h.fail_download(MODEL, 500),
    "download 403, malformed JSON": lambda h: h.fail_download(MODEL, 403, body=b'{"error'),
}


WITHOUT_DEBUG = ("lookup 401", "lookup 200, malformed JSON", "download 500")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "debug"),
    [*((name, True) for name in FAULTS), *((name, False) for name in WITHOUT_DEBUG)],
)
def test_a_failing_authenticated_pull_never_shows_the_token(
    hub: Hub, fault: str, debug: bool
) -> None:
    FAULTS[fault](hub.hub)
    result = hub.pull(debug=debug)
    err = result.stderr.decode(errors="replace")
    assert result.returncode != 0, err
    if debug:  # the debug run printed a traceback: the most there is to print
        assert "Traceback" in err, err
    else:
        assert err.splitlines()[-1].startswith("Error: "), err
    assert leaks(result.stdout) == [], result.stdout
    assert leaks(result.stderr) == [], err
    assert leaks_on_disk(hub.root) == []
    # The token was in play: every request to the hub carried it (the repo is private to it).
    to_hub = [r for r in hub.hub.requests if r.path.startswith(("/api/models/", f"/{REPO}/"))]
    assert to_hub and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in to_hub)
    # A download is redirected to another host (the CDN): the token stays behind.
    to_cdn = [r for r in hub.hub.requests if r.path.startswith("/cdn/")]
    assert all("authorization" not in r.headers for r in to_cdn)
    if fault.startswith("download"):
        assert to_cdn, "the download never reached the CDN"


@pytest.mark.slow
def test_a_partial_download_holds_no_token(hub: Hub) -> None:
    """A connection dropped mid-download leaves a partial blob behind: it holds no token."""
    hub.hub.drop_after(MODEL, 50_000, times=1)
    hub.hub.drop_after(MODEL, 0, times=None)  # and nothing more: the pull gives up
    result = hub.pull(debug=True)
    assert result.returncode != 0
    written = [p for p in hub.root.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".llava-partial") for p in written), written
    assert leaks_on_disk(hub.root) == []
    assert leaks(result.stderr) == []


ECHO = b'{"error": "Invalid credentials in Authorization header: Bearer ' + TOKEN.encode() + b'"}'


@pytest.mark.slow
@pytest.mark.parametrize("debug", [True, False])
@pytest.mark.parametrize("where", ["lookup", "download"])
def test_a_hub_that_echoes_the_token_does_not_get_it_printed(
    hub: Hub, where: str, debug: bool
) -> None:
    """A mirror (HF_ENDPOINT) may quote the request's Authorization header in its error text,
    which huggingface_hub puts in its exception: the one-line error and the LLAVA_DEBUG=1
    traceback blot it out."""
    if where == "lookup":
        hub.hub.fail_api(REPO, 401, body=ECHO)
    else:
        hub.hub.fail_download(MODEL, 500, body=ECHO)
    result = hub.pull(debug=debug)
    err = result.stderr.decode(errors="replace")
    assert result.returncode != 0, err
    assert err.splitlines()[-1].startswith("Error: "), err
    assert leaks(result.stderr) == [] and leaks(result.stdout) == [], err
    assert leaks_on_disk(hub.root) == []
    if debug:
        assert "Traceback" in err and "Bearer <hidden>" in err, err


@pytest.mark.slow
def test_the_token_check_would_see_an_echoed_token_were_it_not_hidden(hub: Hub) -> None:
    """Control: the same echo with llava's blotting turned off prints the token, so the checks
    above can see a leak when there is one. Typer's own traceback is told never to show local
    variables (where request headers live), so a later Typer default cannot turn them on."""
    from llava_cli.cli import app

    assert app.pretty_exceptions_show_locals is False
    hub.hub.fail_api(REPO, 401, body=ECHO)
    unblotted = (
        "import sys; from llava_cli import text; text.redacted = lambda t, s=(): t; "
        "from llava_cli import cli; sys.argv[0] = 'llava'; cli.main()"
    )
    result = hub.pull(debug=True, command=[sys.executable, "-c", unblotted])
    assert "Traceback" in result.stderr.decode(errors="replace")
    assert TOKEN[:WINDOW] in leaks(result.stderr)


@pytest.mark.slow
def test_a_malformed_hub_answer_is_one_named_error(hub: Hub) -> None:
    """Not "unexpected JSONDecodeError": the line says the hub's answer was not its JSON."""
    hub.hub.fail_api(REPO, 200, body=MALFORMED)
    result = hub.pull(debug=False)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 1, err
    host = hub.hub.url.split("//")[1].rstrip("/")
    assert err.splitlines() == [
        f"Error: {host} answered with something other than the hub's JSON for {REPO}"
        " — check HF_ENDPOINT points at a Hugging Face hub, or try again later"
    ], err


def test_redacted_hides_the_given_secrets_and_anything_shaped_like_a_hub_token() -> None:
    from llava_cli.text import redacted

    assert redacted(f"a {TOKEN} b") == "a <hidden> b"
    assert redacted("key s3cr3t-value here", ["s3cr3t-value"]) == "key <hidden> here"
    assert redacted("hf_short and hf_ alone stay") == "hf_short and hf_ alone stay"

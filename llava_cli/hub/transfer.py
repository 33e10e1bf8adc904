"""The transfer itself, ours rather than huggingface_hub's.

huggingface_hub 2.x downloads into a process-unique temporary file and never resumes across
runs; a multi-gigabyte model on a flaky line needs better. Here a pull appends to
``blobs/<sha256>.llava-partial`` (a ``kill -9`` loses nothing already written), resumes with an
HTTP ``Range`` request, retries dropped connections, hashes as it goes, and moves the file into
place only once its sha256 matches. One lock per blob (the same lock file huggingface_hub uses)
makes concurrent pulls of one file wait for each other instead of racing. A disk that fills
mid-pull keeps the partial file and says how much more is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import environment
from ..errors import DownloadError, LlavaError
from ..store import RepoCache
from ..units import human_bytes
from .failures import (
    CACHE_SETTING,
    DISK_FULL,
    HubUnreachable,
    NetworkError,
    ServerError,
    cache_writes,
    connect_failure,
    filesystem_error,
    timeout,
    translate,
)
from .remote import ATTEMPTS, UNREACHABLE_RETRIES, Progress, RemoteFile

CHUNK = 1 << 20
MAX_TRIES = 20  # in all, progress or not (wget's default)
DISK_MARGIN = 64 << 20  # keep this much free beyond the download


def check_space(folder: Path, needed: int) -> None:
    """Refuse before a byte is fetched when what is left to download cannot fit."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with cache_writes(probe):
        free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN > free:
        raise DownloadError(
            f"not enough disk space: {human_bytes(needed)} to download, "
            f"{human_bytes(free)} free at {probe} ({human_bytes(DISK_MARGIN)} is kept free)",
            f"free {human_bytes(needed + DISK_MARGIN - free)} more, "
            f"or point {CACHE_SETTING} at a bigger disk",
        )


def download(cache: RepoCache, remote: RemoteFile, progress: Progress) -> Path:
    """Fetch one file into the cache's blobs (resuming, verified, atomic) and return the blob."""
    with cache_writes(cache.folder):
        return _download_locked(cache, remote, progress)


def _download_locked(cache: RepoCache, remote: RemoteFile, progress: Progress) -> Path:
    from filelock import FileLock, Timeout

    blob = cache.blob(remote.digest)
    lock_path = cache.lock(remote.digest)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.note(f"{remote.file}: another process is downloading it; waiting")
        lock.acquire()
    try:
        if blob.is_file() and blob.stat().st_size == remote.size:
            return blob  # the other process finished it
        _transfer(remote, cache.partial(remote.digest), progress)
        os.replace(cache.partial(remote.digest), blob)
        return blob
    finally:
        lock.release()


def _hasher(remote: RemoteFile) -> Any:
    if remote.is_sha256:
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)  # git's blob id: sha1 of a header and the bytes
    h.update(b"blob %d\0" % remote.size)
    return h


@dataclass
class _Partial:
    """The bytes on disk so far, and their running hash."""

    path: Path
    remote: RemoteFile
    have: int = 0
    hasher: Any = None
    restarts: int = 0

    def restart(self) -> None:
        """The server cannot continue from here (no Range support, 416, a wrong offset)."""
        self.restarts += 1
        if self.restarts > ATTEMPTS:
            raise DownloadError(
                f"{self.remote.file}: the server does not resume downloads correctly",
                "try again later, or set HF_ENDPOINT to another mirror",
            )
        self.have, self.hasher = 0, _hasher(self.remote)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _transfer(remote: RemoteFile, partial: Path, progress: Progress) -> None:
    import httpx2

    state = _Partial(partial, remote, hasher=_hasher(remote))
    state.have = partial.stat().st_size if partial.exists() else 0
    if state.have > remote.size:
        partial.unlink()
        state.have = 0
    if state.have:
        progress.note(
            f"{remote.file}: resuming at {human_bytes(state.have)} of {human_bytes(remote.size)}"
        )
        _hash_file(partial, state.hasher)
    progress.start(remote.file, remote.size, state.have)
    started, fetched, failures, tries = time.monotonic(), 0, 0, 0
    while state.have < remote.size:
        before, restarts = state.have, state.restarts
        try:
            fetched += _fetch(remote, state, progress)
        except (httpx2.TransportError, DownloadError) as exc:
            failures = 0 if state.have > before else failures + 1
            tries += 1
            no_connection = _cannot_connect(exc)
            limit = UNREACHABLE_RETRIES + 1 if no_connection else ATTEMPTS
            if failures >= limit or tries >= MAX_TRIES or not _retryable(exc):
                if isinstance(exc, DownloadError):
                    raise
                with translate(remote.repo, remote.commit, remote.file):
                    raise
            why = "no connection" if no_connection else "connection lost"
            why = exc.message if isinstance(exc, DownloadError) else why
            progress.note(f"{remote.file}: {why} at {human_bytes(state.have)}; resuming")
            time.sleep(min(0.25 * 2**failures, 4.0))
            continue
        if state.have == before and state.restarts == restarts:
            break  # the body ended without new bytes: verify what we have
    _verify(remote, partial, state.hasher, state.have)
    seconds = max(time.monotonic() - started, 1e-6)
    check = "sha256" if remote.is_sha256 else "git hash"
    progress.finish(
        f"{remote.file}: {human_bytes(remote.size)}, {human_bytes(fetched)} fetched in "
        f"{seconds:.1f} s ({human_bytes(int(fetched / seconds))}/s), {check} verified"
    )


def _fetch(remote: RemoteFile, state: _Partial, progress: Progress) -> int:
    """One GET from ``state.have`` on, appended to the partial file; returns the bytes added."""
    environment().check_hub_timeouts()
    from huggingface_hub import get_session, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    if state.have:
        headers["Range"] = f"bytes={state.have}-"
    added = 0
    with get_session().stream(
        "GET", remote.url, headers=headers, timeout=timeout("download"), follow_redirects=True
    ) as response:
        if response.status_code == 416:  # the server has no such offset: start over
            state.restart()
            return 0
        if response.status_code >= 400:
            response.read()
            with translate(remote.repo, remote.commit, remote.file):
                hf_raise_for_status(response)
        if state.have and _range_start(response) != state.have:
            if response.status_code == 206:  # a piece from elsewhere in the file: ask again
                state.restart()
                return 0
            state.restart()  # the server ignored Range and sends it all: take it from 0
        with _writing_partial(state), state.path.open("ab" if state.have else "wb") as out:
            for chunk in response.iter_bytes():  # as received: a drop loses nothing
                if state.have + len(chunk) > remote.size:
                    raise DownloadError(
                        f"{remote.file}: the hub sent more than the {remote.size} bytes "
                        "it announced",
                        "try again later; the partial download is kept",
                    )
                out.write(chunk)
                state.hasher.update(chunk)
                state.have += len(chunk)
                added += len(chunk)
                progress.advance(len(chunk))
    return added


@contextlib.contextmanager
def _writing_partial(state: _Partial) -> Iterator[None]:
    """A full disk mid-pull keeps the partial file (the next pull resumes from it) and says how
    much more room the file needs; other write errors name the path."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise filesystem_error(exc, state.path) from exc
        try:  # what reached the disk: the next pull resumes from exactly this
            kept = state.path.stat().st_size
        except OSError:
            kept = state.have
        size = state.remote.size
        raise DownloadError(
            f"disk full at {state.path.parent}: {human_bytes(max(size - kept, 0))} more needed "
            f"for {state.remote.file} ({human_bytes(kept)} of {human_bytes(size)} downloaded)",
            "free space and run `llava pull` again to resume",
        ) from exc


def _range_start(response: Any) -> int | None:
    """Where a 206 body starts (``Content-Range: bytes START-END/TOTAL``); None for a 200."""
    if response.status_code != 206:
        return None
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _cannot_connect(exc: Exception) -> bool:
    import httpx2

    if isinstance(exc, LlavaError):
        return isinstance(exc, HubUnreachable)
    return isinstance(exc, httpx2.ConnectTimeout) or connect_failure(exc) is not None


def _retryable(exc: Exception) -> bool:
    return isinstance(exc, ServerError | NetworkError) or not isinstance(exc, LlavaError)


def _hash_file(path: Path, hasher: Any) -> None:
    with path.open("rb") as f:
        while block := f.read(CHUNK * 4):
            hasher.update(block)


def _verify(remote: RemoteFile, partial: Path, hasher: Any, have: int) -> None:
    if have == remote.size and hasher.hexdigest() == remote.digest:
        return
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    if have != remote.size:
        raise DownloadError(
            f"{remote.file}: the hub sent {have} of {remote.size} bytes",
            "the partial file was deleted; run the pull again",
        )
    raise DownloadError(
        f"{remote.file}: sha256 mismatch (expected {remote.digest}, got {hasher.hexdigest()})",
        "the download was corrupted and has been deleted; run the pull again",
    )

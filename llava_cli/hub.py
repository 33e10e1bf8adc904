"""The only importer of huggingface_hub: file listings, metadata, auth and URLs come from it.

The transfer itself is ours. huggingface_hub 2.x downloads into a process-unique temporary file
and never resumes across runs; a multi-gigabyte model on a flaky line needs better. Here a pull
appends to ``blobs/<sha256>.llava-partial`` (a ``kill -9`` loses nothing already written),
resumes with an HTTP ``Range`` request, retries dropped connections, hashes as it goes, and moves
the file into place only once its sha256 matches. One lock per blob (the same lock file
huggingface_hub uses) makes concurrent pulls of one file wait for each other instead of racing.

Every file-system error on the way (a read-only or immutable cache, a file where a folder should
be, a full disk) becomes a DownloadError naming the path and the fix; a disk that fills mid-pull
keeps the partial file and says how much more is needed. What the hub sends that becomes a path
on disk (file names in a listing, commit ids) is checked before it is used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config import check_hub_environment
from .errors import DownloadError, LlavaError, ModelNotAvailable
from .store import RepoCache, is_commit
from .text import escaped, unsafe_character
from .units import human_bytes

T = TypeVar("T")
CHUNK = 1 << 20
ATTEMPTS = 3  # tries in a row without progress before giving up; each retry resumes
MAX_TRIES = 20  # in all, progress or not (wget's default)
DISK_MARGIN = 64 << 20  # keep this much free beyond the download

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A full disk, a quota, or a file-size limit (RLIMIT_FSIZE): all "free space, then resume".
DISK_FULL = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
CACHE_SETTING = "HF_HOME (or HF_HUB_CACHE)"


class Progress(Protocol):
    """Where transfer progress goes (``render`` has a Rich bar and a plain-lines version)."""

    def start(self, label: str, total: int, done: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self, message: str) -> None: ...
    def note(self, message: str) -> None: ...


class ServerError(DownloadError):
    """A 5xx or 429 from the hub: worth another try."""


class NetworkError(DownloadError):
    """No answer, or a connection lost: worth another try (resuming)."""


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    commit: str
    file: str
    size: int
    digest: str  # the hub's LFS sha256 (or git blob sha1 for a file kept in git)
    url: str

    @property
    def is_sha256(self) -> bool:
        return bool(_SHA256.fullmatch(self.digest))


@dataclass(frozen=True)
class Listing:
    commit: str
    sizes: dict[str, int]  # file name -> size in bytes


def endpoint() -> str:
    check_hub_environment()
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def _timeout(kind: str) -> float:
    check_hub_environment()
    from huggingface_hub import constants

    return float(
        constants.HF_HUB_ETAG_TIMEOUT if kind == "metadata" else constants.HF_HUB_DOWNLOAD_TIMEOUT
    )


def _retrying(call: Callable[[], T], progress: Progress | None, what: str) -> T:
    """A metadata request, tried again after a 5xx/429 or a network error."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except (ServerError, NetworkError) as exc:
            if attempt == ATTEMPTS:
                raise
            if progress is not None:
                progress.note(f"{what}: {exc.message}; trying again")
            time.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")


def list_files(repo: str, revision: str, progress: Progress | None = None) -> Listing:
    """Every file in the repo at that revision, with sizes (one API call)."""
    check_hub_environment()
    from huggingface_hub import HfApi

    def call() -> Any:
        with translate(repo, revision):
            return HfApi(endpoint=endpoint()).model_info(
                repo, revision=revision, files_metadata=True, timeout=_timeout("metadata")
            )

    info = _retrying(call, progress, repo)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    for name in sizes:
        _check_listed_name(repo, name)
    return Listing(_commit(repo, info.sha, revision), sizes)


def _check_listed_name(repo: str, name: str) -> None:
    """A listed file name must be usable as a path under the snapshot: a name with control or
    bidi characters, a backslash, or an empty, '.' or '..' part means a hostile repo."""
    unsafe = unsafe_character(name)
    parts = name.split("/")
    if unsafe is None and "\\" not in name and all(p not in ("", ".", "..") for p in parts):
        return
    what = f"a file name with {unsafe}" if unsafe else f"the file name {escaped(name)!r}"
    raise DownloadError(
        f"{repo} lists {what}: refusing a repo whose file names are not plain",
        "nothing was downloaded; choose another repo or report it to its owner",
    )


def _commit(repo: str, sha: object, revision: str) -> str:
    """The commit id the hub named (it becomes a folder name in the cache): 40 hex digits."""
    if sha is None:
        return revision
    if not isinstance(sha, str) or not is_commit(sha):
        raise DownloadError(
            f"the hub gave {repo} a malformed commit id {escaped(str(sha))[:60]!r}",
            "nothing was downloaded; check HF_ENDPOINT",
        )
    return sha


def file_info(repo: str, revision: str, file: str, progress: Progress | None = None) -> RemoteFile:
    """What the hub says about one file: its commit, size and content hash (one HEAD request).

    The download URL names the commit, not the branch: a push during a (resumed) download
    cannot splice two versions of the file together.
    """
    check_hub_environment()
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    def call() -> Any:
        url = hf_hub_url(repo, file, revision=revision, endpoint=endpoint())
        with translate(repo, revision, file):
            return get_hf_file_metadata(url, timeout=_timeout("metadata"), endpoint=endpoint())

    meta = _retrying(call, progress, file)
    commit = _commit(repo, meta.commit_hash, revision)
    url = hf_hub_url(repo, file, revision=commit, endpoint=endpoint())
    digest = (meta.etag or "").lower()
    if meta.size is None or meta.size < 0 or not (_SHA256.fullmatch(digest) or is_commit(digest)):
        raise DownloadError(
            f"the hub gave no size or content hash for {file} in {repo}",
            "cannot verify it, so it is not downloaded; check HF_ENDPOINT",
        )
    return RemoteFile(repo, commit, file, meta.size, digest, url)


@contextlib.contextmanager
def translate(repo: str, revision: str = "main", file: str | None = None) -> Iterator[None]:
    """huggingface_hub and HTTP errors → our errors, each with what to do. Never shows a token."""
    import httpx2

    check_hub_environment()
    from huggingface_hub import errors

    what = f"{file} in {repo}" if file else repo
    token_hint = (
        "HF_TOKEN is set, but that token has no access to it"
        if os.environ.get("HF_TOKEN")
        else "if it is private or gated, set HF_TOKEN to a token with access"
    )
    try:
        yield
    except errors.OfflineModeIsEnabled as exc:
        raise ModelNotAvailable(
            f"cannot fetch {what}: offline mode", "unset HF_HUB_OFFLINE"
        ) from exc
    except errors.GatedRepoError as exc:
        raise ModelNotAvailable(
            f"{repo} is gated",
            f"accept its terms at {endpoint()}/{repo}; then {token_hint}",
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise ModelNotAvailable(
            f"repo {repo} not found on {endpoint()}", f"check the name; {token_hint}"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise ModelNotAvailable(f"revision {revision!r} not found in {repo}") from exc
    except errors.RemoteEntryNotFoundError as exc:
        raise ModelNotAvailable(
            f"{file or 'file'} not found in {repo} at {revision}",
            "the registry entry may be out of date; see `llava show`",
        ) from exc
    except errors.HfHubHTTPError as exc:
        raise _http_error(
            exc.response.status_code if exc.response is not None else 0, what
        ) from exc
    except httpx2.TimeoutException as exc:
        raise NetworkError(
            f"no answer from {endpoint()} for {what} within {_timeout('download'):g} s",
            "check the network (or raise HF_HUB_DOWNLOAD_TIMEOUT); run again to resume",
        ) from exc
    except httpx2.TransportError as exc:
        raise _unreachable(what, exc) from exc
    except OSError as exc:  # huggingface_hub reading HF_HOME (its token file), or a socket
        if exc.filename is None:
            raise _unreachable(what, exc) from exc
        raise filesystem_error(exc, Path(os.fsdecode(exc.filename)), action="use") from exc


def _unreachable(what: str, exc: Exception) -> NetworkError:
    return NetworkError(
        f"cannot reach {endpoint()} for {what}: {type(exc).__name__}",
        "check the network and HF_ENDPOINT; run again to resume",
    )


def filesystem_error(
    exc: OSError, where: Path, *, setting: str = CACHE_SETTING, action: str = "write to"
) -> DownloadError:
    """A failed read or write under a folder llava keeps, as one line: the path and the fix.

    ``where`` is the path the operation was about, for errors that do not name one; ``setting``
    the variable that moves that folder elsewhere.
    """
    path = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, str | bytes) else where
    code = exc.errno
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return DownloadError(
                f"{blocker} is a file where a folder should be",
                f"move it away, or point {setting} at a folder",
            )
    if code in DISK_FULL:
        return DownloadError(
            f"disk full at {path}", "free some space and run `llava pull` again to resume"
        )
    hint = f"point {setting} at a writable folder"
    if code == errno.EROFS:
        reason = "read-only file system"
    elif code == errno.EPERM:
        reason = "operation not permitted"
        hint = f"make it writable (`chattr -i` if `lsattr` shows it immutable), or {hint}"
    elif code == errno.EACCES:
        reason = "permission denied"
        hint = f"give this user access to it, or {hint}"
    else:
        reason = (exc.strerror or type(exc).__name__).lower()
    return DownloadError(f"cannot {action} {path}: {reason}", hint)


def _file_in_the_way(path: Path) -> Path | None:
    """The first part of ``path`` that exists and is not a folder (a file in the way)."""
    for part in (*reversed(path.parents), path):
        if os.path.lexists(part) and not part.is_dir():
            return part
    return None


@contextlib.contextmanager
def cache_writes(where: Path, *, setting: str = CACHE_SETTING) -> Iterator[None]:
    """File-system errors in the block → DownloadError with the path and the fix."""
    try:
        yield
    except OSError as exc:
        raise filesystem_error(exc, where, setting=setting) from exc


def _http_error(status: int, what: str) -> LlavaError:
    if status == 404:
        return ModelNotAvailable(
            f"{what} was not found on the hub (404)",
            "check the name and revision; a registry entry may be out of date",
        )
    if status in (401, 403):
        return ModelNotAvailable(
            f"the hub refused access to {what} ({status})", "set HF_TOKEN to a token with access"
        )
    kind = ServerError if status >= 500 or status == 429 else DownloadError
    return kind(f"the hub answered {status} for {what}", "try again later; `llava pull` resumes")


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
            if failures >= ATTEMPTS or tries >= MAX_TRIES or not _retryable(exc):
                if isinstance(exc, DownloadError):
                    raise
                with translate(remote.repo, remote.commit, remote.file):
                    raise
            why = exc.message if isinstance(exc, DownloadError) else "connection lost"
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
    check_hub_environment()
    from huggingface_hub import get_session, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    if state.have:
        headers["Range"] = f"bytes={state.have}-"
    added = 0
    with get_session().stream(
        "GET", remote.url, headers=headers, timeout=_timeout("download"), follow_redirects=True
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

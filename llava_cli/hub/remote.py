"""What the hub says about a repo and its files: listings, sizes, content hashes, commits.

huggingface_hub does the asking (URLs, auth, the resolve redirect); every request is tried again
after a 5xx or a dropped connection, and once at most when no connection can be made. What the
hub sends that becomes a path on disk (file names in a listing, commit ids) is checked here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..config import environment
from ..digests import is_commit, is_sha256
from ..errors import DownloadError
from ..text import escaped, unsafe_character
from .failures import HubUnreachable, NetworkError, ServerError, endpoint, timeout, translate

T = TypeVar("T")
ATTEMPTS = 3  # tries in a row without progress before giving up; each retry resumes
UNREACHABLE_RETRIES = 1  # no such host, connection refused: asking again rarely helps


class Progress(Protocol):
    """Where transfer progress goes (``render`` has a Rich bar and a plain-lines version)."""

    def start(self, label: str, total: int, done: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self, message: str) -> None: ...
    def note(self, message: str) -> None: ...


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
        return is_sha256(self.digest)


@dataclass(frozen=True)
class Listing:
    commit: str
    sizes: dict[str, int]  # file name -> size in bytes


def _retrying(call: Callable[[], T], progress: Progress | None, what: str) -> T:
    """A metadata request, tried again after a 5xx/429 or a network error."""
    unreachable = 0
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except HubUnreachable:
            unreachable += 1
            if unreachable > UNREACHABLE_RETRIES or attempt == ATTEMPTS:
                raise
            time.sleep(0.5)  # a blip in the network or DNS; said nothing about, tried once
        except (ServerError, NetworkError) as exc:
            if attempt == ATTEMPTS:
                raise
            if progress is not None:
                progress.note(f"{what}: {exc.message}; trying again")
            time.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")


def list_files(repo: str, revision: str, progress: Progress | None = None) -> Listing:
    """Every file in the repo at that revision, with sizes (one API call)."""
    environment().check_hub_timeouts()
    from huggingface_hub import HfApi

    def call() -> Any:
        with translate(repo, revision, kind="metadata"):
            return HfApi(endpoint=endpoint()).model_info(
                repo, revision=revision, files_metadata=True, timeout=timeout("metadata")
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
    environment().check_hub_timeouts()
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    def call() -> Any:
        url = hf_hub_url(repo, file, revision=revision, endpoint=endpoint())
        with translate(repo, revision, file, kind="metadata"):
            return get_hf_file_metadata(url, timeout=timeout("metadata"), endpoint=endpoint())

    meta = _retrying(call, progress, file)
    commit = _commit(repo, meta.commit_hash, revision)
    url = hf_hub_url(repo, file, revision=commit, endpoint=endpoint())
    digest = (meta.etag or "").lower()
    if meta.size is None or meta.size < 0 or not (is_sha256(digest) or is_commit(digest)):
        raise DownloadError(
            f"the hub gave no size or content hash for {file} in {repo}",
            "cannot verify it, so it is not downloaded; check HF_ENDPOINT",
        )
    return RemoteFile(repo, commit, file, meta.size, digest, url)

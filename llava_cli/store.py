"""What is on disk: model files in the Hugging Face hub cache, and llava's record of its pulls.

Pulled files live where every hub tool looks for them, in huggingface_hub's cache layout:
``models--OWNER--NAME/blobs/<sha256>`` holds the bytes, ``snapshots/<commit>/<file>`` links to
them, ``refs/<branch>`` names the commit. So a model pulled by another tool is found here, and
ours are found by theirs. A pull in progress is ``blobs/<sha256>.llava-partial``: content-addressed,
so the next run can resume it whatever asked for it.

Beside the cache, one small JSON record per pulled model (``<data dir>/pulled/``) remembers which
quant and projector a name stood for, for ``llava list`` and ``llava rm``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import hf_hub_cache, paths

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REF_MAX = 4096  # refs/<branch>: a commit hash
_RECORD_MAX = 1 << 20  # a pulled model's record: a few hundred bytes of JSON


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


@dataclass(frozen=True)
class RepoCache:
    """One repo's folder in the hub cache."""

    repo: str
    root: Path

    @classmethod
    def of(cls, repo: str) -> RepoCache:
        return cls(repo, hf_hub_cache())

    @property
    def folder(self) -> Path:
        return self.root / ("models--" + self.repo.replace("/", "--"))

    def blob(self, digest: str) -> Path:
        return self.folder / "blobs" / digest

    def partial(self, digest: str) -> Path:
        return self.folder / "blobs" / f"{digest}.llava-partial"

    def lock(self, digest: str) -> Path:
        # The same lock file huggingface_hub takes, so its downloads and ours never overlap.
        return self.root / ".locks" / self.folder.name / f"{digest}.lock"

    def snapshot(self, commit: str, file: str) -> Path:
        return self.folder / "snapshots" / commit / file

    def commit_for(self, revision: str) -> str | None:
        if is_commit(revision):
            return revision
        data = read_own_file(self.folder / "refs" / revision, _REF_MAX)
        commit = bytes(data or b"").decode("ascii", "replace").strip()
        return commit if is_commit(commit) else None

    def set_ref(self, revision: str, commit: str) -> None:
        if not is_commit(revision):
            write_atomic(self.folder / "refs" / revision, commit.encode())

    def find(
        self, file: str, *, digest: str | None, size: int | None, commit: str | None
    ) -> Path | None:
        """The file, if it is here: in the commit's snapshot, else by its content hash."""
        if commit is not None:
            linked = self.snapshot(commit, file)
            if linked.is_file() and _size_ok(linked, size) and _digest_ok(linked, digest):
                return linked
        if digest is not None and self.blob(digest).is_file() and _size_ok(self.blob(digest), size):
            return self.blob(digest)
        return None

    def link(self, commit: str, file: str, digest: str) -> Path:
        """Make ``snapshots/<commit>/<file>`` point at the blob (atomically) and return it."""
        target = self.snapshot(commit, file)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = self.blob(digest)
        if target.is_symlink() and target.resolve() == blob.resolve():
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            tmp.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:  # no symlinks (Windows without developer mode): a hard link, else a copy
            try:
                os.link(blob, tmp)
            except OSError:
                shutil.copyfile(blob, tmp)
        os.replace(tmp, target)
        return target

    def snapshot_files(self, commit: str) -> list[str]:
        folder = self.folder / "snapshots" / commit
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file())


def _size_ok(path: Path, size: int | None) -> bool:
    return size is None or path.stat().st_size == size


def _digest_ok(path: Path, digest: str | None) -> bool:
    """A snapshot entry that is a link into blobs/ names its content; trust the name."""
    if digest is None or not path.is_symlink():
        return True
    return path.resolve().name == digest


Bytes = bytes | bytearray | memoryview
_OPEN_OWN = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO put in a file's place must not hang the open
    | getattr(os, "O_NOFOLLOW", 0)  # nor a link lead the read elsewhere
    | getattr(os, "O_CLOEXEC", 0)
)


def read_own_file(path: Path, max_bytes: int) -> bytearray | None:
    """The bytes of a file llava keeps in its own folders (a prefix-cache entry, a record, a
    ref), or None when it is missing, unreadable, not a regular file (a FIFO, a device, a
    symbolic link) or larger than ``max_bytes``: such a file is as good as absent. Never
    blocks, and never allocates more than ``max_bytes``."""
    try:
        fd = os.open(path, _OPEN_OWN)
    except OSError:  # missing, a link (ELOOP), a permission, …
        return None
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                return None
            data = bytearray(info.st_size)
            view, got = memoryview(data), 0
            while got < len(data):  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    return None  # it shrank while we read it
                got += n
            return data
        except (OSError, MemoryError):
            return None


def write_atomic(path: Path, *parts: Bytes) -> None:
    """Write ``parts`` one after another to a temporary file beside ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                out.write(part)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class StoredFile:
    file: str
    digest: str
    size: int
    path: str


@dataclass(frozen=True)
class Pulled:
    """llava's record of one pulled model: what a name stood for when it was pulled."""

    ref: str  # canonical NAME:QUANT or OWNER/REPO:QUANT
    name: str  # display name
    repo: str
    revision: str
    commit: str
    quant: str
    chat_format: str
    model: StoredFile
    mmproj: StoredFile
    pulled_at: float = 0.0

    @property
    def size(self) -> int:
        return self.model.size + (
            0 if self.mmproj.digest == self.model.digest else self.mmproj.size
        )

    def present(self) -> bool:
        return Path(self.model.path).is_file() and Path(self.mmproj.path).is_file()


def remove(record: Pulled, others: list[Pulled]) -> int:
    """Delete a pulled model's files; return the bytes freed.

    A file another pulled model uses (a projector shared by two quants) stays, and so does a
    blob that a snapshot of some other revision or tool still links to.
    """
    keep_links = {f.path for r in others for f in (r.model, r.mmproj)}
    keep_blobs = {Path(p).resolve() for p in keep_links}
    freed = 0
    for path in dict.fromkeys((record.model.path, record.mmproj.path)):
        if path in keep_links:
            continue
        link = Path(path)
        blob = link.resolve()
        if link != blob:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        folder = blob.parent.parent
        if blob in keep_blobs or blob.parent.name != "blobs" or not blob.is_file():
            continue
        snapshots = folder / "snapshots"
        links = snapshots.glob("*/*") if snapshots.is_dir() else iter(())
        if any(other.is_symlink() and other.resolve() == blob for other in links):
            continue
        freed += blob.stat().st_size
        blob.unlink()
        _prune(folder)
    forget(record.ref)
    return freed


def _prune(folder: Path) -> None:
    """Drop empty snapshot folders, and the repo's folder once it holds no blobs at all."""
    snapshots = folder / "snapshots"
    if snapshots.is_dir():
        for sub in snapshots.iterdir():
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty
    blobs = folder / "blobs"
    if not blobs.is_dir() or not any(blobs.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _records_dir() -> Path:
    return paths().data_dir / "pulled"


def _record_path(ref: str) -> Path:
    return _records_dir() / (re.sub(r"[^A-Za-z0-9._-]+", "--", ref) + ".json")


def save(record: Pulled) -> None:
    data = asdict(record) | {"pulled_at": record.pulled_at or time.time()}
    write_atomic(_record_path(record.ref), json.dumps(data, indent=2).encode())


def records() -> Iterator[Pulled]:
    folder = _records_dir()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        record = _parse(path)
        if record is not None:
            yield record


def record_for(ref: str) -> Pulled | None:
    path = _record_path(ref)
    return _parse(path) if path.is_file() else None


def forget(ref: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(ref).unlink()


def _parse(path: Path) -> Pulled | None:
    """A record we cannot read is skipped: it only describes files, it never holds them.
    So is one that is not a regular file or is far larger than a record can be."""
    raw = read_own_file(path, _RECORD_MAX)
    if raw is None:
        return None
    try:
        data: dict[str, Any] = json.loads(raw.decode("utf-8"))
        data["model"] = StoredFile(**data["model"])
        data["mmproj"] = StoredFile(**data["mmproj"])
        return Pulled(**data)
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: [[[…]]]
        return None

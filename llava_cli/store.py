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
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .config import environment, paths
from .digests import is_commit
from .errors import BadInput, LlavaError
from .files import read_own_file, write_atomic
from .registry import is_repo_id
from .text import unsafe_character

_REF_MAX = 4096  # refs/<branch>: a commit hash
_RECORD_MAX = 1 << 20  # a pulled model's record: a few hundred bytes of JSON


@dataclass(frozen=True)
class RepoCache:
    """One repo's folder in the hub cache."""

    repo: str
    root: Path

    @classmethod
    def of(cls, repo: str) -> RepoCache:
        return cls(repo, environment().hub_cache)

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

    Only files in the repo's own folder of the hub cache are touched, whatever the record says:
    a record is a file anyone can edit, so a path elsewhere is refused before anything is
    deleted. A file another pulled model uses (a projector shared by two quants) stays, and so
    does a blob that a snapshot of some other revision or tool still links to.
    """
    folder = RepoCache(record.repo, Path(os.path.realpath(environment().hub_cache))).folder
    mine = {
        text: _in_repo_folder(record, which, text, folder)
        for which, text in (("model", record.model.path), ("mmproj", record.mmproj.path))
    }
    keep_links = {f.path for r in others for f in (r.model, r.mmproj)}
    keep_blobs = {os.path.realpath(p) for p in keep_links}
    blobs = folder / "blobs"
    freed = 0
    for text, link in mine.items():
        if text in keep_links:
            continue
        blob = os.path.realpath(link)
        if link.is_symlink():  # the link itself, never what it points at
            _delete(link)
        if blob in keep_blobs or Path(blob).parent != blobs or _linked(folder, blob):
            continue
        with contextlib.suppress(OSError):
            info = os.lstat(blob)
            if stat.S_ISREG(info.st_mode):
                _delete(Path(blob))
                freed += info.st_size
    _prune(folder)
    forget(record.ref)
    return freed


def _in_repo_folder(record: Pulled, which: str, text: str, folder: Path) -> Path:
    """The record's ``which`` path as it really lies, if that is in the repo's ``folder`` of the
    hub cache (``snapshots/<commit>/…`` or ``blobs/``): its folders resolved, its last part as
    it is (a link there is removed, not followed). Anywhere else: refused."""
    path = Path(text)
    parent = Path(os.path.realpath(path.parent))
    try:
        where = parent.relative_to(folder).parts
    except ValueError:
        where = ()
    in_snapshot = len(where) >= 2 and where[0] == "snapshots"
    if (in_snapshot or where == ("blobs",)) and path.name not in ("", ".", ".."):
        return parent / path.name
    raise BadInput(
        f"{_record_path(record.ref)} names a {which} file outside {folder}: {text}",
        "nothing was removed; llava deletes only files in the model's own folder of the "
        "Hugging Face cache. If the cache has moved, point HF_HOME (or HF_HUB_CACHE) at it; "
        "else delete the record file by hand",
    )


def _linked(folder: Path, blob: str) -> bool:
    """Whether a snapshot of any revision in ``folder`` (ours or another tool's) links to it."""
    for top, _, names in os.walk(folder / "snapshots"):  # links to folders are not followed
        for name in names:
            path = os.path.join(top, name)
            if os.path.islink(path) and os.path.realpath(path) == blob:
                return True
    return False


def _delete(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise LlavaError(
            f"cannot remove {path}: {(exc.strerror or os.strerror(exc.errno or 0)).lower()}",
            "fix the folder's permissions, or run as the user who pulled it, then run "
            "`llava rm` again",
        ) from exc


def _prune(folder: Path) -> None:
    """Remove the empty folders of a repo in the hub cache, and its refs once it holds no blob
    at all (they name commits whose snapshots are gone). Only empty folders are removed: a file
    llava did not put there (another tool's) keeps its folder."""
    blobs = folder / "blobs"
    for top, dirs, _ in os.walk(folder / "snapshots", topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(top, name))  # only when empty; a link is not a folder
    try:
        if blobs.is_dir() and any(blobs.iterdir()):
            return
    except OSError:
        return
    for top, dirs, names in os.walk(folder / "refs", topdown=False):
        for name in names:
            path = os.path.join(top, name)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(top, name))
    for empty in (folder / "refs", folder / "snapshots", blobs, folder):
        with contextlib.suppress(OSError):
            empty.rmdir()


def _records_dir() -> Path:
    return paths().data_dir / "pulled"


def _record_path(ref: str) -> Path:
    return _records_dir() / (re.sub(r"[^A-Za-z0-9._-]+", "--", ref) + ".json")


def save(record: Pulled) -> None:
    data = asdict(record) | {"pulled_at": record.pulled_at or time.time()}
    write_atomic(_record_path(record.ref), json.dumps(data, indent=2).encode())


class BadRecord(ValueError):
    """Why a file in the records folder is not a pulled-model record."""


def records(skipped: list[tuple[Path, str]] | None = None) -> Iterator[Pulled]:
    """The records of pulled models. One that cannot be read, or holds what llava never writes,
    is skipped: it only describes files, it never holds them. ``skipped`` gets each such
    file, and why."""
    folder = _records_dir()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            yield _load(path)
        except BadRecord as why:
            if skipped is not None:
                skipped.append((path, str(why)))


def record_for(ref: str) -> Pulled | None:
    try:
        return _load(_record_path(ref))
    except BadRecord:
        return None


def forget(ref: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(ref).unlink()


_TIME_MAX = 253402300799  # 9999-12-31 UTC: no pull is later, and localtime() can show it
_SIZE_MAX = (1 << 63) - 1  # a file size (off_t)
_TEXT_FIELDS = ("ref", "name", "repo", "revision", "commit", "quant", "chat_format")


def _load(path: Path) -> Pulled:
    """The record in ``path``: a small regular file of JSON, named after its ref, with every
    field of the type and range llava writes (so ``list`` can show it and ``rm`` reason
    about it)."""
    raw = read_own_file(path, _RECORD_MAX)
    if raw is None:
        raise BadRecord(f"not a readable regular file of at most {_RECORD_MAX >> 20} MiB")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: [[[…]]]
        raise BadRecord("not JSON") from None
    if not isinstance(data, dict):
        raise BadRecord("not a JSON object")
    known = {f.name for f in fields(Pulled)}
    if not set(_TEXT_FIELDS) | {"model", "mmproj"} <= set(data) <= known:
        raise BadRecord("its fields are not those of a pulled-model record")
    for name in _TEXT_FIELDS:
        if not isinstance(data[name], str):
            raise BadRecord(f"{name} is not text")
        if unsafe := unsafe_character(data[name]):  # llava never writes one
            raise BadRecord(f"{name} holds {unsafe}")
    if _record_path(data["ref"]).name != path.name:
        raise BadRecord(f"it is not the record of {data['ref']} (whose file has another name)")
    if not is_repo_id(data["repo"]):
        raise BadRecord("repo is not a hub repo id (OWNER/NAME)")
    when = data.get("pulled_at", 0.0)
    if not _is_number(when) or not 0 <= when <= _TIME_MAX:
        raise BadRecord("pulled_at is not a time (seconds since 1970, before the year 10000)")
    files = [_stored(data[name], name) for name in ("model", "mmproj")]
    return Pulled(**{**data, "model": files[0], "mmproj": files[1], "pulled_at": float(when)})


def _stored(data: object, name: str) -> StoredFile:
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(StoredFile)}:
        raise BadRecord(f"{name} does not name a file, its digest, size and path")
    if not all(isinstance(data[key], str) for key in ("file", "digest", "path")):
        raise BadRecord(f"{name}: file, digest and path are not text")
    size = data["size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _SIZE_MAX:
        raise BadRecord(f"{name}.size is not a size in bytes (an integer from 0 to 2^63-1)")
    if not os.path.isabs(data["path"]) or "\0" in data["path"]:
        raise BadRecord(f"{name}.path is not an absolute path")
    for key in ("file", "digest", "path"):
        if unsafe := unsafe_character(data[key]):
            raise BadRecord(f"{name}.{key} holds {unsafe}")
    return StoredFile(**data)


def _is_number(value: object) -> bool:
    """A finite int or float; not a bool (which JSON keeps apart, and Python does not)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)

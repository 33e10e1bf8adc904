"""The prefix cache between runs: saved KV-cache states, so an image asked about again is
neither encoded nor prefilled again.

One file per entry, ``<key>.kv`` in ``<cache dir>/prefix``: a header (magic, the key the entry
was saved under, the metadata the engine needs to know what the state holds, the payload's
length, and a sha256 of all of it) and the payload, llama.cpp's own sequence state. The key is
a hash the engine computes from everything the state depends on (model and projector files,
prefix tokens, image pixels, build); a different input is a different file, never a wrong
answer, and an entry renamed or copied under another key is a miss, since it names its own.
Entries are written atomically. Reading one checks its header first (magic, key, lengths that
add up to the file's size), so a damaged entry costs a few bytes whatever its size; one that
is truncated, corrupt, or cannot be read (an I/O error, more than the memory left) is deleted
and treated as a miss. Anything at an entry's path that is not a regular file within the cap
(a FIFO, a device, a link, an empty folder) is a miss, and replaced by the next write. The
folder is an LRU capped at ``LLAVA_CACHE_SIZE`` (default 2 GiB): a hit refreshes an entry, a
write evicts the oldest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .config import Environment, environment
from .digests import is_sha256
from .errors import ConfigError
from .files import Bytes, fill, open_own_file, write_atomic

DEFAULT_CAP = 2 << 30
MAX_CAP = 1 << 50  # 1 PiB: far beyond any disk a cache lives on, and still exact as a float
MAGIC = b"LLAVAKV2"  # 2: the header names its key, and the sha256 covers the header too
_HEAD = struct.Struct("<8s32sI")  # magic, key, metadata length; then metadata, length, sha256
_LENGTH = struct.Struct("<Q")  # the payload's
_DIGEST = 32  # sha256
_META_MAX = 64 << 20  # an entry's metadata (its prefix's tokens and spans): far less than this
_SIZE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*(?:([KMGTP])(I)?)?B?\s*", re.I | re.A)
SIZE_FORMS = "bytes (1500) or a number with a unit (500MB, 2GiB, 1.5TB), from 0 to 1 PiB"


def parse_size(text: str, what: str = "LLAVA_CACHE_SIZE") -> int:
    """Byte counts: ``2GiB`` is 2·2³⁰, ``2GB`` is 2·10⁹, ``1500`` is bytes; 0 to 1 PiB.

    Exact arithmetic on bounded digits (no float, no int of unbounded length), so no
    spelling of a number can overflow; ``what`` names the setting in the error."""
    match = _SIZE.fullmatch(text)
    shown = repr(text[:40] + ("…" if len(text) > 40 else ""))
    if not match:
        raise ConfigError(f"{what}={shown} is not a size", f"write {SIZE_FORMS}")
    whole, fraction, prefix, binary = match.groups()
    whole = whole.lstrip("0")
    fraction = (fraction or "")[:18]  # beyond 10^-18, not a byte even at 1 PiB
    power = "KMGTP".index(prefix.upper()) + 1 if prefix else 0
    if len(whole) > 16:  # over 10^16: more than 1 PiB whatever the unit
        raise ConfigError(f"{what}={shown} is more than 1 PiB", f"write {SIZE_FORMS}")
    number = int(whole or "0") + Fraction(int(fraction or "0"), 10 ** len(fraction))
    size = number * (1024 if binary else 1000) ** power
    if size > MAX_CAP:
        raise ConfigError(f"{what}={shown} is more than 1 PiB", f"write {SIZE_FORMS}")
    return int(size)


@dataclass(frozen=True)
class CacheInfo:
    folder: Path
    entries: int
    size: int
    cap: int


class PrefixCache:
    def __init__(self, folder: Path, cap: int = DEFAULT_CAP) -> None:
        self.folder = folder
        self.cap = cap

    @classmethod
    def default(cls, settings: Environment | None = None) -> PrefixCache:
        """The cache in its folder, capped at ``LLAVA_CACHE_SIZE`` (checked here, where it
        is used); ``settings``: the command's, else the environment as it is now."""
        settings = settings or environment()
        cap = settings.cache_size
        return cls(
            settings.paths.cache_dir / "prefix",
            parse_size(cap, "LLAVA_CACHE_SIZE") if cap else DEFAULT_CAP,
        )

    def _path(self, key: str) -> Path:
        if not is_sha256(key):
            raise ValueError(f"bad cache key {key!r}")
        return self.folder / f"{key}.kv"

    def get(
        self, key: str, max_payload: int | None = None
    ) -> tuple[dict[str, Any], memoryview] | None:
        """The entry saved under ``key``, verified; ``None`` for a miss. The payload is a
        writable view into one buffer read from disk: no further copies.

        The fixed header is checked before anything else is read: the magic, the key, and
        lengths that add up to the file's size, with a payload of at most ``max_payload``
        bytes when the caller knows what the state can be. So a damaged entry costs a few
        bytes of reading, whatever its size. One that fails a check, or cannot be read (an
        I/O error, or more than the memory left), is removed, to be written anew; anything
        that is not a regular file within the cap is left for ``put`` to replace."""
        path = self._path(key)
        f = open_own_file(path)  # only a regular file: never a FIFO, a device, a folder, a link
        if f is None:
            return None
        with f:
            entry = self._read(f, key, max_payload)
        if isinstance(entry, _Damaged):
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if entry is None:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return entry

    def _read(
        self, f: io.FileIO, key: str, max_payload: int | None
    ) -> tuple[dict[str, Any], memoryview] | _Damaged | None:
        """The entry in ``f``; None when it is over the cap (not read); ``_DAMAGED`` when a
        check fails or it cannot be read."""
        try:
            size = os.fstat(f.fileno()).st_size
            if size > self.cap:
                return None
            head = bytearray(_HEAD.size + _LENGTH.size)
            if not fill(f, memoryview(head)[: _HEAD.size]):
                return _DAMAGED
            magic, saved_key, meta_len = _HEAD.unpack_from(head)
            if magic != MAGIC or saved_key != bytes.fromhex(key) or meta_len > _META_MAX:
                return _DAMAGED
            digest_at = _HEAD.size + meta_len + _LENGTH.size
            if digest_at + _DIGEST > size:
                return _DAMAGED
            f.seek(digest_at - _LENGTH.size)
            if not fill(f, memoryview(head)[_HEAD.size :]):
                return _DAMAGED
            (payload_len,) = _LENGTH.unpack_from(head, _HEAD.size)
            if digest_at + _DIGEST + payload_len != size:
                return _DAMAGED
            if max_payload is not None and payload_len > max_payload:
                return _DAMAGED
            f.seek(0)
            data = bytearray(size)  # the one buffer: its size now known to be the entry's
            if not fill(f, memoryview(data)):
                return _DAMAGED
        except (OSError, MemoryError):
            return _DAMAGED
        return _verified(data, digest_at, meta_len) or _DAMAGED

    def _usable(self, path: Path) -> bool:
        """Whether ``get`` would read the file at ``path``: a regular file within the cap."""
        try:
            info = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size <= self.cap

    def fits(self, size: int) -> bool:
        """Whether an entry of about this many bytes is worth saving at all."""
        return 0 < size <= self.cap

    def put(self, key: str, meta: dict[str, Any], payload: Bytes) -> None:
        """Write an entry (atomically); an entry already there is only marked as used."""
        path = self._path(key)
        if self._usable(path):
            with contextlib.suppress(OSError):
                os.utime(path)
            return
        view = memoryview(payload).cast("B")
        header = json.dumps(meta, separators=(",", ":")).encode()
        head = b"".join(
            (
                _HEAD.pack(MAGIC, bytes.fromhex(key), len(header)),
                header,
                _LENGTH.pack(len(view)),
            )
        )
        if not self.fits(len(head) + _DIGEST + len(view)):
            return  # before hashing what would not be kept
        digest = hashlib.sha256(head)
        digest.update(view)
        with contextlib.suppress(OSError):
            path.rmdir()  # an empty folder in the entry's place (a rename cannot replace it)
        write_atomic(path, head, digest.digest(), view)  # whatever else was there is replaced
        self.evict()

    def entries(self) -> list[Path]:
        """Entries, least recently used first (files another process removes are skipped)."""
        return [path for path, _ in sorted(self._stat("*.kv"), key=lambda e: e[1].st_mtime_ns)]

    def _stat(self, pattern: str) -> list[tuple[Path, os.stat_result]]:
        found = []
        for path in self.folder.glob(pattern) if self.folder.is_dir() else []:
            with contextlib.suppress(OSError):
                info = path.lstat()  # a link counts as itself, not its target
                if not stat.S_ISDIR(info.st_mode):  # a folder is none of ours to count or clear
                    found.append((path, info))
        return found

    def _leftovers(self, older_than: float) -> list[tuple[Path, os.stat_result]]:
        """Temporary files of writes that never finished (a killed process)."""
        now = time.time()
        return [(p, st) for p, st in self._stat(".*.tmp") if now - st.st_mtime > older_than]

    def evict(self) -> None:
        """Delete stale leftovers, then the least recently used entries until within the cap."""
        for path, _ in self._leftovers(older_than=3600):
            with contextlib.suppress(OSError):
                path.unlink()
        files = self._stat("*.kv")
        total = sum(st.st_size for _, st in files)
        for path, st in sorted(files, key=lambda e: e[1].st_mtime_ns):
            if total <= self.cap:
                break
            total -= st.st_size
            with contextlib.suppress(OSError):
                path.unlink()

    def info(self) -> CacheInfo:
        files = self._stat("*.kv") + self._leftovers(older_than=0)
        return CacheInfo(self.folder, len(files), sum(st.st_size for _, st in files), self.cap)

    def clear(self) -> CacheInfo:
        gone = self.info()
        for path, _ in self._stat("*.kv") + self._leftovers(older_than=0):
            with contextlib.suppress(OSError):
                path.unlink()
        return gone


class _Damaged:
    """An entry that failed a check, or could not be read."""


_DAMAGED = _Damaged()


def _verified(
    data: bytearray, digest_at: int, meta_len: int
) -> tuple[dict[str, Any], memoryview] | None:
    """The metadata and payload of an entry whose lengths were checked; None if its sha256
    (over the header and the payload) does not match, or its metadata is not an object."""
    payload = memoryview(data)[digest_at + _DIGEST :]
    check = hashlib.sha256(memoryview(data)[:digest_at])
    check.update(payload)
    if check.digest() != bytes(data[digest_at : digest_at + _DIGEST]):
        return None
    try:
        meta = json.loads(data[_HEAD.size : _HEAD.size + meta_len])
    except (ValueError, RecursionError):  # RecursionError: {"a": [[[…]]]}
        return None
    return (meta, payload) if isinstance(meta, dict) else None

"""The prefix cache between runs: saved KV-cache states, so an image asked about again is
neither encoded nor prefilled again.

One file per entry, ``<key>.kv`` in ``<cache dir>/prefix``: a header (magic, the metadata the
engine needs to know what the state holds, the payload's length and sha256) and the payload,
llama.cpp's own sequence state. The key is a hash the engine computes from everything the state
depends on (model and projector files, prefix tokens, image pixels, build); a different input
is a different file, never a wrong answer. Entries are written atomically; one that is
truncated, corrupt or unreadable is deleted and treated as a miss. The folder is an LRU capped
at ``LLAVA_CACHE_SIZE`` (default 2 GiB): a hit refreshes an entry, a write evicts the oldest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import paths
from .errors import ConfigError
from .store import Bytes, write_atomic

DEFAULT_CAP = 2 << 30
MAGIC = b"LLAVAKV1"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> int:
    """Byte counts: ``2GiB`` is 2·2³⁰, ``2GB`` is 2·10⁹, ``1500`` is bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}", "write bytes, or e.g. 500MB, 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    prefix = unit[:1] if unit[:1] in "KMGT" else ""
    scale = 1024 ** ("KMGT".index(prefix) + 1) if prefix and "I" in unit else _UNITS[prefix]
    return int(number * scale)


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
    def default(cls) -> PrefixCache:
        cap = os.environ.get("LLAVA_CACHE_SIZE")
        return cls(paths().cache_dir / "prefix", parse_size(cap) if cap else DEFAULT_CAP)

    def _path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"bad cache key {key!r}")
        return self.folder / f"{key}.kv"

    def get(self, key: str) -> tuple[dict[str, Any], memoryview] | None:
        """The entry, verified; ``None`` for a miss (a damaged entry is removed). The payload
        is a writable view into one buffer read from disk: no further copies."""
        path = self._path(key)
        try:
            with path.open("rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                if f.readinto(data) != len(data):
                    return None
        except OSError:
            return None
        entry = _parse(data)
        if entry is None:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return entry

    def fits(self, size: int) -> bool:
        """Whether an entry of about this many bytes is worth saving at all."""
        return 0 < size <= self.cap

    def put(self, key: str, meta: dict[str, Any], payload: Bytes) -> None:
        """Write an entry (atomically); an entry already there is only marked as used."""
        path = self._path(key)
        if path.is_file():
            with contextlib.suppress(OSError):
                os.utime(path)
            return
        view = memoryview(payload).cast("B")
        header = json.dumps(meta, separators=(",", ":")).encode()
        head = b"".join(
            (
                MAGIC,
                struct.pack("<I", len(header)),
                header,
                struct.pack("<Q", len(view)),
                hashlib.sha256(view).digest(),
            )
        )
        if not self.fits(len(head) + len(view)):
            return
        write_atomic(path, head, view)
        self.evict()

    def entries(self) -> list[Path]:
        """Entries, least recently used first (files another process removes are skipped)."""
        return [path for path, _ in sorted(self._stat("*.kv"), key=lambda e: e[1].st_mtime_ns)]

    def _stat(self, pattern: str) -> list[tuple[Path, os.stat_result]]:
        found = []
        for path in self.folder.glob(pattern) if self.folder.is_dir() else []:
            with contextlib.suppress(OSError):
                found.append((path, path.stat()))
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


def _parse(data: bytearray) -> tuple[dict[str, Any], memoryview] | None:
    try:
        if not data.startswith(MAGIC):
            return None
        offset = len(MAGIC)
        (meta_len,) = struct.unpack_from("<I", data, offset)
        offset += 4
        meta = json.loads(data[offset : offset + meta_len])
        offset += meta_len
        (size,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        digest = bytes(data[offset : offset + 32])
        payload = memoryview(data)[offset + 32 :]
        if len(payload) != size or hashlib.sha256(payload).digest() != digest:
            return None
        return (meta, payload) if isinstance(meta, dict) else None
    except (struct.error, ValueError):
        return None

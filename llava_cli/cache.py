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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import paths
from .errors import ConfigError
from .store import write_atomic

DEFAULT_CAP = 2 << 30
MAGIC = b"LLAVAKV1"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> int:
    """``2GiB``, ``500MB``, ``1e9``-style byte counts: ``2GiB`` is 2·2³⁰, ``2GB`` is 2·10⁹."""
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

    def get(self, key: str) -> tuple[dict[str, Any], bytes] | None:
        """The entry, verified; ``None`` for a miss (a damaged entry is removed)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
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

    def put(self, key: str, meta: dict[str, Any], payload: bytes) -> None:
        header = json.dumps(meta, separators=(",", ":")).encode()
        blob = b"".join(
            (
                MAGIC,
                struct.pack("<I", len(header)),
                header,
                struct.pack("<Q", len(payload)),
                hashlib.sha256(payload).digest(),
                payload,
            )
        )
        if len(blob) > self.cap:
            return  # bigger than the whole cache: not worth keeping
        write_atomic(self._path(key), blob)
        self.evict()

    def entries(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("*.kv"), key=lambda p: p.stat().st_mtime_ns)

    def evict(self) -> None:
        """Delete the least recently used entries until the folder fits the cap."""
        files = self.entries()
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.cap:
                break
            total -= path.stat().st_size
            with contextlib.suppress(OSError):
                path.unlink()

    def info(self) -> CacheInfo:
        files = self.entries()
        return CacheInfo(self.folder, len(files), sum(p.stat().st_size for p in files), self.cap)

    def clear(self) -> CacheInfo:
        gone = self.info()
        for path in self.entries():
            with contextlib.suppress(OSError):
                path.unlink()
        return gone


def _parse(data: bytes) -> tuple[dict[str, Any], bytes] | None:
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
        digest = data[offset : offset + 32]
        payload = data[offset + 32 :]
        if len(payload) != size or hashlib.sha256(payload).digest() != digest:
            return None
        return (meta, payload) if isinstance(meta, dict) else None
    except (struct.error, ValueError):
        return None

"""Prefix states kept between runs: the KV cache up to a prompt's last image, copied out of
llama.cpp, written to a ``StateStore`` beside the answer, and put back by a later run."""

from __future__ import annotations

import ctypes
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Protocol

import llama_cpp

from .native import LOGS
from .prefix_match import Span, span_ids_and_keys

PREFIX_FORMAT = 2  # of saved prefix states; a change makes every old entry a miss


class StateStore(Protocol):
    """Where prefix states are kept between runs (``llava_cli.cache.PrefixCache``). ``get(key)``
    returns only an entry that was saved under ``key``, verified."""

    def get(self, key: str) -> tuple[dict[str, Any], memoryview] | None: ...
    def put(self, key: str, meta: dict[str, Any], payload: memoryview) -> None: ...
    def fits(self, size: int) -> bool: ...


def prefix_key(salt: str, prefix: list[int | str]) -> str:
    """The key of a saved state of ``prefix`` (token ids and image keys); ``salt`` names what
    the state depends on beyond them (``Engine.identity``)."""
    text = json.dumps([PREFIX_FORMAT, salt, prefix], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def copy_state(ctx: Any, seq: int, store: StateStore) -> memoryview | None:
    """Sequence ``seq``'s KV state, copied out of llama.cpp once; None when ``store`` would
    not keep one that large, or memory is short."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq))
    if not store.fits(size):
        return None
    try:
        buf = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq))
    except MemoryError:  # the answer matters more than keeping its prefix
        return None
    if not written:
        return None
    return memoryview(buf).cast("B")[:written]


def load_state(ctx: Any, mem: Any, seq: int, payload: memoryview) -> bool:
    """Replace the cache with a saved state; False, the cache left empty, if llama.cpp refuses
    it (another build?)."""
    buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)  # no copy
    llama_cpp.llama_memory_clear(mem, True)
    if llama_cpp.llama_state_seq_set_data(ctx, buf, len(payload), seq):
        return True
    llama_cpp.llama_memory_clear(mem, True)
    LOGS.forget_last()  # its complaint was handled here: not to be blamed for a later error
    return False


def spans_meta(spans: Sequence[Span]) -> dict[str, Any]:
    """What is saved beside a state: the spans it holds."""
    return {"spans": [asdict(span) for span in spans]}


def spans_from_meta(meta: dict[str, Any]) -> tuple[list[Span], list[int | str]] | None:
    """The spans a saved state holds, and their token ids and image keys; None if its record
    is not one we wrote."""
    try:
        spans = [Span(**span) for span in meta["spans"]]
        return spans, span_ids_and_keys(spans)
    except (KeyError, TypeError):
        return None


class StateWriter:
    """Writes saved states in a thread beside the answer, one at a time."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, store: StateStore, key: str, meta: dict[str, Any], payload: memoryview) -> None:
        # One write at a time: a batch of new images never piles up copies.
        self.flush()
        self._thread = threading.Thread(target=_write, args=(store, key, meta, payload))
        self._thread.start()

    def flush(self) -> None:
        """Wait for a state still being written."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _write(store: StateStore, key: str, meta: dict[str, Any], payload: memoryview) -> None:
    try:
        store.put(key, meta, payload)
    except Exception as exc:  # a full disk costs the next run time, not this answer
        LOGS.note(f"prefix cache: could not save ({exc})")

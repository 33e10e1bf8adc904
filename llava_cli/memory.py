"""Memory a context will need, from the model's GGUF header, and memory the machine has.

Checked before llama.cpp allocates: a context too big for the machine is one error with the
numbers, not an allocation that the kernel's OOM killer ends (CPU buffers are overcommitted,
so ``malloc`` succeeds and the process dies later while filling them).
"""

from __future__ import annotations

import os
from pathlib import Path

from .gguf_file import GGUFInfo


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, *, lower_bound: bool = False) -> int:
    """The KV cache for ``n_ctx`` tokens with f16 keys and values (llama.cpp's default).

    Per-layer head counts (an array in hybrid models, 0 for layers without attention) are
    honoured. With ``lower_bound``, layers of a sliding-window model count only the window,
    since which layers attend globally is the architecture's business: the result is then
    never more than llama.cpp allocates."""
    arch = info.architecture
    layers = info.get_int(f"{arch}.block_count") or 0
    heads = info.get_int(f"{arch}.attention.head_count") or 1
    width = info.get_int(f"{arch}.embedding_length") or 0
    head_dim = info.get_int(f"{arch}.attention.key_length") or width // max(heads, 1)
    value_dim = info.get_int(f"{arch}.attention.value_length") or head_dim
    per_layer = info.metadata.get(f"{arch}.attention.head_count_kv")
    if isinstance(per_layer, list) and all(isinstance(n, int) for n in per_layer):
        kv_heads = sum(int(n) for n in per_layer)
    else:
        kv_heads = layers * (info.get_int(f"{arch}.attention.head_count_kv") or heads)
    cells = _windowed(info, n_ctx) if lower_bound else n_ctx
    return kv_heads * (head_dim + value_dim) * 2 * cells


def context_bytes_at_least(info: GGUFInfo, n_ctx: int, n_ubatch: int) -> int:
    """A lower bound of what llama.cpp allocates for a context: the KV cache and the f16
    attention mask of one micro-batch over every cell (its compute buffers hold more)."""
    mask = _windowed(info, n_ctx) * n_ubatch * 2
    return kv_cache_bytes(info, n_ctx, lower_bound=True) + mask


def _windowed(info: GGUFInfo, n_ctx: int) -> int:
    """The cells a sliding-window layer attends over: at most its window."""
    window = info.get_int(f"{info.architecture}.attention.sliding_window")
    return min(n_ctx, window) if window else n_ctx


def available_bytes() -> int | None:
    """Memory this process can still take: the least of the system's available memory, the
    cgroup's headroom (containers) and the address-space limit (``ulimit -v``); ``None``
    where none of them can be read."""
    found = [n for n in (_meminfo_available(), _cgroup_headroom(), _rlimit_headroom()) if n]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _rlimit_headroom() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - _address_space())


def _address_space() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0

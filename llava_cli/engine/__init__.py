"""The only importer of llama_cpp: model loading, a KV-owning Session, sampling, log routing.

``Engine`` (model.py) holds the weights; ``Session(engine, n_ctx)`` (session.py) owns a llama
context and its KV cache and evaluates only what is new. Beside it: prefix_match.py (where the
cache stops matching a prompt, pure Python), prefix_states.py (states kept between runs),
decoding.py (tokens and images into a context), sampling.py (picking tokens, under a grammar
from grammar.py), records.py (what a Session reports); native.py routes logs and Ctrl-C. We
drive libmtmd directly (``mtmd_tokenize``, ``mtmd_encode_chunk``,
``mtmd_helper_decode_image_chunk``) rather than llama-cpp-python's chat handlers, which clear
the KV cache and re-encode every image on every call.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for readers and mypy; at run time the names load on first use, below
    from ..options import SamplingParams
    from .model import Engine, LoadOptions
    from .native import backend_info, default_threads
    from .records import Bitmap, Completion, Counters, Timings, Usage
    from .session import Session

# Where each public name lives. Importing the package loads none of them, so the pure modules
# (prefix_match, records) can be imported, and tested, without loading llama.cpp.
_HOMES = {
    "SamplingParams": "..options",
    "Engine": ".model",
    "LoadOptions": ".model",
    "backend_info": ".native",
    "default_threads": ".native",
    "Bitmap": ".records",
    "Completion": ".records",
    "Counters": ".records",
    "Timings": ".records",
    "Usage": ".records",
    "Session": ".session",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Bitmap",
    "Completion",
    "Counters",
    "Engine",
    "LoadOptions",
    "SamplingParams",
    "Session",
    "Timings",
    "Usage",
    "backend_info",
    "default_threads",
]

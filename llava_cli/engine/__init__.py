"""The only importer of llama_cpp: model loading, a KV-owning Session, sampling, log routing.

``Engine`` (model.py) holds the weights; ``Session(engine, n_ctx)`` (session.py) owns a llama
context and its KV cache and evaluates only what is new. Beside it: prefix_match.py (where the
cache stops matching a prompt, pure Python), prefix_states.py (states kept between runs),
decoding.py (tokens and images into a context), sampling.py (picking tokens, under a grammar
from grammar.py), records.py (what a Session reports); native.py routes logs and Ctrl-C. We
drive libmtmd directly (``mtmd_tokenize``, ``mtmd_encode_chunk``,
``mtmd_helper_decode_image_chunk``) rather than llama-cpp-python's chat handlers, which clear
the KV cache and re-encode every image on every call.

Only llama-cpp-python's ctypes bindings (``llama_cpp.llama_cpp``, ``llama_cpp.mtmd_cpp``) are
used. Its package ``__init__`` also imports the high-level ``Llama`` class and with it numpy,
jinja2 and the stock chat handlers, about 0.15 s of every run for nothing; so, unless something
imported ``llama_cpp`` before us, the package is set up here without running it
(``_bindings_only``), and runs it the first time a name only it defines is asked for.
"""

from __future__ import annotations

import re
import sys
from importlib import import_module
from importlib.util import find_spec
from types import ModuleType
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


class _LlamaCppPackage(ModuleType):
    """``llama_cpp`` holding, as its ``__init__`` would, the names of ``llama_cpp.llama_cpp``
    (loaded when one is first asked for) and ``__version__``; any other name runs the real
    ``__init__`` in it, once, so ``llama_cpp.Llama`` still works."""

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        if "_llava_bindings" not in state:
            bindings = import_module("llama_cpp.llama_cpp")
            state["_llava_bindings"] = bindings
            for key, value in vars(bindings).items():  # `from .llama_cpp import *`
                if not key.startswith("_"):
                    state.setdefault(key, value)
        if name not in state and "_llava_whole" not in state:
            state["_llava_whole"] = True
            spec = self.__spec__
            assert spec is not None and spec.origin is not None
            with open(spec.origin, encoding="utf-8") as source:
                exec(compile(source.read(), spec.origin, "exec"), state)
            _route_logs_back()
        if name in state:
            return state[name]
        raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}")


def _route_logs_back() -> None:
    """The real ``__init__`` sets llama-cpp-python's own log callback (its ``_logger``), which
    prints every llama.cpp line: llava's goes back, where it was already installed."""
    native = sys.modules.get(f"{__name__}.native")
    if native is not None and native.LOGS.installed:
        native.LOGS.installed = False
        native.init(native.LOGS.verbose)


_VERSION_LINE = re.compile(r'^__version__ = "([^"\\]+)"$', re.MULTILINE)


def _bindings_only() -> None:
    """Put the ``llama_cpp`` package in ``sys.modules`` without running its ``__init__``
    (see the module's docstring); nothing is loaded yet. Left alone when llama_cpp is
    already imported, or cannot be."""
    if "llama_cpp" in sys.modules:
        return
    try:
        spec = find_spec("llama_cpp")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return
    package = _LlamaCppPackage("llama_cpp")
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "llama_cpp"
    package.__loader__ = spec.loader
    try:
        with open(spec.origin, encoding="utf-8") as source:
            found = _VERSION_LINE.search(source.read())
    except OSError:
        return
    if found is not None:
        package.__dict__["__version__"] = found.group(1)
    sys.modules["llama_cpp"] = package


_bindings_only()


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

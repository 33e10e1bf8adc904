"""Answers under a grammar: llama.cpp's grammar sampler, GBNF checked before llama.cpp parses it,
and JSON schemas turned into GBNF with llama-cpp-python's converter, bounded.

The grammar is applied first at every step, as llama.cpp's common sampler does when it
resamples: it sets every token it does not allow to -inf, end-of-generation included until the
grammar is complete; then the usual chain (penalties, top-k, top-p, min-p, temperature, the
draw) picks among what is left. Each answer gets a fresh grammar state; nothing of it lives in
the KV cache, so the prefix cache, ``/retry`` and repeated asks need nothing more.

Two things llama.cpp does not guard against are guarded here. A token the grammar rejects, once
accepted, throws a C++ exception that aborts the process; so sampling is done step by step
(apply the grammar, check that something is left, apply the chain, accept) instead of by
``llama_sampler_sample``. And the grammar sees a control token as its text (``<s>``), while the
answer shows nothing for it, and its UTF-8 decoder takes byte sequences (overlong forms,
surrogates) that the answer's decoder shows as U+FFFD: such tokens are masked under a grammar,
so that the text the grammar checked is the text the answer holds.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import math
import os
import re
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_cpp
import llama_cpp.llama_grammar as converter  # llama.cpp's json-schema-to-grammar.py, ported

from ..errors import BadInput, EngineError
from ..gbnf import GRAMMAR_MAX_BYTES, GrammarError, measure
from ..text import escaped
from .native import LOGS, init

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from .model import Engine

# Conversion steps (subschemas visited and rules made) for one schema: a few hundred for
# realistic ones. The converter is quadratic in an object's optional properties, and
# re-visits shared references; this bounds both.
SCHEMA_MAX_STEPS = 100_000
_ROOT = b"root"
_CAPTURED_MAX = 64 << 10
# A JSON string's character: the converter allows raw control characters (a newline inside a
# string), which JSON does not.
_JSON_CHAR = r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_NAME_MAX = 64  # rule names: the converter joins every property name on the path


class SchemaError(ValueError):
    """A JSON schema the converter cannot turn into a grammar, or one over the limits."""


# -- checking a grammar before llama.cpp parses it --------------------------------------------


def check_grammar(text: str, *, verbose: bool | None = None) -> None:
    """GrammarError (one line) unless llama.cpp will accept ``text`` as a grammar: over the
    limits (gbnf.py) it is never given to llama.cpp; within them, llama.cpp parses it without a
    model (unless it names tokens, which only a model's vocabulary can read). ``verbose``:
    show llama.cpp's lines (None: as the engine was set up)."""
    size = measure(text)
    if size.named_tokens:
        return
    init(LOGS.verbose if verbose is None else verbose)
    sampler = _init_grammar(None, text)
    llama_cpp.llama_sampler_free(sampler)


def _init_grammar(vocab: Any, text: str) -> Any:
    with _stderr_captured() as captured:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), _ROOT)
    if not sampler:
        raise GrammarError(f"llama.cpp refused it: {_refusal(captured)}")
    return sampler


def _refusal(captured: list[str]) -> str:
    """llama.cpp's reason: its parser's message (printed on stderr, which we caught), else
    the last error it logged."""
    text = captured[0] if captured else ""
    found = re.search(r"error parsing grammar: ([^\n]*)", text)
    reason = found.group(1) if found else LOGS.last_error()
    reason = " ".join(reason.split())
    return escaped(reason[:160] + ("…" if len(reason) > 160 else "")) or "no reason given"


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Catch what C code writes on file descriptor 2 meanwhile: llama.cpp's grammar parser
    prints its errors with fprintf(stderr), past the log callback (and then the whole
    grammar). Shown with --verbose, escaped; kept for the error message."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr at all: nothing to keep clean
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text = sink.read(_CAPTURED_MAX).decode("utf-8", "replace")
    captured.append(text)
    if text and LOGS.verbose:
        sys.stderr.write(escaped(text, keep="\n\t"))
        sys.stderr.flush()


# -- JSON schema to GBNF ------------------------------------------------------------------------


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar of ``schema`` (already checked for depth and repetition counts by
    ``structured``); SchemaError with the converter's reason if it cannot be converted."""
    bounded = _BoundedConverter()
    schema = _integer_ranges_as_enums(schema)
    try:
        bounded.index_refs(schema)
        bounded.visit(schema, "")
        return str(bounded.format_grammar())  # type: ignore[no-untyped-call]
    except SchemaError:
        raise
    except RecursionError:
        raise SchemaError("the converter recursed too deeply in it") from None
    except (AssertionError, LookupError, ValueError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split()) or "an unsupported construct"
        raise SchemaError(escaped(reason[:160] + ("…" if len(reason) > 160 else ""))) from None


# An integer between two bounds no wider apart than this is written out as an enum: the
# converter ignores minimum and maximum (a "rating from 1 to 5" came out as any integer),
# and a list of a few hundred numbers is a small grammar.
INTEGER_ENUM_SPAN = 1000


def _integer_ranges_as_enums(node: Any) -> Any:
    """``node`` with every bounded integer schema (``{"type": "integer", "minimum": 1,
    "maximum": 5}``) given the enum of its values, so that the grammar holds the answer to
    them; wider or half-open ranges are left to the check after generation."""
    if isinstance(node, list):
        return [_integer_ranges_as_enums(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _integer_ranges_as_enums(value) for key, value in node.items()}
    if out.get("type") != "integer" or "enum" in out or "const" in out:
        return out
    low, high = _integer_bounds(out)
    if low is None or high is None or not 0 <= high - low < INTEGER_ENUM_SPAN:
        return out
    step = out.get("multipleOf")
    if not (isinstance(step, int | float) and _is_number(step) and step > 0):
        step = 1
    values = [n for n in range(low, high + 1) if n % step == 0]
    return {**out, "enum": values} if values else out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integer a schema's minimum/maximum keywords allow."""
    lows: list[int] = []
    highs: list[int] = []
    for key, bounds, integer in (
        ("minimum", lows, math.ceil),
        ("exclusiveMinimum", lows, lambda v: math.floor(v) + 1),
        ("maximum", highs, math.floor),
        ("exclusiveMaximum", highs, lambda v: math.ceil(v) - 1),
    ):
        value = schema.get(key)
        if isinstance(value, int | float) and _is_number(value):
            bounds.append(int(integer(value)))
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _pointed_at(schema: dict[str, Any], ref: str) -> Any:
    """The subschema a local reference names (a JSON pointer in a URI fragment)."""
    from urllib.parse import unquote

    if not ref.startswith("#/"):
        raise SchemaError(f"the reference {json.dumps(ref)[:80]} is not inside the schema")
    target: Any = schema
    for part in ref[2:].split("/"):
        key = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and key in target:
            target = target[key]
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            target = target[int(key)]
        else:
            raise SchemaError(f"the reference {json.dumps(ref)[:80]} points nowhere")
    return target


def _short(name: str) -> str:
    if len(name) <= _NAME_MAX:
        return name
    import hashlib

    return f"{name[:40]}-{hashlib.sha256(name.encode('utf-8', 'replace')).hexdigest()[:12]}"


class _BoundedConverter(converter.SchemaConverter):
    """The converter, with a budget of steps and of grammar bytes, short rule names, one rule
    per reference (visited once, which also makes recursive references work whatever their
    names), and JSON's own string characters."""

    def __init__(self) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        self._steps = 0
        self._size = 0
        self._keys: dict[tuple[str, str], str] = {}
        self._next_suffix: dict[str, int] = {}
        self._ref_keys: dict[str, str] = {}

    def index_refs(self, schema: dict[str, Any]) -> None:
        """Every local reference (``#/$defs/x``) and what it points to, for ``_resolve_ref``
        (the converter's own ``resolve_refs`` misses references inside referenced schemas,
        and would fetch remote ones)."""
        todo: list[Any] = [schema]
        while todo:
            node = todo.pop()
            if isinstance(node, list):
                todo.extend(node)
            elif isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and ref not in self._refs:
                    self._refs[ref] = _pointed_at(schema, ref)
                todo.extend(node.values())

    def _spend(self) -> None:
        self._steps += 1
        if self._steps > SCHEMA_MAX_STEPS:
            raise SchemaError(f"it takes more than {SCHEMA_MAX_STEPS:,} steps to convert")

    def visit(self, schema: Any, name: str) -> Any:
        self._spend()
        if not isinstance(schema, dict):
            where = f"at {name!r}" if name else "at the top"
            raise SchemaError(f"{where} it holds {json.dumps(schema)[:40]} where a schema belongs")
        return super().visit(schema, _short(name))  # type: ignore[no-untyped-call]

    def _unique(self, base: str) -> str:
        if base not in self._rules:
            return base
        n = self._next_suffix.get(base, 0)
        while f"{base}{n}" in self._rules:
            n += 1
        self._next_suffix[base] = n + 1
        return f"{base}{n}"

    def _add_rule(self, name: str, rule: str) -> str:
        self._spend()
        if name == "char" and rule == converter.PRIMITIVE_RULES["char"].content:
            rule = _JSON_CHAR
        base = converter.INVALID_RULE_CHARS_RE.sub("-", _short(name))
        key = self._keys.get((base, rule))
        if key is None:
            key = base if self._rules.get(base) == rule else self._unique(base)
            self._keys[base, rule] = key
            self._rules[key] = rule
            self._size += len(key) + len(rule) + 6
            if self._size > GRAMMAR_MAX_BYTES:
                raise SchemaError(f"its grammar would be over {GRAMMAR_MAX_BYTES:,} bytes")
        return key

    def _resolve_ref(self, ref: str) -> str:
        key = self._ref_keys.get(ref)
        if key is None:
            last = ref.rsplit("/", maxsplit=1)[-1]
            base = converter.INVALID_RULE_CHARS_RE.sub("-", _short(f"ref-{last}"))
            key = self._ref_keys[ref] = self._unique(base)
            self._rules[key] = ""  # held while its body (which may refer back) is visited
            self._rules[key] = self.visit(self._refs[ref], last)
        return key


# -- sampling under a grammar -------------------------------------------------------------------

# After a lone lead byte, the second byte of a valid UTF-8 sequence lies in a narrower range
# than 80-BF: llama.cpp's grammar decoder accepts overlong forms, surrogates and code points
# past U+10FFFF, which the answer's text decoder then shows as U+FFFD.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


@dataclass(frozen=True)
class _VocabFacts:
    never: npt.NDArray[np.intp]  # tokens never allowed under a grammar
    first_byte: npt.NDArray[np.int16]  # each token's first byte (-1: none)


_FACTS: weakref.WeakKeyDictionary[Engine, _VocabFacts] = weakref.WeakKeyDictionary()


def _vocab_facts(engine: Engine) -> _VocabFacts:
    """What the grammar cannot judge about each token (computed once per model): control and
    unknown tokens that do not end generation (the grammar reads them as their text, the
    answer shows nothing), and tokens whose bytes are not UTF-8 (beyond a sequence cut at
    either end, which the grammar follows across tokens)."""
    import numpy as np

    facts = _FACTS.get(engine)
    if facts is not None:
        return facts
    special = llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN | llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    vocab = engine.vocab
    never: list[int] = []
    first = np.full(engine.n_vocab, -1, dtype=np.int16)
    for token in range(engine.n_vocab):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & special:
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                never.append(token)
            continue
        piece = engine.token_piece(token, special=True)
        if not piece:
            continue
        first[token] = piece[0]
        if not piece.isascii() and not _utf8_but_cut(piece):
            never.append(token)
    facts = _FACTS[engine] = _VocabFacts(np.array(never, dtype=np.intp), first)
    return facts


def _utf8_but_cut(piece: bytes) -> bool:
    """UTF-8, but for continuation bytes it may start with and a sequence it may end inside."""
    start = 0
    while start < len(piece) and 0x80 <= piece[start] < 0xC0 and start < 3:
        start += 1
    try:
        codecs.getincrementaldecoder("utf-8")().decode(piece[start:], final=False)
    except UnicodeDecodeError:
        return False
    return True


def _incomplete_tail(data: bytes) -> bytes:
    """The bytes of a UTF-8 sequence ``data`` ends inside (empty if it ends a character)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return b""
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data[-back:] if back < need else b""
    return b""


class TokenPicker:
    """Picks each token of one answer: with ``chain`` alone, or under ``grammar`` (GBNF) first.
    Owns the chain and frees it (and the grammar) in ``close``."""

    def __init__(
        self, engine: Engine, chain: Any, grammar: str | None, shown: frozenset[int]
    ) -> None:
        self.chain = chain
        self.grammar: Any = None
        if grammar is None:
            return

        try:
            check_grammar(grammar)
            self.grammar = _init_grammar(engine.vocab, grammar)
        except BaseException as exc:
            llama_cpp.llama_sampler_free(chain)
            if isinstance(exc, GrammarError):
                raise BadInput(f"the grammar cannot be used with this model: {exc}") from None
            raise
        try:
            self._prepare(engine, shown)
        except BaseException:  # numpy, the vocabulary scan: the samplers are freed all the same
            self.close()
            raise

    def _prepare(self, engine: Engine, shown: frozenset[int]) -> None:
        """The candidate array and the token masks a grammar-held answer samples with."""
        import numpy as np

        n = engine.n_vocab
        self.engine = engine
        self.ids = np.arange(n, dtype=np.int32)
        facts = _vocab_facts(engine)
        shown_ids = np.array(sorted(shown), dtype=np.intp)
        self.never = np.setdiff1d(facts.never, shown_ids)
        self.first_byte = facts.first_byte
        self.tail = b""  # the answer's bytes of a character not yet complete
        self.candidates = np.zeros(
            n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)]
        )  # llama_token_data's layout
        self.pointer = self.candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
        self.array = llama_cpp.llama_token_data_array(
            data=self.pointer, size=n, selected=-1, sorted=False
        )

    def sample(self, ctx: Any) -> int:
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, -1))
        import numpy as np

        n = len(self.ids)
        row = llama_cpp.llama_get_logits_ith(ctx, -1)
        if not row:
            raise EngineError("llama.cpp has no logits to sample from")
        cand = self.candidates
        cand["id"] = self.ids
        cand["logit"] = np.ctypeslib.as_array(row, shape=(n,))
        cand["p"] = 0.0
        logit = cand["logit"]
        logit[self.never] = -np.inf
        if len(self.tail) == 1 and self.tail[0] in _SECOND_BYTE:
            low, high = _SECOND_BYTE[self.tail[0]]
            first = self.first_byte
            logit[(first >= 0x80) & (first < 0xC0) & ((first < low) | (first > high))] = -np.inf
        arr = self.array
        arr.size, arr.selected, arr.sorted = n, -1, False  # the samplers only shrink the size
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        allowed = np.isfinite(logit)  # in token order: the grammar only masks
        if not allowed.any():
            raise EngineError(
                "the grammar allows no token this model has at this point of the answer",
                "check that the grammar's characters can be written with this model",
            )
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise EngineError("llama.cpp's sampler chose no token")
        token = int(arr.data[arr.selected].id)
        if not allowed[token]:  # would throw inside llama.cpp, and abort
            raise EngineError("llama.cpp's sampler chose a token the grammar does not allow")
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        self.tail = _incomplete_tail(self.tail + self.engine.token_piece(token, special=True))
        return token

    def close(self) -> None:
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

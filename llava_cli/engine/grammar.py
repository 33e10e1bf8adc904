"""Grammars for answers: GBNF checked before llama.cpp parses it, llama.cpp's grammar sampler
made from it, and JSON schemas turned into GBNF with llama-cpp-python's converter, bounded.
Sampling under a grammar is in sampling.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp
import llama_cpp.llama_grammar as converter  # llama.cpp's json-schema-to-grammar.py, ported

from ..gbnf import GRAMMAR_MAX_BYTES, GrammarError, measure
from ..text import escaped
from .native import LOGS, init

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
    sampler = init_grammar_sampler(None, text)
    llama_cpp.llama_sampler_free(sampler)


def init_grammar_sampler(vocab: Any, text: str) -> Any:
    """llama.cpp's grammar sampler for ``text`` (GrammarError with its reason if refused);
    ``vocab`` None parses the grammar only."""
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

"""Answers a program can trust: ``--json-schema`` and ``--grammar``.

A JSON schema (a file, or inline JSON text) becomes a GBNF grammar that llama.cpp's grammar
sampler holds the answer to; ``--grammar`` gives the GBNF itself. Everything is read, checked
and converted before any model is resolved, so a typo costs nothing. After generation the
answer is checked again: the grammar enforces a schema's shape, not every keyword (``minimum``,
``format``, ``uniqueItems`` …), so the answer must also parse and validate, or the command fails
saying why. llama.cpp itself is reached only through ``engine.grammar``.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .errors import EXIT_RUNTIME, BadInput, LlavaError, UsageError
from .gbnf import GRAMMAR_MAX_BYTES, GrammarError
from .text import escaped
from .units import exact_bytes, plural

SCHEMA_MAX_BYTES = 1 << 20  # a JSON schema file or inline text
# Objects and arrays inside one another in a schema (the converter recurses in Python).
SCHEMA_MAX_DEPTH = 64
# minItems, maxItems, minLength, maxLength and {m,n} in patterns: the converter spells n - m
# optional repetitions as parentheses nested n - m deep, and llama.cpp's parser refuses
# more than about 1,000 of those.
SCHEMA_MAX_REPEAT = 1000
_COUNTS = (("minItems", "maxItems"), ("minLength", "maxLength"))
_QUANTIFIER = re.compile(r"\{([^}]*)\}")
_MESSAGE_MAX = 200
_SIMPLER_HINT = "simplify the schema"
_JSON_HINT = "check the JSON (inline, quote it for the shell: --json-schema '{...}')"


class AnswerRejected(LlavaError):
    """The answer does not satisfy the constraint it was generated under."""

    exit_code = EXIT_RUNTIME


@dataclass(frozen=True)
class Constraint:
    grammar: str  # GBNF, for SamplingParams.grammar
    schema: dict[str, Any] | None  # the JSON schema, when there is one
    source: str  # where it came from, for messages ("schema.json", "the inline JSON schema")

    def check(self, answer: str, finish_reason: str, *, tokens: int | None = None) -> Any:
        """The answer, parsed: for a schema, JSON that validates (else AnswerRejected saying
        why); for a grammar, the parsed JSON if the answer is JSON, else None (the grammar
        itself is the check: the answer must only have ended on its own). ``tokens``: how
        many the answer took, for the message when it was cut."""
        what = "JSON" if self.schema is not None else "grammar's answer"
        if finish_reason == "length":
            where = f"at {plural(tokens, 'token')}" if tokens else "at the token limit"
            raise AnswerRejected(
                f"the answer was cut {where} before the {what} was complete",
                "allow more with --max-tokens (or a larger --ctx)",
            )
        if finish_reason != "stop":
            raise AnswerRejected(
                f"the answer ended ({finish_reason}) before it was complete", "ask again"
            )
        if self.schema is None:
            try:
                return json.loads(answer)
            except (ValueError, RecursionError):
                return None
        value = _parsed_answer(answer)
        error = _first_error(self.schema, value)
        if error is not None:
            raise AnswerRejected(
                f"the answer does not match {self.source}: {error}",
                "the grammar holds the answer to the schema's shape, not to every keyword "
                "(minimum, format, …): ask again, or with another --seed",
            )
        return value


def constraint_from(
    json_schema: str | None, grammar: str | None, *, verbose: bool = False
) -> Constraint | None:
    """The constraint the options ask for, read and checked (None without either option).

    ``json_schema``: a file's path, or inline JSON when it starts with ``{`` (or ``[``).
    ``grammar``: a GBNF file's path. A bad file is BadInput (exit 4); bad inline text, or both
    options at once, a UsageError (exit 2). ``verbose``: show what llama.cpp prints while
    checking."""
    if json_schema is not None and grammar is not None:
        raise UsageError(
            "--json-schema and --grammar cannot be used together",
            "a schema becomes a grammar: give one of them",
        )
    if grammar is not None:
        path = Path(grammar)
        text = _text_of(path, "grammar file", GRAMMAR_MAX_BYTES, BadInput)
        _checked_grammar(text, f"grammar file {path}", BadInput, verbose)
        return Constraint(grammar=text, schema=None, source=f"the grammar in {path}")
    if json_schema is None:
        return None
    fault: type[LlavaError]
    if not json_schema.strip():
        raise UsageError(
            "--json-schema needs a schema", "a file name, or the schema as JSON: '{\"type\": …}'"
        )
    # Text from the command line that is not UTF-8 (a narrow locale's argv) is read as UTF-8.
    json_schema = json_schema.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if json_schema.lstrip()[:1] in ("{", "[") or json_schema.strip() in ("true", "false"):
        what, fault, source = "the inline JSON schema", UsageError, "the inline JSON schema"
        if len(json_schema.encode("utf-8", "surrogatepass")) > SCHEMA_MAX_BYTES:
            raise UsageError(
                f"{what} is over the limit of {exact_bytes(SCHEMA_MAX_BYTES)}", _SIMPLER_HINT
            )
        text = json_schema
    else:
        path = Path(json_schema)
        what, fault, source = f"JSON schema file {path}", BadInput, f"the schema in {path}"
        text = _text_of(path, "JSON schema file", SCHEMA_MAX_BYTES, BadInput)
    schema = _schema_of(text, what, fault)
    from .engine.grammar import SchemaError, schema_to_gbnf

    try:
        gbnf = schema_to_gbnf(schema)
    except SchemaError as exc:
        raise fault(f"{what} cannot be turned into a grammar: {exc}", _SIMPLER_HINT) from None
    _checked_grammar(gbnf, what, fault, verbose)
    return Constraint(grammar=gbnf, schema=schema, source=source)


# -- reading -----------------------------------------------------------------------------------


def _text_of(path: Path, noun: str, limit: int, fault: type[LlavaError]) -> str:
    from .files import read_regular

    data = read_regular(path, limit, noun)
    what = f"{noun} {path}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fault(f"{what} is not UTF-8 text (byte {exc.start:,})", "save it as UTF-8") from None
    if not text.strip():
        raise fault(f"{what} is empty", "write the schema or grammar into it")
    return text


def _checked_grammar(text: str, what: str, fault: type[LlavaError], verbose: bool) -> None:
    from .engine.grammar import check_grammar

    try:
        check_grammar(text, verbose=verbose)
    except GrammarError as exc:
        made = (
            "cannot be used"
            if what.startswith("grammar")
            else "makes a grammar that cannot be used"
        )
        raise fault(
            f"{what} {made}: {exc}",
            "see llama.cpp's grammars/README.md for GBNF"
            if what.startswith("grammar")
            else "simplify the schema (--verbose shows llama.cpp's own words)",
        ) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _schema_of(text: str, what: str, fault: type[LlavaError]) -> dict[str, Any]:
    try:
        schema = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise fault(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            _JSON_HINT,
        ) from None
    except ValueError as exc:
        raise fault(f"{what} is not valid JSON: {exc}", _JSON_HINT) from None
    except RecursionError:
        raise fault(f"{what} nests deeper than {SCHEMA_MAX_DEPTH} levels", _SIMPLER_HINT) from None
    if not isinstance(schema, dict):
        raise fault(
            f"{what} must be a JSON object (a schema), not {_kind(schema)}",
            'a schema is an object: {"type": "object", "properties": {…}}',
        )
    _check_limits(schema, what, fault)
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = _path(exc.absolute_path)
        raise fault(
            f"{what} is not a valid JSON schema: {where}{_cut(exc.message)}",
            "see json-schema.org for what each keyword takes",
        ) from None
    except RecursionError:  # a pattern's regular expression, compiled to check it
        raise fault(f"{what} holds a pattern nested too deeply to read", _SIMPLER_HINT) from None
    return schema


def _check_limits(schema: dict[str, Any], what: str, fault: type[LlavaError]) -> None:
    """Depth, references and repetition counts, before the converter (which recurses, fetches
    remote references if asked, and spells every repetition out) or jsonschema sees it."""
    todo: deque[tuple[Any, int]] = deque([(schema, 1)])
    while todo:
        node, depth = todo.pop()
        if depth > SCHEMA_MAX_DEPTH:
            raise fault(f"{what} nests deeper than {SCHEMA_MAX_DEPTH} levels", _SIMPLER_HINT)
        if isinstance(node, list):
            todo.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
            raise fault(
                f"{what} has the reference {_cut(json.dumps(ref))}",
                "only references inside the schema (#/$defs/…) are followed",
            )
        for low_key, high_key in _COUNTS:
            low, high = node.get(low_key), node.get(high_key)
            for key, value in ((low_key, low), (high_key, high)):
                if _is_count(value) and value > SCHEMA_MAX_REPEAT:
                    raise fault(
                        f"{what} asks for {key} {value:,}, over the limit of "
                        f"{SCHEMA_MAX_REPEAT:,} that a grammar can spell out",
                        f"drop {key}: the answer is then checked, not constrained, for it",
                    )
            if _is_count(low) and _is_count(high) and low > high:
                raise fault(
                    f"{what} asks for {low_key} {low} but {high_key} {high}",
                    f"{low_key} must not be more than {high_key}",
                )
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for braces in _QUANTIFIER.findall(pattern):
                for number in re.findall(r"\d+", braces):
                    if len(number) > 6 or int(number) > SCHEMA_MAX_REPEAT:
                        times = f"{int(number):,}" if len(number) <= 6 else "over 999,999"
                        raise fault(
                            f"{what} has a pattern that repeats {times} times, over the limit "
                            f"of {SCHEMA_MAX_REPEAT:,}",
                            "repeat less in the pattern: the answer is checked against it after",
                        )
        todo.extend((value, depth + 1) for value in node.values())


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# -- checking the answer -----------------------------------------------------------------------


def _parsed_answer(answer: str) -> Any:
    try:
        return json.loads(answer, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise AnswerRejected(
            f"the answer is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            "ask again, or with another --seed",
        ) from None
    except ValueError as exc:
        raise AnswerRejected(
            f"the answer is not valid JSON: {exc}", "ask again, or with another --seed"
        ) from None
    except RecursionError:
        raise AnswerRejected(
            "the answer's JSON nests too deeply to read", "nest less deeply in the schema"
        ) from None


def _first_error(schema: dict[str, Any], value: Any) -> str | None:
    """The most relevant validation error, as ``at $.path: message``; None if it validates."""
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    try:
        error = best_match(validator_for(schema)(schema).iter_errors(value))
    except RecursionError:
        return "it nests too deeply to validate"
    if error is None:
        return None
    return f"at {escaped(error.json_path)}: {_cut(error.message)}"


def _path(parts: Any) -> str:
    keys = [str(part) for part in parts]
    return f"at {escaped('/'.join(keys))}: " if keys else ""


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return escaped(text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 1] + "…")


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true or false"}.get(
        type(value), "a number" if value is not None else "null"
    )

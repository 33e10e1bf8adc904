"""Constrained answers (--json-schema, --grammar): reading and bounding the constraint, the
grammar sampler on real llama.cpp with the synthetic models, and the check of the answer.

The hardest case is the random model: meaningless weights, held to a schema by the grammar
alone, must still give JSON that parses and validates, for every seed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llava_cli import gbnf, synthetic
from llava_cli.conversation import Conversation, LoadedModel
from llava_cli.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, EXIT_USAGE, LlavaError
from llava_cli.images import PreparedImage
from llava_cli.options import SamplingParams
from llava_cli.structured import (
    SCHEMA_MAX_BYTES,
    SCHEMA_MAX_REPEAT,
    AnswerRejected,
    Constraint,
    constraint_from,
)
from tests.conftest import llava, pic

# What a program would ask of a picture: every part bounded, so that the grammar itself ends
# the answer (enums, strings with maxLength, arrays with maxItems, no other properties).
RECORD = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue", "none"]},
        "caption": {"type": "string", "maxLength": 12},
        "count": {"type": "integer"},
        "sure": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "box": {
            "type": "object",
            "properties": {"w": {"type": "number"}, "h": {"type": "number"}},
            "required": ["w", "h"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"], "maxLength": 4},
    },
    "required": ["colour", "caption", "count", "sure", "tags", "box"],
    "additionalProperties": False,
}


def ask(conv: Conversation, image: PreparedImage | None, grammar: str, **kw: Any) -> str:
    sampling = SamplingParams(grammar=grammar, **kw)
    return "".join(conv.ask("Describe the picture.", [image] if image else [], sampling))


def refusal(json_schema: str | None, grammar: str | None = None) -> LlavaError:
    with pytest.raises(LlavaError) as caught:
        constraint_from(json_schema, grammar)
    return caught.value


# -- the random model under a schema ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_random_model_answers_valid_json_for_the_schema(
    random_model: LoadedModel, images: Path, temperature: float
) -> None:
    constraint = constraint_from(json.dumps(RECORD), None)
    assert constraint is not None and constraint.schema == RECORD
    conv = Conversation(random_model)
    seeds = range(12) if temperature else range(1)
    for seed in seeds:
        conv.reset()
        text = ask(conv, pic(images, "red"), constraint.grammar, seed=seed, max_tokens=400,
                   temperature=temperature)  # fmt: skip
        last = conv.last
        assert last.finish_reason == "stop", (seed, text)  # the grammar ended it
        value = json.loads(text)  # strict: no raw control characters in strings
        jsonschema.validate(value, RECORD)
        assert constraint.check(text, last.finish_reason) == value
        assert "\ufffd" not in text  # every byte token it chose made whole characters


RATED = {
    "type": "object",
    "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "even": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 9, "multipleOf": 2},
        "type": {"type": "integer", "minimum": -3, "maximum": -1},  # a property called "type"
    },
    "required": ["rating", "even", "type"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_bounded_integers_are_held_by_the_grammar(random_model: LoadedModel, images: Path) -> None:
    """The converter ignores minimum and maximum; a narrow range is written out as an enum,
    so that even the random model's answers validate (before, 12 of 12 seeds failed)."""
    constraint = constraint_from(json.dumps(RATED), None)
    assert constraint is not None and constraint.schema == RATED  # checked as written
    conv = Conversation(random_model)
    for seed in range(8):
        conv.reset()
        text = ask(conv, pic(images, "red"), constraint.grammar, seed=seed, max_tokens=200,
                   temperature=1.0)  # fmt: skip
        value = constraint.check(text, conv.last.finish_reason)
        jsonschema.validate(value, RATED)
        assert value["even"] in (2, 4, 6, 8) and value["type"] in (-3, -2, -1)


def test_only_narrow_integer_ranges_become_enums() -> None:
    from llava_cli.engine.grammar import _integer_ranges_as_enums

    wide = {"type": "integer", "minimum": 0, "maximum": 10**6}
    half_open = {"type": "integer", "minimum": 0}
    empty = {"type": "integer", "minimum": 5, "maximum": 4}
    assert _integer_ranges_as_enums([wide, half_open, empty]) == [wide, half_open, empty]
    number = {"type": "number", "minimum": 1, "maximum": 2}
    assert _integer_ranges_as_enums(number) == number
    floats = {"type": "integer", "minimum": 0.5, "maximum": 3.5}
    assert _integer_ranges_as_enums(floats)["enum"] == [1, 2, 3]


@pytest.mark.slow
def test_every_answer_gets_a_fresh_grammar(random_model: LoadedModel, images: Path) -> None:
    """A second turn, and the same prompt again (a retry): each answer starts the grammar over,
    whatever the cache kept from the one before."""
    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}
    constraint = constraint_from(json.dumps(schema), None)
    assert constraint is not None
    conv = Conversation(random_model)
    first = ask(conv, pic(images, "blue"), constraint.grammar, seed=3, max_tokens=40)
    second = ask(conv, None, constraint.grammar, seed=4, max_tokens=40)
    conv.reset()
    again = ask(conv, pic(images, "blue"), constraint.grammar, seed=3, max_tokens=40)
    for text in (first, second, again):
        jsonschema.validate(json.loads(text), schema)
    assert again == first
    # and without a grammar the same model answers as it always did
    conv.reset()
    plain = "".join(conv.ask("Describe the picture.", [pic(images, "blue")],
                             SamplingParams(seed=3, max_tokens=12)))  # fmt: skip
    with pytest.raises(ValueError):
        json.loads(plain)


@pytest.mark.slow
def test_an_answer_cut_at_max_tokens_is_rejected_with_the_count(
    random_model: LoadedModel, images: Path
) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 40}},
              "required": ["text"], "additionalProperties": False}  # fmt: skip
    constraint = constraint_from(json.dumps(schema), None)
    assert constraint is not None
    conv = Conversation(random_model)
    text = ask(conv, pic(images, "grey"), constraint.grammar, seed=1, max_tokens=6)
    last = conv.last
    assert last.finish_reason == "length"
    with pytest.raises(AnswerRejected) as caught:
        constraint.check(text, last.finish_reason, tokens=last.usage.completion_tokens)
    assert caught.value.exit_code == EXIT_RUNTIME
    assert caught.value.one_line() == (
        "the answer was cut at 6 tokens before the JSON was complete — "
        "allow more with --max-tokens (or a larger --ctx)"
    )


# -- the colour oracle: the image still decides the answer under a grammar ----------------------


@pytest.mark.slow
def test_colour_oracle_under_a_schema(oracle_model: LoadedModel, images: Path) -> None:
    # The oracle answers with SentencePiece words, which begin with a space: " red".
    schema = {"enum": [" red", " green", " blue", " none"]}
    constraint = constraint_from(json.dumps(schema), None)
    assert constraint is not None
    conv = Conversation(oracle_model)
    for colour, expected in [("red", "red"), ("green", "green"), ("blue", "blue"),
                             ("grey", "none")]:  # fmt: skip
        conv.reset()
        text = ask(conv, pic(images, colour), constraint.grammar, temperature=0, max_tokens=10)
        assert text == f'" {expected}"'
        assert constraint.check(text, conv.last.finish_reason) == f" {expected}"


def test_colour_oracle_under_a_gbnf_grammar(
    oracle_model: LoadedModel, images: Path, tmp_path: Path
) -> None:
    path = tmp_path / "colour.gbnf"
    path.write_text('# the answer words\nroot ::= " " ("red" | "green" | "blue")\n')
    constraint = constraint_from(None, str(path))
    assert constraint is not None and constraint.schema is None
    conv = Conversation(oracle_model)
    text = ask(conv, pic(images, "green"), constraint.grammar, temperature=0, max_tokens=10)
    assert text == "green"  # the answer's leading space is trimmed, as always
    assert constraint.check(text, conv.last.finish_reason) is None  # finished, not JSON
    # grey would be "none", which the grammar leaves out: it must pick a colour
    conv.reset()
    text = ask(conv, pic(images, "grey"), constraint.grammar, temperature=0, max_tokens=10)
    assert text in ("red", "green", "blue")
    assert conv.last.finish_reason == "stop"


# -- llama.cpp's failures become one line, and nothing on stderr -------------------------------


def test_a_grammar_token_the_model_lacks_is_bad_input_and_stderr_stays_clean(
    random_model: LoadedModel, images: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    conv = Conversation(random_model)
    with pytest.raises(LlavaError) as caught:
        ask(conv, pic(images, "red"), 'root ::= "a" <not-a-token>', max_tokens=5)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert caught.value.one_line() == (
        "the grammar cannot be used with this model: llama.cpp refused it: "
        "invalid token '<not-a-token>'"
    )
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # llama.cpp printed the grammar to fd 2: caught


def test_a_grammar_no_token_can_satisfy_fails_instead_of_aborting(
    random_model: LoadedModel, images: Path
) -> None:
    # llama.cpp rejects every piece that begins with a NUL byte: nothing is left to sample,
    # and accepting a token anyway would abort the process from C++.
    conv = Conversation(random_model)
    with pytest.raises(LlavaError) as caught:
        ask(conv, pic(images, "red"), r"root ::= [\x00]", max_tokens=5)
    assert caught.value.exit_code == EXIT_RUNTIME
    assert "the grammar allows no token this model has" in caught.value.one_line()


def test_checking_a_bad_grammar_prints_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.gbnf"
    path.write_text('root ::= "a" | ( "b"\n')
    assert refusal(None, str(path)).exit_code == EXIT_BAD_INPUT
    assert capfd.readouterr() == ("", "")


# -- reading the constraint ---------------------------------------------------------------------


def test_a_schema_file_and_inline_text_give_the_same_grammar(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("\ufeff" + json.dumps(RECORD, indent=2))  # a BOM is fine
    from_file, inline = constraint_from(str(path), None), constraint_from(json.dumps(RECORD), None)
    assert from_file is not None and inline is not None
    assert from_file.grammar == inline.grammar and from_file.schema == inline.schema
    assert from_file.source == f"the schema in {path}"
    assert inline.source == "the inline JSON schema"
    assert constraint_from(None, None) is None


@pytest.mark.slow
def test_references_inside_the_schema_are_followed(random_model: LoadedModel) -> None:
    schema = {
        "$defs": {
            "Kind": {"enum": ["cat", "dog"]},
            "Pet": {"type": "object", "properties": {"kind": {"$ref": "#/$defs/Kind"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "maxItems": 2}},
                    "required": ["kind", "kids"], "additionalProperties": False},
        },
        "$ref": "#/$defs/Pet",
    }  # fmt: skip
    constraint = constraint_from(json.dumps(schema), None)
    assert constraint is not None
    conv = Conversation(random_model)
    finished = 0
    for seed in range(6):
        conv.reset()
        text = ask(conv, None, constraint.grammar, seed=seed, max_tokens=600)
        if conv.last.finish_reason == "stop":  # a recursive schema may run long
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "the inline JSON schema is not valid JSON: Expecting property name "
         "enclosed in double quotes at line 1, column 2"),
        ('{"type": NaN}', "the inline JSON schema is not valid JSON: NaN is not JSON"),
        ("[1, 2]", "the inline JSON schema must be a JSON object (a schema), not an array"),
        ('{"type": "banana"}', "the inline JSON schema is not a valid JSON schema: at type: "
         "'banana' is not valid under any of the given schemas"),
        ('{"type": "array", "minItems": 5, "maxItems": 3}',
         "the inline JSON schema asks for minItems 5 but maxItems 3"),
        ('{"$ref": "https://example.com/s.json"}', 'the inline JSON schema has the reference '
         '"https://example.com/s.json"'),
        ('{"$ref": "#/$defs/nope"}', "the inline JSON schema cannot be turned into a grammar: "
         'the reference "#/$defs/nope" points nowhere'),
        ('{"properties": {"a": true}}', "the inline JSON schema cannot be turned into a "
         "grammar: at 'a' it holds true where a schema belongs"),
    ],
)  # fmt: skip
def test_bad_inline_schemas_are_usage_errors(text: str, message: str) -> None:
    error = refusal(text)
    assert error.exit_code == EXIT_USAGE
    assert error.message == message and error.hint  # what is wrong, and what to do


def test_bad_schema_and_grammar_files_are_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert refusal(str(missing)).one_line() == (
        f"JSON schema file {missing} does not exist — check the path"
    )
    cases = {
        "bad.json": (b'{"type": }', "is not valid JSON: Expecting value at line 1, column 10"),
        "latin1.json": (b'{"enum": ["\xe9"]}', "is not UTF-8 text (byte 11)"),
        "empty.json": (b"  \n", "is empty"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        error = refusal(str(path))
        assert error.exit_code == EXIT_BAD_INPUT
        assert error.message == f"JSON schema file {path} {reason}" and error.hint
    assert refusal(str(tmp_path)).exit_code == EXIT_BAD_INPUT  # a directory
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(SCHEMA_MAX_BYTES + 1)  # sparse: refused from its size, never read
    assert "over the limit of 1,048,576 bytes (1 MiB)" in refusal(str(huge)).one_line()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "FIFO" in refusal(str(fifo)).one_line()  # refused without blocking
    gbnf_file = tmp_path / "g.gbnf"
    gbnf_file.write_text('root ::= "a"\nroot ::= "b" "c\n')
    error = refusal(None, str(gbnf_file))
    assert error.exit_code == EXIT_BAD_INPUT
    assert error.message == (
        f"grammar file {gbnf_file} cannot be used: unexpected end of input at line 3, column 1"
    )
    assert error.hint == "see llama.cpp's grammars/README.md for GBNF"


def test_both_options_at_once_is_a_usage_error(tmp_path: Path) -> None:
    error = refusal("{}", str(tmp_path / "g.gbnf"))
    assert error.exit_code == EXIT_USAGE
    assert error.one_line().startswith("--json-schema and --grammar cannot be used together")


# -- the check after generation -----------------------------------------------------------------


def test_check_names_the_first_validation_error() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10}}}
    constraint = Constraint(grammar="", schema=schema, source="the schema in s.json")
    assert constraint.check('{"n": 12}', "stop") == {"n": 12}
    with pytest.raises(AnswerRejected) as caught:
        constraint.check('{"n": 3}', "stop")
    assert caught.value.one_line().startswith(
        "the answer does not match the schema in s.json: at $.n: 3 is less than the minimum "
        "of 10 — the grammar holds the answer to the schema's shape, not to every keyword"
    )
    with pytest.raises(AnswerRejected, match=r"not valid JSON: Expecting value at line 1"):
        constraint.check('{"n": ', "stop")
    with pytest.raises(AnswerRejected, match=r"^the answer was cut at the token limit"):
        constraint.check('{"n": ', "length")
    with pytest.raises(AnswerRejected, match=r"ended \(interrupted\)"):
        constraint.check('{"n": ', "interrupted")
    grammar_only = Constraint(grammar='root ::= "x"', schema=None, source="the grammar in g")
    assert grammar_only.check("[1, 2]", "stop") == [1, 2]
    assert grammar_only.check("x", "stop") is None
    with pytest.raises(AnswerRejected, match="cut at 1 token before the grammar's answer"):
        grammar_only.check("x", "length", tokens=1)


# -- GBNF as llama.cpp reads it -----------------------------------------------------------------


def test_llama_cpps_own_grammars_are_measured_not_refused() -> None:
    from llama_cpp import llama_grammar

    for name in ("JSON_GBNF", "JSON_ARR_GBNF", "ARITHMETIC_GBNF", "C_GBNF", "CHESS_GBNF",
                 "LIST_GBNF", "JAPANESE_GBNF"):  # fmt: skip
        size = gbnf.measure(getattr(llama_grammar, name))
        assert size.rules > 0 and size.elements > 0, name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('root = "a"', "expecting ::= at line 1, column 6"),
        ('root ::= "a" b', "rule 'b' is used but never defined at line 1, column 14"),
        ('root ::= "\\q"', "unknown escape at line 1, column 11"),
        ('root ::= [\\x4]', "expecting 2 hex digits at line 1, column 13"),
        ('root ::= ("a"', "expecting ')' at line 1, column 14"),
        ('root ::= *', "expecting something to repeat before */+/?/{ at line 1, column 10"),
        ('root ::= "a"{2001}', "a repetition of more than 2,000 at line 1, column 18"),
        ('x ::= "a"', "it has no 'root' rule (where every answer starts)"),
        # llama.cpp would count {5,3} down as an unsigned number, until memory runs out
        ('root ::= "a"{5,3}', "{5,3} has its maximum below its minimum at line 1, column 17"),
        # llama.cpp sees no left recursion through a rule that is empty only by repetition,
        # and expands the stacks until it throws std::bad_alloc (abort)
        ('root ::= ws root "x" | "y"\nws ::= " "*',
         "rule 'root' can begin with itself (left recursion), which llama.cpp cannot take"),
    ],
)  # fmt: skip
def test_gbnf_errors_say_where(text: str, message: str) -> None:
    with pytest.raises(gbnf.GrammarError) as caught:
        gbnf.measure(text)
    assert str(caught.value) == message


# -- hostile constraints: bounded time and memory, one line each --------------------------------

_HOSTILE = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from llava_cli.errors import LlavaError
from llava_cli.structured import constraint_from

def nested(n):
    s = {"type": "string"}
    for _ in range(n):
        s = {"type": "array", "items": s}
    return s

def chain(n, line):
    return "\n".join(line.format(i, i + 1) for i in range(n)) + f'\nr{n} ::= "z"\nroot ::= r0'

schemas = {
    "huge minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000_000},
    "huge maxLength": {"type": "string", "maxLength": 100_000_000},
    "huge pattern repetition": {"type": "string", "pattern": "^a{100000}$"},
    "deep nesting": nested(100),
    "deep JSON": "[" * 200_000,
    "self reference": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "references doubling": {"$defs": {**{f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"},
        {"$ref": f"#/$defs/d{i + 1}"}]} for i in range(40)}, "d40": {"type": "integer"}},
        "$ref": "#/$defs/d0"},
    "many optional properties": {"properties": {f"p{i}": {"type": "integer"} for i in range(900)}},
    "huge enum": {"enum": list(range(20_000))},
    "deep pattern": {"type": "string", "pattern": "(" * 5000 + "a" + ")" * 5000},
}
grammars = {
    "deep parentheses": "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000,
    "long reference chain": chain(40_000, 'r{0} ::= r{1}'),
    "deep stack": chain(8_000, 'r{0} ::= r{1} "x"'),
    "ambiguous": chain(30, 'r{0} ::= r{1} "x" | r{1} "y"'),
    "repetition expansion": "root ::= " + " ".join(['"abcdefgh"{2000}'] * 400),
    "hidden left recursion": 'root ::= ws root "x" | "y"\nws ::= [ ]*',
    "backwards repetition": 'root ::= "a"{5,3}',
}
out = {}
for name, value in [*schemas.items(), *grammars.items()]:
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        if name in grammars:
            path = f"{sys.argv[1]}/{len(out)}.gbnf"
            open(path, "w").write(text)
            constraint_from(None, path)
        else:
            constraint_from(text, None)
        out[name] = [0, "accepted"]
    except LlavaError as exc:
        out[name] = [exc.exit_code, exc.one_line()]
    print(json.dumps({name: out[name]}), flush=True)
"""


@pytest.mark.slow
def test_hostile_constraints_are_refused_within_bounds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _HOSTILE, str(tmp_path)],
        capture_output=True,
        timeout=300,  # a hang guard, not a timing assertion
        check=False,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    results: dict[str, list[Any]] = {}
    for line in proc.stdout.splitlines():
        results.update(json.loads(line))
    expected = {
        "huge minItems": "asks for minItems 100,000,000, over the limit of 1,000",
        "huge maxLength": "asks for maxLength 100,000,000, over the limit of 1,000",
        "huge pattern repetition": "has a pattern that repeats 100,000 times, over the limit",
        "deep nesting": "nests deeper than 64 levels",
        "deep JSON": "nests deeper than 64 levels",
        "self reference": "rule 'a' can begin with itself (left recursion)",
        "references doubling": "one step of it can go",
        "many optional properties": "takes more than 100,000 steps to convert",
        "huge enum": "one step of it can go 20,000 ways",
        "deep pattern": "holds a pattern nested too deeply to read",
        "deep parentheses": "parentheses nest deeper than 2,048",
        "long reference chain": "it chains 40,001 rule references, over the limit of 16,384",
        "deep stack": "it nests 8,000 rules inside one another, over the limit of 4,096",
        "ambiguous": "one step of it can go 1,073,741,824 ways",
        "repetition expansion": "it expands to more than 4,194,304 elements",
        "hidden left recursion": "rule 'root' can begin with itself (left recursion)",
        "backwards repetition": "{5,3} has its maximum below its minimum",
    }
    assert set(results) == set(expected)
    for name, fragment in expected.items():
        code, line = results[name]
        assert code in (EXIT_USAGE, EXIT_BAD_INPUT), (name, line)
        assert fragment in line, (name, line)
        assert "\n" not in line and len(line) < 400, (name, line)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1 << 20  # KiB: under 1 GiB


@pytest.mark.slow
def test_the_limits_are_what_llama_cpp_can_take() -> None:
    """A schema at every limit converts, and llama.cpp accepts its grammar."""
    at_limit = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": SCHEMA_MAX_REPEAT},
            "list": {"type": "array", "items": {"type": "integer"}, "maxItems": SCHEMA_MAX_REPEAT},
            "code": {"type": "string", "pattern": f"^[a-z]{{1,{SCHEMA_MAX_REPEAT}}}$"},
        },
    }
    constraint = constraint_from(json.dumps(at_limit), None)
    assert constraint is not None
    size = gbnf.measure(constraint.grammar)
    assert size.nesting <= gbnf.GRAMMAR_MAX_NESTING and size.stack <= gbnf.GRAMMAR_MAX_STACK


# -- through the CLI ----------------------------------------------------------------------------


def model_args(pair: synthetic.ModelPair) -> list[str]:
    return ["--model", str(pair.model), "--mmproj", str(pair.mmproj)]


@pytest.mark.slow
def test_cli_prints_only_an_answer_that_validates(
    oracle: synthetic.ModelPair, random_pair: synthetic.ModelPair, images: Path
) -> None:
    colours = '{"enum": [" red", " green", " blue", " none"]}'
    result = llava("ask", images / "blue.png", "Colour?", *model_args(oracle),
                   "--json-schema", colours)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, b'" blue"\n', b"")
    with_json = [*model_args(oracle), "--json", "--json-schema", colours]
    record = json.loads(llava("ask", images / "blue.png", "Colour?", *with_json).stdout)
    assert (record["answer"], record["parsed"]) == ('" blue"', " blue")
    for seed in ("1", "2"):
        result = llava("ask", images / "red.png", "Describe.", *model_args(random_pair),
                       "--json-schema", json.dumps(RECORD), "--seed", seed,
                       "--temperature", "1", "--max-tokens", "400")  # fmt: skip
        assert (result.returncode, result.stderr) == (0, b""), result.stderr
        jsonschema.validate(json.loads(result.stdout), RECORD)


@pytest.mark.slow
def test_cli_fails_with_one_line_and_no_answer(
    random_pair: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    long_text = (
        '{"type": "object", "properties": {"a": {"type": "string", "minLength": 50}}, '
        '"required": ["a"]}'
    )
    result = llava("ask", images / "red.png", "x", *model_args(random_pair),
                   "--json-schema", long_text, "--max-tokens", "8")  # fmt: skip
    assert (result.returncode, result.stdout) == (EXIT_RUNTIME, b"")
    assert result.stderr.decode() == (
        "Error: the answer was cut at 8 tokens before the JSON was complete — "
        "allow more with --max-tokens (or a larger --ctx)\n"
    )
    big = '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 100000}}, ' \
          '"required": ["n"]}'  # fmt: skip
    result = llava("ask", images / "red.png", "x", *model_args(random_pair), "--seed", "1",
                   "--json-schema", big)  # fmt: skip
    assert (result.returncode, result.stdout) == (EXIT_RUNTIME, b"")
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the answer does not match the inline")
    assert "is less than the minimum of 100000" in lines[0]


@pytest.mark.slow
def test_cli_grammar_file(random_pair: synthetic.ModelPair, images: Path, tmp_path: Path) -> None:
    path = tmp_path / "yes-no.gbnf"
    path.write_text('root ::= "yes" | "no"\n')
    result = llava("ask", images / "red.png", "Red?", *model_args(random_pair), "--grammar", path)
    assert result.returncode == 0 and result.stderr == b""
    assert result.stdout in (b"yes\n", b"no\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--json-schema", "{}", "--grammar", "g.gbnf"], EXIT_USAGE,
         "--json-schema and --grammar cannot be used together"),
        (["--json-schema", "missing.json"], EXIT_BAD_INPUT,
         "JSON schema file missing.json does not exist"),
        (["--grammar", "missing.gbnf"], EXIT_BAD_INPUT, "grammar file missing.gbnf does not exist"),
        (["--json-schema", '{"type": "array", "minItems": 100000000}'], EXIT_USAGE,
         "asks for minItems 100,000,000, over the limit of 1,000"),
        (["--json-schema", "{oops"], EXIT_USAGE, "the inline JSON schema is not valid JSON"),
    ],
)  # fmt: skip
def test_cli_reads_the_constraint_before_any_model(
    images: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    # The model does not exist either: the constraint is refused first.
    result = llava("ask", images / "red.png", "x", "--model", tmp_path / "none.gguf", *args,
                   cwd=tmp_path)  # fmt: skip
    assert (result.returncode, result.stdout) == (code, b"")
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


@pytest.mark.slow
def test_a_schema_answer_stays_valid_json_under_a_narrow_locale(
    random_pair: synthetic.ModelPair, images: Path
) -> None:
    """An ASCII stdout cannot carry "é": the answer is written with JSON escapes, not "?"."""
    schema = '{"enum": ["é", "ü"]}'
    for env in ({"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "PYTHONUTF8": "0"}):
        result = llava("ask", images / "red.png", "x", *model_args(random_pair),
                       "--json-schema", schema, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) in ("é", "ü") and result.stdout.isascii()

"""The Session's pure logic, without a model: how a prompt is tokenized into items, where the
cache stops matching it, and which of an answer's generated tokens a follow-up keeps.

The vocabulary here is a toy (one token per character, plus a few merged tokens the tokenizer
never produces, as a model's sampler can), so each case can be written out exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from llava_cli.engine.prefix_match import (
    EvaluatedPrompt,
    PromptItem,
    Span,
    first_difference,
    item_ids_and_keys,
    items_held_by,
    join_token_runs,
    prefix_through_last_image,
    reuse_answer_tokens,
    span_ids_and_keys,
    tokenize_prompt,
)
from llava_cli.errors import EngineError
from llava_cli.templates import MEDIA_MARKER

BOS = 1
MERGED = {1000: b"lo", 1001: b" wor", 1002: b"\xc3"}  # the last: half of "é"
SHOWN = 1003  # a special token that writes nothing unless shown


@dataclass(frozen=True)
class Picture:
    key: str
    width: int = 1
    height: int = 1
    rgb: bytes = b"\0\0\0"


class CharVocabulary:
    """One token per character (its code point); BOS is token 1."""

    bos_token = BOS

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [BOS] * add_special + [ord(c) for c in text]

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        if token == SHOWN:
            return b"<think>" if special else b""
        return MERGED.get(token) or chr(token).encode()


VOCAB = CharVocabulary()
RED, BLUE = Picture("red"), Picture("blue")


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def spans_of(*parts: tuple[str, list[int] | str]) -> list[Span]:
    """Cache spans laid end to end: ("text"|"gen", tokens) or ("image", key), 3 cells each."""
    spans, pos = [], 0
    for kind, what in parts:
        if isinstance(what, str):
            spans.append(Span("image", pos, pos + 3, key=what, image_cells=3))
            pos += 3
        else:
            spans.append(Span(kind, pos, pos + len(what), list(what)))
            pos += len(what)
    return spans


# -- tokenize_prompt ------------------------------------------------------------------------------


def test_a_prompt_is_split_at_its_image_markers() -> None:
    items = tokenize_prompt(f"ab{MEDIA_MARKER}cd", [RED], VOCAB, add_special=True)
    assert items == [[BOS, *ids("ab")], RED, ids("cd")]


def test_bos_stands_alone_before_a_leading_image() -> None:
    items = tokenize_prompt(f"{MEDIA_MARKER}{MEDIA_MARKER}x", [RED, BLUE], VOCAB, add_special=True)
    assert items == [[BOS], RED, BLUE, ids("x")]
    assert tokenize_prompt(f"{MEDIA_MARKER}x", [RED], VOCAB, add_special=False) == [RED, ids("x")]


def test_markers_and_images_must_agree_and_the_prompt_end_in_text() -> None:
    with pytest.raises(EngineError, match="2 image markers for 1 images"):
        tokenize_prompt(f"{MEDIA_MARKER}{MEDIA_MARKER}x", [RED], VOCAB, add_special=False)
    with pytest.raises(EngineError, match="must end in text"):
        tokenize_prompt(f"x{MEDIA_MARKER}", [RED], VOCAB, add_special=False)


# -- first_difference -----------------------------------------------------------------------------


def test_an_empty_cache_evaluates_everything() -> None:
    items: list[PromptItem] = [ids("ab"), RED, ids("c")]
    assert first_difference([], items) == (0, 0, items)


def test_the_same_prompt_keeps_everything() -> None:
    cache = spans_of(("text", ids("ab")), ("image", "red"), ("text", ids("c")))
    assert first_difference(cache, [ids("ab"), RED, ids("c")]) == (3, 0, [])


def test_a_changed_token_cuts_the_cache_inside_its_span() -> None:
    cache = spans_of(("text", ids("abcd")), ("image", "red"), ("text", ids("e")))
    assert first_difference(cache, [ids("abXd"), RED, ids("e")]) == (
        0,
        2,
        [ids("Xd"), RED, ids("e")],
    )


def test_another_image_cuts_the_cache_before_it() -> None:
    cache = spans_of(("text", ids("ab")), ("image", "red"), ("text", ids("c")))
    assert first_difference(cache, [ids("ab"), BLUE, ids("c")]) == (1, 0, [BLUE, ids("c")])


def test_a_run_that_stops_short_of_the_cache_cuts_it_there() -> None:
    # The prompt's text ends where the cache's goes on: the cache must not keep the extra tokens.
    cache = spans_of(("text", ids("abc")), ("gen", ids("de")))
    assert first_difference(cache, [ids("ab")]) == (0, 2, [])
    assert first_difference(cache, [ids("abc")]) == (1, 0, [])
    # ... and where an image follows in the prompt but text in the cache, before the image.
    assert first_difference(cache, [ids("abc"), RED, ids("f")]) == (1, 0, [RED, ids("f")])


def test_a_run_matches_across_text_and_generated_spans() -> None:
    cache = spans_of(("text", ids("ab")), ("gen", ids("cd")), ("text", ids("ef")))
    assert first_difference(cache, [ids("abcdeX")]) == (2, 1, [ids("X")])


def test_text_where_the_cache_holds_an_image_is_a_difference() -> None:
    cache = spans_of(("text", ids("ab")), ("image", "red"), ("text", ids("c")))
    assert first_difference(cache, [ids("abc")]) == (1, 0, [ids("c")])


def _random_cache(rng: random.Random) -> list[Span]:
    parts: list[tuple[str, list[int] | str]] = []
    for _ in range(rng.randrange(5)):
        kind = rng.choice(["text", "gen", "image"])
        if parts and kind == parts[-1][0] != "image":
            continue  # a session merges neighbouring spans of one kind
        what = rng.choice(["red", "blue"]) if kind == "image" else ids(rng.choice(["a", "ab", "b"]))
        parts.append((kind, what))
    return spans_of(*parts)


def _random_prompt(rng: random.Random) -> list[PromptItem]:
    parts: list[PromptItem] = [
        rng.choice([RED, BLUE]) if rng.random() < 0.3 else ids(rng.choice(["a", "ab", "b"]))
        for _ in range(rng.randrange(1, 6))
    ]
    return join_token_runs(parts)


def test_the_cache_keeps_the_longest_common_prefix_and_evaluates_the_rest() -> None:
    """Over many random caches and prompts: what is kept is a prefix of both, the longest one,
    and kept plus rest is exactly the prompt."""
    rng = random.Random(12)
    for _ in range(3000):
        cache, items = _random_cache(rng), _random_prompt(rng)
        held, wanted = span_ids_and_keys(cache), item_ids_and_keys(items)
        keep_spans, keep_tokens, rest = first_difference(cache, items)
        kept = span_ids_and_keys(cache[:keep_spans])
        if keep_tokens:
            kept += cache[keep_spans].tokens[:keep_tokens]
        common = 0
        while common < min(len(held), len(wanted)) and held[common] == wanted[common]:
            common += 1
        assert kept == wanted[:common], (cache, items)
        assert kept + item_ids_and_keys(rest) == wanted, (cache, items)


# -- helpers over items and spans -----------------------------------------------------------------


def test_items_and_spans_list_token_ids_and_image_keys() -> None:
    assert item_ids_and_keys([ids("a"), RED, ids("b")]) == [97, "red", 98]
    cache = spans_of(("text", ids("a")), ("image", "red"), ("gen", ids("b")))
    assert span_ids_and_keys(cache) == [97, "red", 98]


def test_neighbouring_token_runs_are_joined_and_the_held_images_put_back() -> None:
    assert join_token_runs([ids("a"), ids("b"), RED, ids("c")]) == [ids("ab"), RED, ids("c")]
    cache = spans_of(("text", ids("a")), ("gen", ids("b")), ("image", "red"), ("text", ids("c")))
    assert items_held_by(cache, [RED]) == [ids("ab"), RED, ids("c")]


def test_the_saved_prefix_runs_through_the_last_image() -> None:
    assert prefix_through_last_image([ids("a"), RED, ids("b"), BLUE, ids("c")]) == [
        97, "red", 98, "blue",
    ]  # fmt: skip
    assert prefix_through_last_image([ids("abc")]) is None


# -- reuse_answer_tokens --------------------------------------------------------------------------

QUESTION = f"Q{MEDIA_MARKER}?"
ASKED = EvaluatedPrompt(QUESTION, ["red"], add_special=True)
# "Hello world" as a sampler might have drawn it: "lo" and " wor" as merged tokens.
ANSWER = [*ids("Hel"), 1000, 1001, *ids("ld")]
CACHE = spans_of(("text", [BOS, *ids("Q")]), ("image", "red"), ("text", ids("?")), ("gen", ANSWER))


def reuse(prompt: str, images: list[Picture], last: EvaluatedPrompt | None = ASKED) -> object:
    return reuse_answer_tokens(last, CACHE, prompt, images, VOCAB, frozenset(), add_special=True)


def test_a_follow_up_keeps_the_answer_as_it_was_generated() -> None:
    items = reuse(QUESTION + "Hello world\nQ2", [RED])
    assert items == [[BOS, *ids("Q")], RED, [*ids("?"), *ANSWER, *ids("\nQ2")]]
    # tokenized afresh, the answer would be other tokens: the cache would be cut inside it
    fresh = tokenize_prompt(QUESTION + "Hello world\nQ2", [RED], VOCAB, add_special=True)
    assert fresh != items


def test_a_follow_up_with_a_new_image_tokenizes_only_its_own_part() -> None:
    items = reuse(QUESTION + f"Hello world\n{MEDIA_MARKER}Q2", [RED, BLUE])
    assert items == [[BOS, *ids("Q")], RED, [*ids("?"), *ANSWER, *ids("\n")], BLUE, ids("Q2")]


def test_the_same_prompt_again_is_what_the_cache_holds_without_its_answer() -> None:
    assert reuse(QUESTION, [RED]) == [[BOS, *ids("Q")], RED, ids("?")]


def test_a_prompt_that_does_not_go_on_from_the_last_is_tokenized_afresh() -> None:
    assert reuse("Other" + MEDIA_MARKER + "?Hello world\nQ2", [RED]) is None
    assert reuse(QUESTION + "Hello world\nQ2", [BLUE]) is None  # another image
    assert reuse(QUESTION + "Hello world\nQ2", [RED], last=None) is None
    other_special = EvaluatedPrompt(QUESTION, ["red"], add_special=False)
    assert reuse(QUESTION + "Hello world\nQ2", [RED], last=other_special) is None


def test_an_edited_answer_keeps_only_the_tokens_still_spelled() -> None:
    items = reuse(QUESTION + "Help!", [RED])
    assert items == [[BOS, *ids("Q")], RED, [*ids("?"), *ids("Hel"), *ids("p!")]]
    assert reuse(QUESTION + "Bye", [RED]) is None  # nothing of the answer is left


def test_an_answer_that_ends_inside_a_character_is_tokenized_afresh() -> None:
    cache = spans_of(("text", ids("Q")), ("gen", [1002]))  # the first byte of "é"
    last = EvaluatedPrompt("Q", [], add_special=False)
    items = reuse_answer_tokens(last, cache, "Qé!", [], VOCAB, frozenset(), add_special=False)
    assert items is None


def test_shown_special_tokens_spell_their_text() -> None:
    cache = spans_of(("text", ids("Q")), ("gen", [SHOWN, *ids("hm")]))
    last = EvaluatedPrompt("Q", [], add_special=False)
    prompt = "Q<think>hm\nQ2"
    shown = reuse_answer_tokens(
        last, cache, prompt, [], VOCAB, frozenset({SHOWN}), add_special=False
    )
    assert shown == [[*ids("Q"), SHOWN, *ids("hm"), *ids("\nQ2")]]
    # not shown, it writes nothing and so cannot be matched against the text
    assert (
        reuse_answer_tokens(last, cache, prompt, [], VOCAB, frozenset(), add_special=False) is None
    )


# -- the record kept beside a saved state ---------------------------------------------------------


def test_a_saved_states_spans_round_trip_and_a_foreign_record_is_none() -> None:
    from llava_cli.engine.prefix_states import spans_from_meta, spans_meta

    assert spans_from_meta(spans_meta(CACHE)) == (CACHE, span_ids_and_keys(CACHE))
    no_tokens = {"kind": "text", "pos_start": 0, "pos_end": 1, "tokens": None}
    for meta in ({}, {"spans": 3}, {"spans": [{"kind": "text", "x": 1}]}, {"spans": [no_tokens]}):
        assert spans_from_meta(meta) is None, meta

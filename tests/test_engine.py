"""The engine on real llama.cpp with tiny synthetic models: sampling, streaming, KV reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.conversation import Conversation, LoadedModel, open_model
from llava_cli.engine import Session
from llava_cli.errors import ContextOverflow
from llava_cli.images import PreparedImage
from llava_cli.options import RuntimeOptions, SamplingParams
from llava_cli.templates import Message
from llava_cli.textstream import TextStream
from tests.conftest import pic


def answer(conv: Conversation, prompt: str, imgs: list[PreparedImage], **kw: object) -> str:
    return "".join(conv.ask(prompt, imgs, SamplingParams(**kw)))  # type: ignore[arg-type]


@pytest.mark.slow
def test_random_model_is_deterministic_with_a_seed(random_model: LoadedModel, images: Path) -> None:
    conv = Conversation(random_model)
    red = pic(images, "red")
    runs = []
    for seed in (7, 7, 8):
        conv.reset()
        runs.append(
            answer(conv, "Say something.", [red], temperature=0.9, seed=seed, max_tokens=24)
        )
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    greedy = set()
    for seed in (1, 2):
        conv.reset()
        greedy.add(answer(conv, "Say something.", [red], temperature=0.0, seed=seed, max_tokens=24))
    assert len(greedy) == 1


@pytest.mark.slow
def test_streamed_text_equals_final_text(random_model: LoadedModel, images: Path) -> None:
    conv = Conversation(random_model)
    chunks = list(
        conv.ask("Describe.", [pic(images, "blue")], SamplingParams(seed=3, max_tokens=40))
    )
    assert len(chunks) > 1
    assert "".join(chunks) == conv.last.text
    assert conv.last.usage.completion_tokens == 40


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 5, 33])
def test_max_tokens_is_exact(random_model: LoadedModel, images: Path, n: int) -> None:
    conv = Conversation(random_model)
    answer(conv, "Go on.", [pic(images, "grey")], seed=11, max_tokens=n, temperature=1.0)
    assert conv.last.usage.completion_tokens == n
    assert conv.last.finish_reason == "length"


def test_byte_tokens_assemble_into_characters(random_model: LoadedModel) -> None:
    engine = random_model.engine
    vocab = synthetic.build_vocab(extra_control=("<|im_start|>", "<|im_end|>"))
    tokens = [vocab.index(f"<0x{b:02X}>") for b in "日é".encode()]
    stream = TextStream()
    text = "".join(stream.feed(engine.token_piece(t)) for t in tokens) + stream.finish()
    assert text == "日é"


@pytest.mark.slow
def test_colour_oracle_sees_the_image(oracle_model: LoadedModel, images: Path) -> None:
    conv = Conversation(oracle_model)
    for colour, expected in [
        ("red", "red"),
        ("green", "green"),
        ("blue", "blue"),
        ("grey", "none"),
    ]:
        conv.reset()
        assert (
            answer(conv, "What colour is this?", [pic(images, colour)], temperature=0) == expected
        )
        assert conv.last.finish_reason == "stop"
        assert conv.last.usage.image_tokens == 16


def test_follow_up_evaluates_only_the_new_turn(oracle_model: LoadedModel, images: Path) -> None:
    conv = Conversation(oracle_model)
    session = oracle_model.session
    assert answer(conv, "What colour is this?", [pic(images, "red")], temperature=0) == "red"
    first = conv.last.usage
    before = session.counters.snapshot()
    kv_before = session.n_past  # prompt + the decoded answer token
    assert answer(conv, "And now?", [], temperature=0) == "red"
    after = session.counters
    new_tokens = after.text_tokens_evaluated - before.text_tokens_evaluated
    assert after.image_chunks_encoded == before.image_chunks_encoded
    assert after.image_tokens_evaluated == before.image_tokens_evaluated
    assert conv.last.usage.cached_tokens == kv_before
    # Exactly the new turn's tokens ("</s>USER: And now? ASSISTANT:"), nothing before them.
    assert new_tokens == conv.last.usage.prompt_tokens - kv_before > 0
    assert conv.last.usage.prompt_tokens > first.prompt_tokens


@pytest.mark.slow
def test_batch_reuses_the_shared_prefix_and_never_reencodes(
    oracle_model: LoadedModel, images: Path
) -> None:
    conv = Conversation(oracle_model)
    session = oracle_model.session
    red, white = pic(images, "red"), pic(images, "white")
    conv.reset()
    answer(conv, "What colour is this?", [red], temperature=0)
    image_start = next(s.pos_start for s in session.spans if s.kind == "image")
    encoded = session.counters.image_chunks_encoded
    conv.reset()
    assert answer(conv, "What colour is this?", [white], temperature=0) == "none"
    assert conv.last.usage.cached_tokens == image_start  # system prompt kept, image onwards new
    conv.reset()
    assert answer(conv, "What colour is this?", [red], temperature=0) == "red"
    # Red was encoded before: its embeddings are reused even though the KV moved on.
    assert session.counters.image_chunks_encoded == encoded + 1


def test_same_prompt_again_evaluates_nothing(oracle_model: LoadedModel, images: Path) -> None:
    conv = Conversation(oracle_model)
    red = pic(images, "red")
    answer(conv, "What colour is this?", [red], temperature=0)
    before = oracle_model.session.counters.snapshot()
    conv.reset()
    assert answer(conv, "What colour is this?", [red], temperature=0) == "red"
    after = oracle_model.session.counters
    # The prompt's last logits were kept: not even its last token is decoded again.
    assert after.text_tokens_evaluated - before.text_tokens_evaluated == 0
    assert conv.last.usage.cached_tokens == conv.last.usage.prompt_tokens
    assert after.image_tokens_evaluated == before.image_tokens_evaluated


def test_a_prompt_inside_the_cache_has_its_last_token_redone_once(
    oracle_model: LoadedModel, images: Path
) -> None:
    """A new conversation whose prompt the cache already holds, with more after it (the old
    chat's follow-up): its last token is decoded again for its logits, once; asked again, the
    logits kept from that decode serve, and nothing is decoded."""
    red = pic(images, "red")
    old = Conversation(oracle_model)
    answer(old, "What colour is this?", [red], temperature=0)
    answer(old, "And now?", [], temperature=0)  # the cache runs on past the first prompt
    counters = oracle_model.session.counters
    evaluated = []
    for _ in range(2):
        before = counters.snapshot()
        assert answer(Conversation(oracle_model), "What colour is this?", [red], temperature=0)
        evaluated.append((counters - before).text_tokens_evaluated)
    assert evaluated == [1, 0]


def test_prompt_too_long_for_context(oracle: synthetic.ModelPair, images: Path) -> None:
    loaded = open_model(oracle.model, oracle.mmproj, RuntimeOptions(ctx=128))
    try:
        with pytest.raises(ContextOverflow, match="raise --ctx"):
            answer(Conversation(loaded), "What colour is this? " * 20, [pic(images, "red")])
    finally:
        loaded.close()


@pytest.mark.slow
def test_changed_history_reevaluates_from_the_first_difference(
    oracle_model: LoadedModel, images: Path
) -> None:
    conv = Conversation(oracle_model)
    session = oracle_model.session
    assert answer(conv, "What colour is this?", [pic(images, "blue")], temperature=0) == "blue"
    answer(conv, "Sure?", [], temperature=0)
    turn2_cached = conv.last.usage.cached_tokens
    encoded = session.counters.image_chunks_encoded
    del conv.messages[2:]  # drop the second exchange, as /undo will
    assert answer(conv, "Certain?", [], temperature=0) == "blue"
    # Everything up to the end of the first answer (and the new turn's shared start) is reused.
    assert turn2_cached <= conv.last.usage.cached_tokens < conv.last.usage.prompt_tokens
    assert session.counters.image_chunks_encoded == encoded


@pytest.mark.slow
@pytest.mark.parametrize("chat_format", ["llava", "gguf"])
@pytest.mark.parametrize("max_tokens", [3, 7])
def test_incremental_cache_equals_a_fresh_evaluation(
    random_pair: synthetic.ModelPair, images: Path, chat_format: str, max_tokens: int
) -> None:
    """After answers cut short, edits and follow-ups, the KV cache holds exactly the tokens
    that evaluating the whole conversation from scratch would."""
    loaded = open_model(
        random_pair.model, random_pair.mmproj, RuntimeOptions(ctx=2048, chat_format=chat_format)
    )
    try:
        conv = Conversation(loaded, system="Be helpful.")
        sampling = SamplingParams(seed=5, max_tokens=max_tokens, stop=("q",))
        for prompt, imgs in [("One?", ["red"]), ("Two?", []), ("Three?", ["blue", "grey"])]:
            "".join(conv.ask(prompt, [pic(images, c) for c in imgs], sampling))
        del conv.messages[-2:]
        conv.images.pop()
        conv.images.pop()
        "".join(conv.ask("Four?", [pic(images, "green")], sampling))
        head = [Message("system", "Be helpful.")]
        # What the cache would hold after evaluating the conversation so far from scratch:
        fresh = Session(loaded.engine, 2048)
        try:
            prompt = loaded.fmt.render([*head, *conv.messages[:-1]])
            fresh.evaluate(prompt.text, conv.images, add_special=prompt.add_bos)
            mine = loaded.session.tokens()[: len(fresh.tokens())]
            assert mine == fresh.tokens()
        finally:
            fresh.close()
    finally:
        loaded.close()


@pytest.mark.slow
def test_ctrl_c_during_native_work_is_raised_not_swallowed(oracle: synthetic.ModelPair) -> None:
    """A SIGINT that lands inside llama.cpp (and so inside a log callback) still interrupts."""
    import subprocess
    import sys

    script = f"""
import os, signal, threading, time
from pathlib import Path
from llava_cli.engine import Engine, LoadOptions
opts = LoadOptions(Path({str(oracle.model)!r}), Path({str(oracle.mmproj)!r}))
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
start = time.time()
try:
    while time.time() - start < 10:
        Engine.load(opts).close()
    print("swallowed")
except KeyboardInterrupt:
    print("interrupted")
"""
    for _ in range(2):  # the signal lands in Python or in C, whichever runs at that moment
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.stdout.strip() == "interrupted", done.stderr
        assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr


def test_an_answer_cut_short_stays_in_the_conversation(
    random_model: LoadedModel, images: Path
) -> None:
    conv = Conversation(random_model)
    stream = conv.ask("Go.", [pic(images, "red")], SamplingParams(seed=1, max_tokens=50))
    first = next(stream)
    stream.close()  # the reader stops early, as Ctrl-C in a chat will
    assert conv.last.finish_reason == "interrupted"
    assert conv.last.text.startswith(first)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[-1].content == conv.last.text


def test_a_follow_up_keeps_the_answer_as_generated(
    random_pair: synthetic.ModelPair, images: Path
) -> None:
    """The tokenizer would split the answer's text differently from how it was generated;
    the next turn still reuses the answer's tokens instead of evaluating it again."""
    loaded = open_model(random_pair.model, random_pair.mmproj, RuntimeOptions(ctx=1024))
    try:
        conv = Conversation(loaded)
        sampling = SamplingParams(temperature=0, max_tokens=3)
        answer_text = "".join(conv.ask("Describe it.", [pic(images, "red")], sampling))
        session = loaded.session
        generated = session.spans[-1].tokens
        assert session.spans[-1].kind == "gen" and generated
        retokenized = loaded.engine.tokenize(answer_text, add_special=False)
        assert retokenized[: len(generated)] != generated  # the case this test is about
        cells, before = session.n_cells, session.counters.snapshot()
        "".join(conv.ask("And then?", [], sampling))
        assert conv.last.usage.cached_tokens == cells  # all of turn 1, its answer included
        evaluated = session.counters.text_tokens_evaluated - before.text_tokens_evaluated
        assert evaluated == conv.last.usage.prompt_tokens - cells
        assert session.counters.image_chunks_encoded == before.image_chunks_encoded
    finally:
        loaded.close()


def test_the_registry_chat_format_decides_only_when_the_user_did_not(
    random_pair: synthetic.ModelPair,
) -> None:
    """The random model carries a ChatML template; a registry entry may still say "llava"."""
    cases = [("auto", None), ("auto", "gguf"), ("auto", "llava"), ("gguf", "llava")]
    names = []
    for asked, known in cases:
        loaded = open_model(
            random_pair.model, random_pair.mmproj, RuntimeOptions(chat_format=asked),
            known_format=known,
        )  # fmt: skip
        names.append(loaded.fmt.name)
        loaded.close()
    own, legacy = names[0], names[2]
    assert own != legacy
    assert names == [own, own, legacy, own]

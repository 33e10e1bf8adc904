"""Long chats: when the context fills, ``llava chat`` drops a large part of the oldest text at
once (``commands/room.py``) and keeps the exchanges that carry images, so the turns after a
drop evaluate only their own tokens again, and the colour oracle still sees the image.

Driven as in test_chat.py (prompt-toolkit through a pipe) on the real tiny oracle model: its
system prompt takes about 170 tokens and a text exchange about 37, so a 1,024-token context
fills after a dozen turns.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.commands.chat import Chat
from llava_cli.commands.room import KEPT_SHARE, Dropped, answer_room

from .test_chat import drive, minus, open_test_chat, work

NOTICE = re.compile(r"^context: this turn .* dropping (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Turn:
    prompt: str
    answer: str
    evaluated: tuple[int, int, int]  # text tokens, image tokens, image chunks encoded
    new_tokens: int  # what the turn adds to the cache as it stood before it
    cached: int  # tokens reused from the cache
    dropped: str | None  # what the notice said was dropped, if the turn made room


def say(chat: Chat, capsys: pytest.CaptureFixture[str], prompt: str, *before: str) -> Turn:
    """One turn (after ``before``, e.g. /image lines), with what it evaluated."""
    drive(chat, *before)
    capsys.readouterr()
    session = chat.conversation.loaded.session
    cells, counters = session.n_cells, work(chat)
    expected_new = chat.conversation.measure(prompt, chat.pending) - cells
    drive(chat, prompt)
    out, err = capsys.readouterr()
    notice = NOTICE.search(err)
    assert chat.last_completion is not None
    return Turn(
        prompt,
        out.strip(),
        minus(work(chat), counters),
        expected_new,
        chat.last_completion.usage.cached_tokens,
        notice.group(1) if notice else None,
    )


def number_of_messages(dropped: str) -> int:
    found = re.match(r"(?:the )?(\d+) ", dropped)
    assert found is not None, dropped
    return int(found.group(1))


@pytest.fixture
def long_chat(oracle: synthetic.ModelPair) -> Iterator[Chat]:
    chat = open_test_chat(oracle, ctx=1024)
    yield chat
    chat.close()


@pytest.mark.slow
def test_after_a_drop_the_turns_evaluate_only_their_own_tokens_and_the_image_stays(
    long_chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chat = long_chat
    first = say(chat, capsys, "What colour is this?", f"/image {images / 'red.png'}")
    assert first.answer == "red" and first.evaluated[1:] == (16, 1)
    through_image = chat.conversation.loaded.session.n_cells
    turns = [say(chat, capsys, f"Tell me more, part {i}?") for i in range(40)]
    drops = [i for i, t in enumerate(turns) if t.dropped]
    assert len(drops) >= 3  # the context filled, and filled again
    assert len(drops) <= 8  # not one drop per turn (the old way: 28 of these 40 turns)
    for i in drops:
        turn = turns[i]
        assert turn.dropped is not None
        assert number_of_messages(turn.dropped) >= 4, turn.dropped  # a large part at once
        assert turn.dropped.endswith(" earlier messages; the 1 with an image stays")
        # the system prompt and the image exchange stay in the cache: no image work again
        assert turn.evaluated[1:] == (0, 0)
        assert turn.cached >= through_image
    for turn in turns[drops[0] + 1 :]:
        if not turn.dropped:  # between drops, a turn costs its own tokens, as before the first
            assert turn.evaluated == (turn.new_tokens, 0, 0)
    assert all(turn.answer == "red" for turn in turns)  # the oracle still sees the image
    exchanges = chat.conversation.exchanges()
    assert exchanges[0].prompt == "What colour is this?" and exchanges[0].images
    assert exchanges[-1].prompt == "Tell me more, part 39?"
    assert [e.prompt for e in exchanges[1:]] == [
        f"Tell me more, part {i}?" for i in range(40 - len(exchanges) + 1, 40)
    ]  # the newest text, in order
    # saved chats and /stats say what the conversation now is
    assert [t.prompt for t in chat.as_saved().turns] == [e.prompt for e in exchanges]
    drive(chat, "/stats")
    err = capsys.readouterr().err
    cells = chat.conversation.loaded.session.n_cells
    assert f"context: {cells} of 1024 tokens in use" in err


@pytest.mark.slow
def test_the_first_drop_keeps_about_a_quarter_of_the_room(
    long_chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a drop the conversation takes at most a quarter of the context that is free beyond
    the system prompt, the image exchange, the new turn and the room to answer."""
    chat = long_chat
    say(chat, capsys, "What colour is this?", f"/image {images / 'red.png'}")
    n_ctx = chat.conversation.loaded.session.n_ctx
    limit = n_ctx - answer_room(chat.sampling.max_tokens, n_ctx)
    for i in range(40):
        prompt = f"And part {i}?"
        before = len(chat.conversation.exchanges())
        turn = say(chat, capsys, prompt)
        if turn.dropped:
            break
    else:
        pytest.fail("the context never filled")
    kept = chat.conversation.exchanges()
    dropped = before + 1 - len(kept)
    assert turn.dropped == f"{dropped} earlier messages; the 1 with an image stays"
    assert dropped >= before // 2
    image_only = chat.conversation.exchanges()[:1]
    chat.conversation.replace(image_only)
    base = chat.conversation.measure(prompt, [])
    chat.conversation.replace(kept[:-1])  # as it was when the turn was measured
    after = chat.conversation.measure(prompt, [])
    chat.conversation.replace(kept)
    assert after <= base + (limit - base) // KEPT_SHARE
    assert after > base + (limit - base) // KEPT_SHARE - 60  # not much more than needed went


@pytest.mark.slow
def test_images_go_only_when_they_must_and_the_notice_says_so(
    oracle: synthetic.ModelPair, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new image every turn: once the image exchanges alone leave no room, the oldest of
    them go (all the text first), many at once, named in the notice."""
    chat = open_test_chat(oracle, ctx=512)
    colours = ["red", "green", "blue"]
    try:
        say(chat, capsys, "Hello?")  # a text exchange, which must go before any image
        dropped_images = 0
        for i in range(12):
            colour = colours[i % 3]
            before = chat.conversation.exchanges()
            picture = f"/image {images / f'{colour}.png'}"
            turn = say(chat, capsys, f"What colour is picture {i}?", picture)
            if turn.dropped is None:
                continue
            now = chat.conversation.exchanges()
            stays = {e.prompt for e in now}
            gone = [e for e in before if e.prompt not in stays]
            n_images = sum(len(e.images) for e in gone)
            if n_images:  # images went: all the text went first
                assert all(e.images for e in now)
            what = f"{len(gone)} earlier messages"
            if gone == before[: len(gone)]:
                what = (
                    "the oldest message" if len(gone) == 1 else f"the {len(gone)} oldest messages"
                )
            if n_images:
                what += f" and {n_images} image" + ("s" if n_images > 1 else "")
            assert turn.dropped.startswith(what), (turn.dropped, what)
            dropped_images += n_images
        assert dropped_images >= 4
        exchanges = chat.conversation.exchanges()
        assert len(chat.conversation.images) == sum(len(e.images) for e in exchanges)
    finally:
        chat.close()


def test_the_notice_names_messages_and_images() -> None:
    def notice(**kw: int | bool | None) -> str:
        fields: dict[str, int | bool | None] = {
            "exchanges": 1,
            "images": 0,
            "oldest_only": True,
            "kept_with_images": 0,
            "need": 300,
            "n_ctx": 256,
        }
        return Dropped(**{**fields, **kw}).notice()  # type: ignore[arg-type]

    head = "context: this turn needs 300 of 256 tokens plus room to answer; dropping "
    assert notice() == head + "the oldest message"
    assert notice(exchanges=7, images=2) == head + "the 7 oldest messages and 2 images"
    assert notice(exchanges=5, oldest_only=False, kept_with_images=1) == (
        head + "5 earlier messages; the 1 with an image stays"
    )
    assert notice(exchanges=1, images=1, oldest_only=False, kept_with_images=2) == (
        head + "1 earlier message and 1 image; the 2 with images stay"
    )
    assert notice(need=None).startswith("context: this turn does not fit 256 tokens plus")


@pytest.mark.slow
def test_a_refused_or_stopped_turn_drops_nothing_and_undo_still_works(
    long_chat: Chat, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chat = long_chat
    say(chat, capsys, "What colour is this?", f"/image {images / 'red.png'}")
    session = chat.conversation.loaded.session
    long_turn = "A longer question about the picture, with many words in it? " * 2
    limit = session.n_ctx - answer_room(chat.sampling.max_tokens, session.n_ctx)
    for i in range(40):  # fill the context until the long turn would not fit
        if chat.conversation.measure(long_turn, []) > limit:
            break
        assert say(chat, capsys, f"Part {i}?").dropped is None
    full = [e.prompt for e in chat.conversation.exchanges()]
    assert len(full) > 8

    drive(chat, "word " * 2000)  # cannot fit even alone: refused before anything is dropped
    err = capsys.readouterr().err
    assert "Error: this message needs" in err and "dropping" not in err
    assert [e.prompt for e in chat.conversation.exchanges()] == full

    def stop(_what: str) -> None:  # Ctrl-C while the prompt is read
        raise KeyboardInterrupt

    session.on_progress = stop
    drive(chat, long_turn)
    session.on_progress = None
    err = capsys.readouterr().err
    assert "dropping" in err  # room was made ...
    assert "(stopped before the answer began; the message was not sent)" in err
    assert [e.prompt for e in chat.conversation.exchanges()] == full  # ... and undone

    drive(chat, "/undo")
    assert [e.prompt for e in chat.conversation.exchanges()] == full[:-1]
    turn = say(chat, capsys, long_turn)
    assert turn.answer == "red"
    kept = [e.prompt for e in chat.conversation.exchanges()]
    if turn.dropped:
        assert kept[0] == full[0] and kept[-1] == long_turn and len(kept) < len(full)
    assert [t.prompt for t in chat.as_saved().turns] == kept


@pytest.mark.slow
def test_making_room_preprocesses_each_waiting_image_once(
    long_chat: Chat, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measuring candidate histories counts a waiting image's cells many times; libmtmd's
    preprocessing (resizing, tiling) runs once per image, the rest is remembered."""
    from llava_cli.engine import session as session_module

    calls: list[str] = []
    real = session_module.image_chunks

    def counted(mctx: object, image: object) -> object:
        calls.append(getattr(image, "key", ""))
        return real(mctx, image)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module, "image_chunks", counted)
    drive(long_chat, f"/image {images / 'green.png'}")
    conversation = long_chat.conversation
    for _ in range(5):
        conversation.measure("What colour?", long_chat.pending)
    assert len(calls) == 1

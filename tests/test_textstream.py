from llava_cli.textstream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    out = "".join(stream.feed(p) for p in pieces)
    return out + stream.finish()


def test_multibyte_character_split_across_tokens_is_assembled() -> None:
    stream = TextStream()
    raw = "日本 ok é".encode()
    emitted = [stream.feed(raw[i : i + 1]) for i in range(len(raw))]
    assert "".join(emitted) + stream.finish() == "日本 ok é"
    # Nothing was emitted half-way through a character.
    assert all("\ufffd" not in e for e in emitted)


def test_invalid_bytes_become_replacement_characters_not_nothing() -> None:
    stream = TextStream()
    assert feed_all(stream, [b"a", b"\xff", b"b"]) == "a\ufffdb"


def test_incomplete_trailing_character_is_flushed_as_replacement() -> None:
    stream = TextStream()
    assert feed_all(stream, [b"x", b"\xe6\x97"]) == "x\ufffd"


def test_stop_string_across_tokens_is_never_emitted() -> None:
    stream = TextStream(stop=("STOP",))
    emitted = [stream.feed(p) for p in [b"red", b" ST", b"O", b"P more"]]
    assert "".join(emitted) + stream.finish() == "red"
    assert stream.stopped
    assert stream.feed(b"later") == ""


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_stop() -> None:
    stream = TextStream(stop=("STOP",))
    assert feed_all(stream, [b"ST", b"AR"]) == "STAR"
    assert not stream.stopped


def test_leading_and_trailing_whitespace_dropped_inner_kept() -> None:
    stream = TextStream()
    emitted = [stream.feed(p) for p in [b"  ", b" red", b"  ", b"\n", b"blue", b" \n "]]
    tail = stream.finish()
    assert "".join(emitted) + tail == "red  \nblue"
    assert stream.text == "red  \nblue"


def test_text_attribute_matches_everything_emitted() -> None:
    stream = TextStream(stop=("</s>",))
    out = feed_all(stream, [b" The", b" cat", b"</", b"s>", b"x"])
    assert out == stream.text == "The cat"

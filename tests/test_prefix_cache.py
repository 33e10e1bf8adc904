"""The prefix cache between runs: same answers, no image encoded twice, misses when anything
the state depends on changes, damaged entries ignored, an LRU within its cap."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from llava_cli import store, synthetic
from llava_cli.cache import MAX_CAP, PrefixCache, parse_size
from llava_cli.conversation import Conversation, open_model
from llava_cli.errors import ConfigError
from llava_cli.images import load
from llava_cli.options import RuntimeOptions, SamplingParams

from .conftest import llava

KEY = "ab" * 32
OTHER = "cd" * 32
T = TypeVar("T")


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``, failing the test (not hanging it) if it takes longer than ``seconds``."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return result[0]


def prefix_files() -> list[Path]:
    return sorted((Path(os.environ["LLAVA_HOME"]) / "cache" / "prefix").glob("*.kv"))


def ask_json(pair: synthetic.ModelPair, image: Path, *extra: str) -> dict[str, object]:
    result = llava(
        "ask", image, "--model", pair.model, "--mmproj", pair.mmproj,
        "--temperature", "0", "--max-tokens", "12", "--json", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record: dict[str, object] = json.loads(result.stdout)
    return record


def encoded(record: dict[str, object]) -> bool:
    timings = record["timings"]
    assert isinstance(timings, dict)
    return bool(timings["image_encode_s"] > 0)


def cached(record: dict[str, object]) -> int:
    usage = record["usage"]
    assert isinstance(usage, dict)
    return int(usage["cached_tokens"])


def test_entries_round_trip_and_damage_is_a_miss(tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path)
    assert cache.get(KEY) is None
    cache.put(KEY, {"spans": [1, 2]}, b"state" * 100)
    assert cache.get(KEY) == ({"spans": [1, 2]}, b"state" * 100)
    path = tmp_path / f"{KEY}.kv"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    assert cache.get(KEY) is None
    assert not path.exists()  # removed, to be written anew
    cache.put(KEY, {}, b"x" * 50)
    path.write_bytes(path.read_bytes()[:30])  # truncated
    assert cache.get(KEY) is None


def test_lru_evicts_down_to_its_cap(tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path, cap=3 * 1100)
    keys = [f"{i:064x}" for i in range(4)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, {}, bytes(1000))
        os.utime(tmp_path / f"{key}.kv", ns=(i * 10**9, i * 10**9))
    assert cache.get(keys[0]) is not None  # used: now the most recent
    cache.put(keys[3], {}, bytes(1000))
    assert [p.stem for p in cache.entries()] == [keys[2], keys[0], keys[3]]
    assert cache.info().size <= cache.cap
    assert cache.clear().entries == 3 and cache.info().entries == 0


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 << 30), ("500MB", 500_000_000), ("1024", 1024), ("1.5k", 1500), ("0", 0),
        (" 2 gib ", 2 << 30), ("7B", 7), ("111111111111", 111_111_111_111), ("1PiB", MAX_CAP),
        ("1." + "0" * 5000 + "1", 1),
    ],
)  # fmt: skip
def test_cache_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1" * 400, "more than 1 PiB"),  # was float("1…1") = inf: OverflowError in int()
        ("9" * 5000, "more than 1 PiB"),  # past int()'s 4,300-digit limit
        ("1.0000001PiB", "more than 1 PiB"), ("2PB", "more than 1 PiB"),
        ("nan", "not a size"), ("inf", "not a size"), ("-1", "not a size"),
        ("1e5", "not a size"), ("", "not a size"), ("12 parsecs", "not a size"),
        ("\u0663", "not a size"), ("1\x1b[31m", "not a size"),
    ],
)  # fmt: skip
def test_bad_cache_sizes_name_the_setting_and_the_range(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_size(text)
    message = str(err.value)
    assert message.startswith("LLAVA_CACHE_SIZE=") and problem in message
    assert "2GiB" in message and "from 0 to 1 PiB" in message
    assert err.value.exit_code == 2
    assert "\x1b" not in message and len(message) < 200


@pytest.mark.slow
def test_the_cli_refuses_a_bad_cache_size_in_one_line(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    huge = "1" * 400
    for args in (["cache", "info"], ["ask", images / "red.png", "--model", oracle.model]):
        result = llava(*args, env={"LLAVA_CACHE_SIZE": huge})
        assert result.returncode == 2 and result.stdout == b""
        [line] = result.stderr.decode().splitlines()
        assert line.startswith("Error: LLAVA_CACHE_SIZE=") and "more than 1 PiB" in line
    info = llava("cache", "info", env={"LLAVA_CACHE_SIZE": "111111111111"})
    assert info.returncode == 0 and "of 111.1 GB" in info.stdout.decode()


@pytest.mark.slow
def test_a_restored_prefix_answers_the_same_without_encoding(
    oracle: synthetic.ModelPair, random_pair: synthetic.ModelPair, images: Path
) -> None:
    for pair, image in ((oracle, "red"), (random_pair, "grey")):
        answers = []
        for run in range(2):
            loaded = open_model(pair.model, pair.mmproj, RuntimeOptions())
            try:
                conv = Conversation(loaded)
                sampling = SamplingParams(temperature=0, max_tokens=12)
                answers.append(
                    "".join(
                        conv.ask("Describe it.", [load(str(images / f"{image}.png"))], sampling)
                    )
                )
                work = loaded.session.counters
                assert work.image_chunks_encoded == (1 if run == 0 else 0)
                assert work.image_tokens_evaluated == (16 if run == 0 else 0)
                assert work.prefixes_restored == run
            finally:
                loaded.close()
        uncached = open_model(pair.model, pair.mmproj, RuntimeOptions(cache=False))
        try:
            conv = Conversation(uncached)
            sampling = SamplingParams(temperature=0, max_tokens=12)
            fresh = "".join(
                conv.ask("Describe it.", [load(str(images / f"{image}.png"))], sampling)
            )
        finally:
            uncached.close()
        assert answers[0] == answers[1] == fresh
        assert answers[0].strip()
    assert answers[0] != "red"  # (the random model's answer, not the oracle's)


@pytest.mark.slow
def test_the_second_ask_reuses_the_first(oracle: synthetic.ModelPair, images: Path) -> None:
    first = ask_json(oracle, images / "red.png")
    second = ask_json(oracle, images / "red.png")
    assert first["answer"] == second["answer"] == "red"
    assert encoded(first) and not encoded(second)
    assert cached(first) == 0 and cached(second) > 16
    assert len(prefix_files()) == 1
    uncached = ask_json(oracle, images / "red.png", "--no-cache")
    assert encoded(uncached) and cached(uncached) == 0


@pytest.mark.slow
def test_anything_the_prefix_depends_on_misses(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    pair = synthetic.ModelPair(tmp_path / "m.gguf", tmp_path / "mmproj-m.gguf")
    pair.model.write_bytes(oracle.model.read_bytes())
    pair.mmproj.write_bytes(oracle.mmproj.read_bytes())
    assert encoded(ask_json(pair, images / "red.png"))  # the first run encodes
    assert not encoded(ask_json(pair, images / "red.png"))  # same everything: a hit
    blue = ask_json(pair, images / "blue.png")  # another image: its own prefix, its answer
    assert encoded(blue) and blue["answer"] == "blue"
    assert encoded(ask_json(pair, images / "red.png", "--system", "Be brief."))  # system prompt
    for changed in (pair.mmproj, pair.model):  # a file replaced (same bytes, new mtime)
        stat = changed.stat()
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert encoded(ask_json(pair, images / "red.png"))
        assert not encoded(ask_json(pair, images / "red.png"))


@pytest.mark.slow
def test_every_image_of_a_batch_is_restored(oracle: synthetic.ModelPair, images: Path) -> None:
    args = ["ask", images / "red.png", images / "blue.png", "--model", oracle.model, "--json"]
    first = [json.loads(line) for line in llava(*args).stdout.splitlines()]
    again = [json.loads(line) for line in llava(*args).stdout.splitlines()]
    assert [r["answer"] for r in first] == [r["answer"] for r in again] == ["red", "blue"]
    assert [encoded(r) for r in first] == [True, True]
    assert [encoded(r) for r in again] == [False, False]
    assert len(prefix_files()) == 2


@pytest.mark.slow
def test_a_chat_turn_after_an_answer_is_not_saved(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    """Only prefixes evaluated as a fresh run would are kept: not one holding an answer."""
    script = f"What colour is this?\n/image {images / 'blue.png'}\nAnd this?\n"
    result = llava("chat", images / "red.png", "--model", oracle.model, stdin=script.encode())
    assert result.returncode == 0, result.stderr
    assert len(prefix_files()) == 1  # the first turn's prefix only


def test_leftovers_of_a_killed_write_are_counted_and_cleared(tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path)
    cache.put(KEY, {}, b"x" * 10)
    (tmp_path / f".{KEY}.kv.abc123.tmp").write_bytes(b"y" * 1000)
    assert cache.info().entries == 2 and cache.info().size > 1000
    assert cache.clear().entries == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_truncated_entry_is_ignored_and_replaced(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    ask_json(oracle, images / "red.png")
    [entry] = prefix_files()
    full = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[: full // 2])
    again = ask_json(oracle, images / "red.png")
    assert again["answer"] == "red"
    assert encoded(again) and cached(again) == 0
    assert entry.stat().st_size == full


@pytest.mark.slow
def test_the_cli_cache_keeps_to_its_cap_and_clears(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    ask_json(oracle, images / "red.png")
    [entry] = prefix_files()
    cap = str(int(entry.stat().st_size * 1.5))
    env = {"LLAVA_CACHE_SIZE": cap}
    result = llava("ask", images / "blue.png", "--model", oracle.model, env=env)
    assert result.stdout == b"blue\n"
    assert [p.name for p in prefix_files()] != [entry.name] and len(prefix_files()) == 1
    info = llava("cache", "info", env=env).stdout.decode()
    assert "entries  1" in info
    cleared = llava("cache", "clear")
    assert cleared.returncode == 0 and "removed 1 saved prefix (" in cleared.stderr.decode()
    assert prefix_files() == []


def answer(pair: synthetic.ModelPair, image: Path, *, cache: bool = True) -> tuple[str, int]:
    """The answer about ``image``, and how many prefixes came from the cache."""
    loaded = open_model(pair.model, pair.mmproj, RuntimeOptions(cache=cache))
    try:
        conv = Conversation(loaded)
        sampling = SamplingParams(temperature=0, max_tokens=12)
        text = "".join(conv.ask("What colour is this?", [load(str(image))], sampling))
        return text.strip(), loaded.session.counters.prefixes_restored
    finally:
        loaded.close()


@pytest.mark.slow
def test_an_entry_copied_under_another_key_is_not_restored(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """Two models of the same shape and tokenizer, asked about the same image, have the same
    prefix tokens; only the key tells their states apart. An entry carries its key."""
    blind = synthetic.build_colour_oracle(tmp_path / "blind", gain=0.0)  # sees no colour
    blue = images / "blue.png"
    assert answer(blind, blue, cache=False) == ("none", 0)  # as --no-cache answers
    assert answer(oracle, blue) == ("blue", 0)
    [oracle_entry] = prefix_files()
    assert answer(blind, blue) == ("none", 0)
    [blind_entry] = [p for p in prefix_files() if p != oracle_entry]
    blind_entry.write_bytes(oracle_entry.read_bytes())  # the oracle's state, under blind's key
    assert answer(blind, blue) == ("none", 0)  # before: ("blue", 1), the oracle's answer
    assert blind_entry.read_bytes() != oracle_entry.read_bytes()  # replaced by blind's own
    assert answer(blind, blue) == ("none", 1)


def test_an_entry_names_its_key(tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path)
    cache.put(KEY, {"spans": []}, b"state" * 100)
    saved = (tmp_path / f"{KEY}.kv").read_bytes()
    copy = tmp_path / f"{OTHER}.kv"
    copy.write_bytes(saved)  # the right bytes under the wrong name
    assert cache.get(OTHER) is None and not copy.exists()
    assert cache.get(KEY) is not None
    forged = bytearray(saved)
    forged[8:40] = bytes.fromhex(OTHER)  # the key in the header rewritten: its sha256 fails
    copy.write_bytes(forged)
    assert cache.get(OTHER) is None


@pytest.mark.parametrize("kind", ["fifo", "link to a device", "link to an entry", "over the cap"])
def test_only_a_regular_entry_within_the_cap_is_read(kind: str, tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path / "prefix", cap=10_000)
    cache.folder.mkdir()
    path = cache.folder / f"{KEY}.kv"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking open would wait forever
    elif kind == "link to a device":
        path.symlink_to("/dev/zero")
    elif kind == "link to an entry":
        elsewhere = PrefixCache(tmp_path / "elsewhere")
        elsewhere.put(KEY, {}, b"x" * 100)
        path.symlink_to(elsewhere.folder / f"{KEY}.kv")
    else:
        PrefixCache(cache.folder, cap=1 << 20).put(KEY, {}, b"x" * 20_000)
    assert within(5, lambda: cache.get(KEY)) is None
    cache.put(KEY, {"n": 1}, b"y" * 100)  # a real entry takes its place
    assert path.is_file() and not path.is_symlink()
    assert cache.get(KEY) == ({"n": 1}, b"y" * 100)
    assert cache.info().entries == 1


@pytest.mark.slow
def test_a_fifo_in_place_of_an_entry_does_not_hang_the_next_ask(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    ask_json(oracle, images / "red.png")
    [entry] = prefix_files()
    entry.unlink()
    os.mkfifo(entry)
    args = ["--model", oracle.model, "--temperature", "0", "--json"]
    result = llava("ask", images / "red.png", *args, timeout=60)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["answer"] == "red" and encoded(again)
    assert entry.is_file()  # written anew in the FIFO's place
    assert not encoded(ask_json(oracle, images / "red.png"))


def pulled(ref: str) -> store.Pulled:
    file = store.StoredFile("m.gguf", "0" * 64, 1, "/nowhere/m.gguf")
    return store.Pulled(ref, ref, "o/r", "main", "1" * 40, "q8_0", "chatml", file, file, 1.0)


def test_records_that_are_not_small_regular_files_are_skipped(tmp_path: Path) -> None:
    store.save(pulled("good:q8_0"))
    folder = store._record_path("good:q8_0").parent
    os.mkfifo(folder / "fifo.json")
    (folder / "device.json").symlink_to("/dev/zero")
    (folder / "huge.json").write_bytes(b" " * (2 << 20))
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert [r.ref for r in within(5, lambda: list(store.records()))] == ["good:q8_0"]
    os.mkfifo(store._record_path("fifo:q8_0"))
    assert within(5, lambda: store.record_for("fifo:q8_0")) is None


def test_a_ref_that_is_not_a_regular_file_is_no_commit(tmp_path: Path) -> None:
    repo = store.RepoCache("owner/name", tmp_path)
    (repo.folder / "refs").mkdir(parents=True)
    os.mkfifo(repo.folder / "refs" / "main")
    assert within(5, lambda: repo.commit_for("main")) is None
    repo.set_ref("dev", "a" * 40)
    assert repo.commit_for("dev") == "a" * 40


def test_a_folder_in_place_of_an_entry_is_a_miss(tmp_path: Path) -> None:
    """It was `unexpected IsADirectoryError` on every ask."""
    cache = PrefixCache(tmp_path)
    path = tmp_path / f"{KEY}.kv"
    path.mkdir()
    assert within(5, lambda: cache.get(KEY)) is None
    assert cache.info().entries == 0  # a folder is not an entry
    cache.put(KEY, {"n": 1}, b"y" * 100)  # an empty folder gives way to the entry
    assert cache.get(KEY) == ({"n": 1}, b"y" * 100)
    full = tmp_path / f"{OTHER}.kv"
    full.mkdir()
    (full / "theirs").write_bytes(b"kept")
    assert cache.get(OTHER) is None
    assert cache.clear().entries == 1  # the one real entry; the folder and its file stay
    assert (full / "theirs").read_bytes() == b"kept"


@pytest.mark.slow
def test_a_folder_in_place_of_an_entry_does_not_break_ask(
    oracle: synthetic.ModelPair, images: Path
) -> None:
    ask_json(oracle, images / "red.png")
    [entry] = prefix_files()
    entry.unlink()
    entry.mkdir()
    again = ask_json(oracle, images / "red.png")  # was exit 1, `unexpected IsADirectoryError`
    assert again["answer"] == "red" and encoded(again)
    assert entry.is_file()  # written anew in the empty folder's place
    entry.unlink()
    entry.mkdir()
    (entry / "theirs").write_bytes(b"kept")  # a folder that is not empty stays, and ask works
    result = llava("ask", images / "red.png", "--model", oracle.model, "--temperature", "0")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"red\n", b"")
    assert (entry / "theirs").read_bytes() == b"kept"


_HEADER_CHECKS = """
import json, os, resource, sys, time
from pathlib import Path
from llava_cli.cache import PrefixCache

folder, key, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cache = PrefixCache(folder, cap=1 << 50)  # LLAVA_CACHE_SIZE=1PiB: no cap stops the read
path = folder / f"{key}.kv"
template = (folder / "template").read_bytes()  # a good entry: header, meta, length, sha256
head = template[: len(template) - 32 - 100 - 8]  # it holds a 100-byte payload
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
limit = vm * 1024 + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for case in ("garbage", "length disagrees", "lengths agree"):
    with open(path, "wb") as f:
        if case != "garbage":
            claimed = size - len(head) - 8 - 32 + (1 if case == "length disagrees" else 0)
            f.write(head + claimed.to_bytes(8, "little"))
        f.truncate(size)  # sparse: costs no disk
    started = time.monotonic()
    hit = cache.get(key)
    results[case] = [hit is None, path.exists(), time.monotonic() - started]
print(json.dumps(results))
"""


def test_a_damaged_entry_is_judged_by_its_header_before_it_is_read(tmp_path: Path) -> None:
    """A 2 GB garbage entry used to cost 7 s and 2.1 GB; one too big to allocate was never
    removed, so its key missed forever."""
    import subprocess
    import sys

    PrefixCache(tmp_path).put(KEY, {"spans": []}, b"s" * 100)
    (tmp_path / f"{KEY}.kv").rename(tmp_path / "template")
    size = 1 << 30  # four times the memory the child may still take
    result = subprocess.run(
        [sys.executable, "-c", _HEADER_CHECKS, str(tmp_path), KEY, str(size)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    for case, (missed, kept, seconds) in found.items():
        assert missed and not kept, case  # a miss, and removed to be written anew
        if case != "lengths agree":  # read only up to the header's checks
            assert seconds < 2, case  # milliseconds; reading 1 GiB is out of the child's memory


def test_an_entry_larger_than_the_state_can_be_is_removed(tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path)
    cache.put(KEY, {}, b"s" * 1000)
    assert cache.get(KEY, max_payload=1000) == ({}, b"s" * 1000)
    assert cache.get(KEY, max_payload=999) is None
    assert not (tmp_path / f"{KEY}.kv").exists()

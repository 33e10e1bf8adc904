"""The prefix cache between runs: same answers, no image encoded twice, misses when anything
the state depends on changes, damaged entries ignored, an LRU within its cap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llava_cli import synthetic
from llava_cli.cache import PrefixCache, parse_size
from llava_cli.conversation import Conversation, open_model
from llava_cli.images import load
from llava_cli.options import RuntimeOptions, SamplingParams

from .conftest import llava

KEY = "ab" * 32


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
    ("text", "size"), [("2GiB", 2 << 30), ("500MB", 500_000_000), ("1024", 1024), ("1.5k", 1500)]
)
def test_cache_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


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


def test_the_second_ask_reuses_the_first(oracle: synthetic.ModelPair, images: Path) -> None:
    first = ask_json(oracle, images / "red.png")
    second = ask_json(oracle, images / "red.png")
    assert first["answer"] == second["answer"] == "red"
    assert encoded(first) and not encoded(second)
    assert cached(first) == 0 and cached(second) > 16
    assert len(prefix_files()) == 1
    uncached = ask_json(oracle, images / "red.png", "--no-cache")
    assert encoded(uncached) and cached(uncached) == 0


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


def test_every_image_of_a_batch_is_restored(oracle: synthetic.ModelPair, images: Path) -> None:
    args = ["ask", images / "red.png", images / "blue.png", "--model", oracle.model, "--json"]
    first = [json.loads(line) for line in llava(*args).stdout.splitlines()]
    again = [json.loads(line) for line in llava(*args).stdout.splitlines()]
    assert [r["answer"] for r in first] == [r["answer"] for r in again] == ["red", "blue"]
    assert [encoded(r) for r in first] == [True, True]
    assert [encoded(r) for r in again] == [False, False]
    assert len(prefix_files()) == 2


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
    assert cleared.returncode == 0 and "removed 1 saved prefixes" in cleared.stderr.decode()
    assert prefix_files() == []


@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"], ["chat", "--help"]])
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    """`llava --help` and `llava ask --help` stay fast: no llama_cpp, numpy, Pillow or hub."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from llava_cli.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = {'llama_cpp', 'numpy', 'PIL', 'huggingface_hub', 'rich', 'prompt_toolkit'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"

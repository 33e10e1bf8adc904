"""The registry: the shipped models.toml, user overrides, strict validation, refs, quant choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llava_cli import registry
from llava_cli.errors import ConfigError, UsageError
from llava_cli.modelref import choose_files, quant_of
from llava_cli.registry import Ref, parse_ref

REQUIRED_MODELS = (
    "llava-1.5-7b",
    "llava-1.6-mistral-7b",
    "gemma-3-4b",
    "qwen2.5-vl-3b",
    "qwen2.5-vl-7b",
    "smolvlm-256m",
    "smolvlm-500m",
    "smolvlm2-2.2b",
    "minicpm-v-2.6",
    "moondream2",
)

ENTRY = """
[models.mine]
name = "Mine"
description = "A test model."
repo = "me/mine-GGUF"
revision = "main"
license = "mit"
parameters = "1B"
context_length = 2048
chat_format = "gguf"
default_quant = "Q8_0"
[models.mine.quants.Q8_0]
file = "mine-Q8_0.gguf"
size = 100
sha256 = "{sha}"
[models.mine.mmproj]
file = "{mmproj}"
"""


def user_registry(text: str) -> Path:
    path = Path(os.environ["LLAVA_HOME"]) / "models.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_registry_covers_the_required_models() -> None:
    reg = registry.load()
    assert reg.default == "smolvlm-500m"
    for key in REQUIRED_MODELS:
        spec = reg.get(key)
        assert spec.mmproj.file.endswith(".gguf")
        assert spec.default_quant in spec.quants
    assert reg.get("llava-1.5-7b").chat_format == "llava"
    assert registry.builtin_file().resolve() == (Path(__file__).parents[1] / "models.toml")


def test_aliases_and_quants_are_case_insensitive() -> None:
    reg = registry.load()
    spec = reg.get("Gemma3")
    assert spec.key == "gemma-3-4b"
    assert spec.quant("q8_0")[0] == "Q8_0"
    assert spec.quant(None)[0] == "Q4_K_M"
    with pytest.raises(UsageError, match=r"no quant 'Q2_K'.*choose one of Q4_K_M, Q8_0"):
        spec.quant("Q2_K")


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UsageError, match=r"unknown model 'gemma-3-4'.*did you mean gemma-3-4b"):
        registry.load().get("gemma-3-4")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("llava", Ref("llava")),
        ("llava-1.5-7b:q8_0", Ref("llava-1.5-7b", "q8_0")),
        ("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", Ref("ggml-org/gemma-3-4b-it-GGUF", "Q4_K_M")),
    ],
)
def test_parse_ref(text: str, expected: Ref) -> None:
    assert parse_ref(text) == expected
    assert parse_ref(text).is_repo == ("/" in text)


@pytest.mark.parametrize("text", ["a/b/c", "../x", "x:", "x:a b", "/abs", "owner/"])
def test_bad_refs_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(text)


def test_user_file_adds_and_overrides() -> None:
    user_registry(
        'default = "mine"\n'
        + ENTRY.format(sha="a" * 64, mmproj="mmproj-mine.gguf")
        + '\n[models."gemma-3-4b"]\ndefault_quant = "Q8_0"\n'
    )
    reg = registry.load()
    assert reg.default == "mine"
    assert reg.get("mine").quants["Q8_0"].sha256 == "a" * 64
    gemma = reg.get("gemma-3-4b")
    assert gemma.quant(None)[0] == "Q8_0"
    assert gemma.quants["Q4_K_M"].sha256 is not None  # the rest of the built-in entry stays


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (
            {"mmproj": "../escape.gguf"},
            r"models\.mine\.mmproj\.file: '\.\./escape\.gguf' is not a plain",
        ),
        ({"mmproj": "/etc/passwd"}, r"models\.mine\.mmproj\.file: '/etc/passwd' is not a plain"),
        ({"mmproj": "sub/dir.gguf"}, r"models\.mine\.mmproj\.file: 'sub/dir\.gguf'"),
        ({"mmproj": "..\\\\win.gguf"}, r"models\.mine\.mmproj\.file"),
        ({"sha": "abc123"}, r"models\.mine\.quants\.Q8_0\.sha256: must be 64 lowercase hex"),
        ({"sha": "A" * 64}, r"models\.mine\.quants\.Q8_0\.sha256"),
    ],
)
def test_bad_entries_name_file_entry_and_key(mutation: dict[str, str], message: str) -> None:
    values = {"sha": "a" * 64, "mmproj": "mmproj-mine.gguf", **mutation}
    path = user_registry(ENTRY.format(**values))
    with pytest.raises(ConfigError, match=message) as caught:
        registry.load()
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[models.mine.quants.Q8_0]\nfile = "x.gguf"\nmd5 = "x"\n', None),  # duplicate table
        ('[models.other]\nname = "x"\nhomepage = "y"\n', r"models\.other\.homepage: unknown key"),
        ('[models.other]\nname = "x"\n', r"models\.other\.description: missing"),
        ('colour = "red"\n', r"unknown key 'colour'"),
        ('[models."Bad Name"]\nname = "x"\n', r"bad entry name 'Bad Name'"),
    ],
)
def test_unknown_keys_and_missing_keys(extra: str, message: str | None) -> None:
    text = ENTRY.format(sha="a" * 64, mmproj="m.gguf")
    text = extra + text if extra.startswith("colour") else text + extra
    path = user_registry(text)
    with pytest.raises(ConfigError, match=message) as caught:
        registry.load()
    assert str(path) in str(caught.value)


def test_alias_collision_is_an_error() -> None:
    text = ENTRY.format(sha="a" * 64, mmproj="m.gguf").replace(
        'name = "Mine"', 'name = "Mine"\naliases = ["gemma3"]'
    )
    user_registry(text)
    with pytest.raises(ConfigError, match="'gemma3' already names gemma-3-4b"):
        registry.load()


@pytest.mark.parametrize(
    ("file", "quant"),
    [
        ("gemma-3-4b-it-Q4_K_M.gguf", "Q4_K_M"),
        ("llava-v1.6-mistral-7b.Q4_K_M.gguf", "Q4_K_M"),
        ("SmolVLM-256M-Instruct-f16.gguf", "F16"),
        ("ggml-model-IQ2_M.gguf", "IQ2_M"),
        ("model.gguf", None),
    ],
)
def test_quant_of_file_names(file: str, quant: str | None) -> None:
    assert quant_of(file) == quant


def test_choose_files_from_a_repo_listing() -> None:
    listing = {
        "m-Q8_0.gguf": 800,
        "m-Q4_K_M.gguf": 400,
        "m-Q2_K.gguf": 200,
        "mmproj-m-f16.gguf": 60,
        "mmproj-m-Q8_0.gguf": 30,
        "README.md": 1,
    }
    assert choose_files(Ref("o/m"), listing) == ("Q4_K_M", "m-Q4_K_M.gguf", "mmproj-m-f16.gguf")
    assert choose_files(Ref("o/m", "q8_0"), listing) == (
        "Q8_0",
        "m-Q8_0.gguf",
        "mmproj-m-Q8_0.gguf",
    )
    no_default = {k: v for k, v in listing.items() if "Q4" not in k and "-Q8" not in k}
    assert choose_files(Ref("o/m"), no_default)[1] == "m-Q2_K.gguf"  # then the smallest
    with pytest.raises(UsageError, match=r"has no Q5_K_M file.*Q2_K, Q4_K_M, Q8_0"):
        choose_files(Ref("o/m", "Q5_K_M"), listing)


UNSAFE = [
    ("\n", "U+000A (control character)"),
    ("\0", "U+0000 (control character)"),
    ("\x1b", "U+001B (control character)"),
    ("\x7f", "U+007F (control character)"),
    ("\u202e", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("\u202a", "U+202A (LEFT-TO-RIGHT EMBEDDING)"),
    ("\u2066", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
    ("\u2069", "U+2069 (POP DIRECTIONAL ISOLATE)"),
    ("\u200e", "U+200E (LEFT-TO-RIGHT MARK)"),
    ("\u200f", "U+200F (RIGHT-TO-LEFT MARK)"),
    ("\u061c", "U+061C (ARABIC LETTER MARK)"),
    ("\u2028", "U+2028 (LINE SEPARATOR)"),
]


def toml_escaped(text: str) -> str:
    """`text` inside a TOML basic string: every non-ASCII or control character as \\uXXXX."""
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\u{ord(c):04x}" for c in text)


@pytest.mark.parametrize(("char", "shown"), UNSAFE)
@pytest.mark.parametrize(
    ("old", "where"),
    [
        ('file = "mine-Q8_0.gguf"', "models.mine.quants.Q8_0.file"),
        ('file = "mmproj-mine.gguf"', "models.mine.mmproj.file"),
        ('repo = "me/mine-GGUF"', "models.mine.repo"),
        ('revision = "main"', "models.mine.revision"),
        ('description = "A test model."', "models.mine.description"),
        ('name = "Mine"', "models.mine.name"),
    ],
)
def test_control_and_bidi_characters_are_refused_by_code_point(
    char: str, shown: str, old: str, where: str
) -> None:
    key, value = old.split(" = ")
    new = f'{key} = "{toml_escaped(value.strip(chr(34))[:4] + char + value.strip(chr(34))[4:])}"'
    text = ENTRY.format(sha="a" * 64, mmproj="mmproj-mine.gguf").replace(old, new)
    path = user_registry(text)
    with pytest.raises(ConfigError) as caught:
        registry.load()
    assert caught.value.one_line() == (
        f"{path}: {where}: its value holds {shown}"
        " — names and text in a registry are plain: remove control and bidi characters"
    )
    assert char not in caught.value.one_line()
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("tables", "where"),
    [
        ('[models."mi\\u202ene"]\nname = "x"\n', "models.mi<U+202E>ne: its name"),
        (
            '[models.mine.quants."Q8\\n0"]\nfile = "x.gguf"\n',
            "models.mine.quants.Q8<U+000A>0: its name",
        ),
        ('[models.other]\naliases = ["ok", "b\\u200fad"]\n', "models.other.aliases[1]: its value"),
        ('default = "mi\\u0000ne"\n', "default: its value"),
    ],
)
def test_keys_lists_and_the_default_are_checked_too(tables: str, where: str) -> None:
    text = ENTRY.format(sha="a" * 64, mmproj="m.gguf")
    text = tables + text if tables.startswith("default") else text + tables
    path = user_registry(text)
    with pytest.raises(ConfigError) as caught:
        registry.load()
    message = caught.value.one_line()
    assert message.startswith(f"{path}: {where} holds U+")
    assert not any(c in message for c in "\u202e\n\u200f\0")


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ("..", "'..' is not a plain file name"),
        (".", "'.' is not a plain file name"),
        ("C:evil.gguf", "'C:evil.gguf' is not a plain file name"),
        ("C:\\\\evil.gguf", "'C:\\\\evil.gguf' is not a plain file name"),  # TOML "C:\\evil"
        ("~/x.gguf", "'~/x.gguf' is not a plain file name"),
        ("x" * 252 + ".gguf", "is longer than 255 bytes"),
    ],
)
def test_file_names_are_plain_names(file: str, problem: str) -> None:
    path = user_registry(ENTRY.format(sha="a" * 64, mmproj=file))
    with pytest.raises(ConfigError) as caught:
        registry.load()
    assert caught.value.one_line().startswith(f"{path}: models.mine.mmproj.file: {problem} — ")


@pytest.mark.parametrize(
    "repo",
    [
        "me/mine-GGUF\\n",  # a trailing newline once passed a `$` pattern
        "me/mi--ne",
        "me/../mine",
        "me/mine.git",
        "-me/mine",
        "me/mine-",
        "me/" + "m" * 97,
        "me/mine/extra",
        "mine",
    ],
)
def test_repos_must_be_hub_repo_ids(repo: str) -> None:
    text = ENTRY.format(sha="a" * 64, mmproj="m.gguf").replace("me/mine-GGUF", repo)
    path = user_registry(text)
    with pytest.raises(ConfigError) as caught:
        registry.load()
    message = caught.value.one_line()
    assert message.startswith(f"{path}: models.mine.repo: ")
    assert "is not a hub repo id" in message or "holds U+000A" in message


@pytest.mark.parametrize("revision", ["main\\n", "a//b", "a/", "../main", "v1/../../x"])
def test_revisions_are_branch_or_commit_names(revision: str) -> None:
    text = ENTRY.format(sha="a" * 64, mmproj="m.gguf").replace(
        'revision = "main"', f'revision = "{revision}"'
    )
    user_registry(text)
    with pytest.raises(ConfigError, match=r"models\.mine\.revision: "):
        registry.load()


@pytest.mark.parametrize(
    "text", ["me/mi\nne", "me/mi\u202ene", "me/mi--ne", "me/x.git", "mine\n:Q8_0", "mine:Q8\n_0"]
)
def test_refs_with_control_characters_or_bad_repo_ids_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(text)

"""The model registry: ``models.toml`` shipped in the package, plus the user's own file.

The user file (``$LLAVA_HOME/models.toml``, else the platform's config dir) adds entries, or
changes built-in ones key by key (a whole quant or mmproj table at a time). Both files are
checked strictly: an unknown key or a bad value is an error that names the file, the entry and
the key, because a typo in a pin must never turn into an unverified download. Every key and
string in both files is plain text: a control, bidi or other invisible character is refused
where the file is read, named by its code point, and never printed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import paths, read_toml
from .digests import is_sha256
from .errors import ConfigError, UsageError
from .text import escaped, unsafe_character

# Whole-string patterns: used with fullmatch (``$`` alone would let a trailing newline through).
_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")
# The hub's repo-id form (huggingface_hub's validate_repo_id), with the owner required: each part
# 1-96 of [A-Za-z0-9._-], starting and ending with a letter, digit or '_'; no '--' or '..'.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
# Control (Cc), format (Cf: bidi overrides and isolates, marks, zero-width), line and paragraph
# separators, lone surrogates: never in a name, and never to be printed as they are.
_FILE_NAME_MAX = 255  # bytes (UTF-8), the usual file-system limit on one name

_REQUIRED = (
    "name",
    "description",
    "repo",
    "revision",
    "license",
    "parameters",
    "context_length",
    "chat_format",
    "default_quant",
)
_ENTRY_KEYS = frozenset((*_REQUIRED, "aliases", "quants", "mmproj", "download"))
_FILE_KEYS = frozenset(("file", "size", "sha256"))


@dataclass(frozen=True)
class FileSpec:
    file: str  # the name in the repo: a plain name, never a path ("": from the hub's listing)
    size: int | None = None  # bytes, when pinned
    sha256: str | None = None  # when pinned; otherwise the hub's LFS sha256 is checked


FROM_LISTING = FileSpec("")  # an entry that names no files: chosen from the repo's listing


@dataclass(frozen=True)
class ModelSpec:
    key: str
    name: str
    description: str
    repo: str
    revision: str
    license: str
    parameters: str
    context_length: int
    chat_format: str
    default_quant: str
    quants: Mapping[str, FileSpec]
    mmproj: FileSpec
    aliases: tuple[str, ...] = ()
    source: Path | None = None  # the file that defined (or last changed) this entry
    # About how many bytes the default quant and its projector take, where the files' sizes are
    # not pinned: shown with a "~", never checked against a download.
    download: int | None = None

    @property
    def from_listing(self) -> bool:
        """No file names: the files are chosen from the repo's listing at pull time."""
        return not self.quants

    def quant(self, wanted: str | None) -> tuple[str, FileSpec]:
        """The quant named (case-insensitive), or the default one."""
        if self.from_listing:
            return (wanted or self.default_quant).upper(), FROM_LISTING
        if wanted is None:
            return self.default_quant, self.quants[self.default_quant]
        for name, spec in self.quants.items():
            if name.upper() == wanted.upper():
                return name, spec
        raise UsageError(
            f"{self.key} has no quant {wanted!r}",
            "choose one of " + ", ".join(self.quants) + f" (default {self.default_quant})",
        )


@dataclass(frozen=True)
class Ref:
    """What the user named: a registry entry or a hub repo, with an optional quant."""

    name: str
    quant: str | None = None

    @property
    def is_repo(self) -> bool:
        return "/" in self.name

    def __str__(self) -> str:
        return f"{self.name}:{self.quant}" if self.quant else self.name


@dataclass(frozen=True)
class Registry:
    models: Mapping[str, ModelSpec]
    default: str

    def find(self, name: str) -> ModelSpec | None:
        wanted = name.lower()
        if wanted in self.models:
            return self.models[wanted]
        for spec in self.models.values():
            if wanted in spec.aliases:
                return spec
        return None

    def get(self, name: str) -> ModelSpec:
        spec = self.find(name)
        if spec is not None:
            return spec
        names = [*self.models, *(a for s in self.models.values() for a in s.aliases)]
        close = difflib.get_close_matches(name.lower(), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(
            f"unknown model {name!r}",
            hint + "see `llava list --available`, or name a hub repo as OWNER/REPO[:QUANT]",
        )


def is_repo_id(text: str) -> bool:
    """OWNER/NAME in the form the hub accepts."""
    return (
        bool(_REPO.fullmatch(text))
        and ".." not in text
        and "--" not in text
        and not text.endswith(".git")
    )


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name (no folders, no '..', nothing invisible); or None."""
    unsafe = unsafe_character(name)
    if unsafe is not None:
        return f"holds {unsafe}"
    if not name:
        return "is empty"
    if any(c in name for c in "/\\:") or name.startswith(("~", ".")):
        return f"{name!r} is not a plain file name"
    if len(name.encode("utf-8", "surrogatepass")) > _FILE_NAME_MAX:
        return f"is longer than {_FILE_NAME_MAX} bytes"
    return None


REF_MAX = 200  # the hub allows 96 characters a name, so OWNER/NAME:QUANT stays well under


def parse_ref(text: str) -> Ref:
    if len(text) > REF_MAX:
        raise UsageError(
            f"a model reference of {len(text):,} characters ({escaped(text[:40])}…)",
            "write NAME[:QUANT], OWNER/REPO[:QUANT] or a path to a .gguf file",
        )
    name, sep, quant = text.strip().partition(":")
    if sep and not _QUANT.fullmatch(quant):
        raise UsageError(f"bad quant in {text!r}", "write NAME[:QUANT], e.g. llava-1.5-7b:q8_0")
    if "/" in name:
        if not is_repo_id(name):
            raise UsageError(f"bad repo id {name!r}", "write OWNER/REPO[:QUANT]")
    elif not _KEY.fullmatch(name.lower()):
        raise UsageError(f"bad model name {text!r}", "see `llava list --available`")
    return Ref(name, quant or None)


def builtin_file() -> Path:
    return Path(__file__).with_name("models.toml")


def user_file() -> Path:
    return paths().config_dir / "models.toml"


def load() -> Registry:
    """The built-in registry, with the user's file (if any) laid over it."""
    builtin = builtin_file()
    tables, default = _read(builtin)
    sources = dict.fromkeys(tables, builtin)
    extra = user_file()
    if extra.is_file():
        user_tables, user_default = _read(extra)
        for key, table in user_tables.items():
            tables[key] = _merge(tables.get(key, {}), table)
            sources[key] = extra
        default = user_default or default
    models = {key: _entry(key, table, sources[key]) for key, table in tables.items()}
    _check_names(models)
    if default not in models:
        where = extra if extra.is_file() else builtin
        raise ConfigError(f"{where}: default model {default!r} is not an entry", "fix `default`")
    return Registry(models, default)


def _read(path: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    data = read_toml(path)
    _check_plain_text(path, data, "")
    unknown = set(data) - {"default", "models"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {sorted(unknown)[0]!r}",
            "the top level has `default` and `models`",
        )
    default = data.get("default")
    if default is not None and (not isinstance(default, str) or not _KEY.fullmatch(default)):
        raise ConfigError(
            f"{path}: `default` must be a model name", 'e.g. default = "llava-1.5-7b"'
        )
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: `models` must be a table", "write [models.NAME] sections")
    for key, table in models.items():
        if not _KEY.fullmatch(key):
            raise ConfigError(
                f"{path}: bad entry name {key!r}", "use lowercase letters, digits, '.', '_' and '-'"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: models.{key} must be a table")
        _check_keys(path, key, table)
    return models, default


def _check_plain_text(path: Path, value: Any, where: str) -> None:
    """Every key and string in the file, at any depth, free of control and bidi characters."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            here = f"{where}.{escaped(key)}" if where else escaped(key)
            unsafe = unsafe_character(key)
            if unsafe is not None:
                raise _unsafe(path, here, unsafe, "its name")
            items.append((here, inner))
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", inner) for i, inner in enumerate(value)]
    elif isinstance(value, str):
        unsafe = unsafe_character(value)
        if unsafe is not None:
            raise _unsafe(path, where, unsafe, "its value")
    for here, inner in items:
        _check_plain_text(path, inner, here)


def _unsafe(path: Path, where: str, unsafe: str, part: str) -> ConfigError:
    return ConfigError(
        f"{path}: {where}: {part} holds {unsafe}",
        "names and text in a registry are plain: remove control and bidi characters",
    )


def _check_keys(path: Path, key: str, table: Mapping[str, Any]) -> None:
    for name in table:
        if name not in _ENTRY_KEYS:
            raise _bad(path, key, name, "unknown key", "allowed: " + ", ".join(sorted(_ENTRY_KEYS)))


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in over.items():
        if name == "quants" and isinstance(value, dict) and isinstance(base.get(name), dict):
            merged[name] = {**base[name], **value}
        else:
            merged[name] = value
    return merged


def _entry(key: str, t: Mapping[str, Any], path: Path) -> ModelSpec:
    for name in _REQUIRED:
        if name not in t:
            raise _bad(path, key, name, "missing", "every entry needs " + ", ".join(_REQUIRED))
    quants_table = t.get("quants", {})
    if ("quants" in t) != ("mmproj" in t):
        raise _bad(
            path,
            key,
            "quants" if "mmproj" in t else "mmproj",
            "missing",
            "name both the quants and the mmproj, or neither (files from the hub's listing)",
        )
    if not isinstance(quants_table, dict) or ("quants" in t and not quants_table):
        raise _bad(path, key, "quants", "must hold at least one [quants.NAME] table")
    quants = {}
    for qname, qtable in quants_table.items():
        if not _QUANT.fullmatch(qname):
            raise _bad(path, key, f"quants.{qname}", "bad quant name", "e.g. Q4_K_M")
        quants[qname] = _file(path, key, f"quants.{qname}", qtable)
    default_quant = _text(path, key, t, "default_quant")
    if quants and default_quant not in quants:
        raise _bad(path, key, "default_quant", f"{default_quant!r} is not one of its quants")
    repo = _text(path, key, t, "repo")
    if not is_repo_id(repo):
        raise _bad(
            path,
            key,
            "repo",
            f"{repo!r} is not a hub repo id",
            "write OWNER/NAME: letters, digits, '.', '_' and '-', no '--' or '..'",
        )
    revision = _text(path, key, t, "revision")
    if not _REVISION.fullmatch(revision) or ".." in revision:
        raise _bad(path, key, "revision", f"{revision!r} is not a commit or branch name")
    chat_format = _text(path, key, t, "chat_format")
    # "gguf", "llava", or a llama.cpp built-in name: spelled like a key here, and checked
    # against the engine's list before a pull (modelref.check_chat_format).
    if not _KEY.fullmatch(chat_format):
        raise _bad(
            path,
            key,
            "chat_format",
            f"{chat_format!r}",
            "use gguf, llava or a llama.cpp built-in name (vicuna, mistral-v7, …)",
        )
    context_length = t["context_length"]
    if (
        isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or context_length < 1
    ):
        raise _bad(path, key, "context_length", "must be a positive integer")
    download = t.get("download")
    if download is not None and (
        isinstance(download, bool) or not isinstance(download, int) or download <= 0
    ):
        raise _bad(path, key, "download", "must be a positive number of bytes")
    aliases = t.get("aliases", [])
    if not isinstance(aliases, list) or not all(
        isinstance(a, str) and _KEY.fullmatch(a) for a in aliases
    ):
        raise _bad(path, key, "aliases", "must be a list of lowercase names")
    return ModelSpec(
        key=key,
        name=_text(path, key, t, "name"),
        description=_text(path, key, t, "description"),
        repo=repo,
        revision=revision,
        license=_text(path, key, t, "license"),
        parameters=_text(path, key, t, "parameters"),
        context_length=context_length,
        chat_format=chat_format,
        default_quant=default_quant,
        quants=quants,
        mmproj=_file(path, key, "mmproj", t["mmproj"]) if "mmproj" in t else FROM_LISTING,
        aliases=tuple(aliases),
        source=path,
        download=download,
    )


def _file(path: Path, key: str, where: str, table: Any) -> FileSpec:
    if not isinstance(table, dict):
        raise _bad(path, key, where, "must be a table with file, size, sha256")
    for name in table:
        if name not in _FILE_KEYS:
            raise _bad(path, key, f"{where}.{name}", "unknown key", "allowed: file, size, sha256")
    name = table.get("file")
    if not isinstance(name, str) or not name:
        raise _bad(path, key, f"{where}.file", "missing", "give the file's name in the repo")
    problem = file_name_problem(name)
    if problem is not None:
        raise _bad(path, key, f"{where}.file", problem, "give the plain name: no folders or '..'")
    size = table.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise _bad(path, key, f"{where}.size", "must be a positive number of bytes")
    sha = table.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not is_sha256(sha)):
        raise _bad(
            path, key, f"{where}.sha256", "must be 64 lowercase hex digits", "or leave it out"
        )
    return FileSpec(name, size, sha)


def _text(path: Path, key: str, table: Mapping[str, Any], name: str) -> str:
    value = table[name]
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, key, name, "must be a non-empty string")
    return value


def _bad(path: Path, key: str, name: str, problem: str, hint: str = "") -> ConfigError:
    return ConfigError(f"{path}: models.{key}.{name}: {problem}", hint or "fix or remove it")


def _check_names(models: Mapping[str, ModelSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in models.values():
        for alias in spec.aliases:
            owner = seen.get(alias) or (alias if alias in models else None)
            if owner is not None and owner != spec.key:
                raise _bad(
                    spec.source or builtin_file(),
                    spec.key,
                    "aliases",
                    f"{alias!r} already names {owner}",
                )
            seen[alias] = spec.key

"""Where things live, and the settings read from the environment and ``config.toml``.

Precedence for every setting: command-line flag > ``LLAVA_*`` environment variable > config
file > default. Typer reads the environment for each option; everything else llava takes from
the environment is read here, and only here, into one ``Environment`` record: once per command
(``guard.guarded`` opens ``reading_once``). Commands and the modules below them reach that
record through ``environment()`` (or take it as an argument, as ``PrefixCache.default``
does), so a command sees one environment from start to end, and nothing else reads it.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import BadInput, ConfigError

DEFAULT_CTX = 4096
DEFAULT_PROMPT = "Describe this image."
SETTINGS_MAX_BYTES = 1 << 20  # config.toml and models.toml: a registry of thousands fits
HUB_SECONDS = ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT")


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    data_dir: Path
    cache_dir: Path


@dataclass(frozen=True)
class Environment:
    """What llava takes from the environment, read once. Values that can be wrong
    (``LLAVA_CACHE_SIZE``, the hub's timeouts) are kept as written and checked where they
    are used: a bad cache size must not stop ``llava list``."""

    # Where llava's files and the pulled models live; None when that depends on a home folder
    # that cannot be found (no HOME, no passwd entry): an error only for what needs them.
    found_paths: Paths | None  # LLAVA_HOME, else the platform's folders (XDG_*, LOCALAPPDATA)
    found_hub_cache: Path | None  # HF_HUB_CACHE, HF_HOME, …, as huggingface_hub finds it
    debug: bool  # LLAVA_DEBUG: tracebacks instead of one line, llama.cpp's debug logs
    hub_offline: bool  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE): as --offline
    hf_token_set: bool  # HF_TOKEN is set (its value is never kept: it must not leak)
    cache_size: str | None  # LLAVA_CACHE_SIZE as written (cache.parse_size reads it)
    hub_timeouts: tuple[tuple[str, str], ...]  # (name, text) of the HUB_SECONDS that are set
    dumb_terminal: bool  # TERM=dumb: no escape sequences at all
    no_color: bool  # NO_COLOR set and not empty
    columns: int | None  # COLUMNS, when a positive number
    ggml_no_backtrace: str | None  # the user's own GGML_NO_BACKTRACE, before llava sets it

    @property
    def paths(self) -> Paths:
        if self.found_paths is None:
            raise _no_home("llava's files")
        return self.found_paths

    @property
    def hub_cache(self) -> Path:
        if self.found_hub_cache is None:
            raise _no_home("the hub cache")
        return self.found_hub_cache

    @property
    def config_file(self) -> Path:
        return self.paths.config_dir / "config.toml"

    def offline(self, flag: bool) -> bool:
        """Whether to stay off the network: ``--offline``, or ``HF_HUB_OFFLINE``. The one
        place the two meet."""
        return flag or self.hub_offline

    def check_hub_timeouts(self) -> None:
        """huggingface_hub reads its timeouts with ``int()`` when it is imported, so a bad
        value would be a crash there: check them first, with a clear range."""
        for name, text in self.hub_timeouts:
            try:
                seconds = int(text)
            except ValueError:
                seconds = -1
            if not 1 <= seconds <= 86_400:
                raise ConfigError(
                    f"{name}={text!r} is not a whole number of seconds from 1 to 86400",
                    f"e.g. {name}=30, or unset it for the default (10)",
                )


def read_environment(env: Mapping[str, str] | None = None) -> Environment:
    """The environment (``os.environ`` unless another mapping is given) as one record. Never
    fails: what can be wrong is checked where it is used."""
    env = os.environ if env is None else env
    columns = env.get("COLUMNS", "")
    return Environment(
        found_paths=_unless_homeless(lambda: _paths(env)),
        found_hub_cache=_unless_homeless(lambda: _hub_cache(env)),
        debug=switched_on(env.get("LLAVA_DEBUG")),
        hub_offline=_hub_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")),
        hf_token_set=bool(env.get("HF_TOKEN")),
        cache_size=env.get("LLAVA_CACHE_SIZE") or None,
        hub_timeouts=tuple((name, env[name]) for name in HUB_SECONDS if name in env),
        dumb_terminal=env.get("TERM", "") == "dumb",
        no_color=bool(env.get("NO_COLOR")),
        columns=int(columns) if columns.isdecimal() and int(columns) > 0 else None,
        ggml_no_backtrace=env.get("GGML_NO_BACKTRACE"),
    )


TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def secrets(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secret values in the environment (the hub tokens), read only when text is about to
    be printed so that they can be blotted out of it (``text.redacted``); never kept."""
    env = os.environ if env is None else env
    return tuple(value for name in TOKEN_VARIABLES if len(value := env.get(name, "")) >= 8)


Folder = TypeVar("Folder", Paths, Path)


def _unless_homeless(where: Callable[[], Folder]) -> Folder | None:
    try:
        return where()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        return None


def _no_home(what: str) -> ConfigError:
    return ConfigError(
        f"cannot find your home folder, where {what} live by default",
        "set HOME, or LLAVA_HOME (and HF_HOME) to a folder of your choice",
    )


_OFF = frozenset(("", "0", "false", "no", "off"))


def switched_on(value: str | None) -> bool:
    """A switch of ours (``LLAVA_DEBUG``): on unless unset, empty, or 0/false/no/off in any
    case."""
    return (value or "").strip().lower() not in _OFF


def _hub_true(value: str | None) -> bool:
    """huggingface_hub's own reading of its switches (``HF_HUB_OFFLINE``): on only for
    1/on/yes/true, so that llava and the hub library always agree."""
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _paths(env: Mapping[str, str]) -> Paths:
    if env.get("LLAVA_HOME"):  # everything lives under it
        home = Path(env["LLAVA_HOME"]).expanduser()
        return Paths(home, home, home / "cache")
    user = Path.home()
    if sys.platform == "darwin":
        base = user / "Library" / "Application Support" / "llava"
        return Paths(base, base, user / "Library" / "Caches" / "llava")
    if sys.platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or user / "AppData" / "Local") / "llava"
        return Paths(base, base, base / "cache")
    return Paths(
        Path(env.get("XDG_CONFIG_HOME") or user / ".config") / "llava",
        Path(env.get("XDG_DATA_HOME") or user / ".local" / "share") / "llava",
        Path(env.get("XDG_CACHE_HOME") or user / ".cache") / "llava",
    )


def _hub_cache(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, where pulled models live (shared with other tools).

    Same rules as huggingface_hub: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
    ``$XDG_CACHE_HOME``/huggingface/hub, else ~/.cache/huggingface/hub.
    """
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


# The record of the command that runs now (``reading_once``); empty outside a command.
_RUNNING: list[Environment] = []


@contextmanager
def reading_once() -> Iterator[Environment]:
    """While a command runs, ``environment()`` is the record read as it started. A command
    run inside another (``main`` guards the whole app, each command itself) shares it."""
    if _RUNNING:
        yield _RUNNING[-1]
        return
    _RUNNING.append(read_environment())
    try:
        yield _RUNNING[-1]
    finally:
        _RUNNING.clear()


def environment() -> Environment:
    """The running command's record; outside a command (a test, a library call), the
    environment as it is now."""
    return _RUNNING[-1] if _RUNNING else read_environment()


def paths() -> Paths:
    return environment().paths


def debug_enabled() -> bool:
    return environment().debug


CONFIG_KEYS = {
    "model": "the model used when none is named (NAME[:QUANT], OWNER/REPO or a path)",
    "rpc": 'the llava rpc-servers to use when --rpc names none: ["HOST:PORT", …]',
}
LIST_KEYS = {"rpc"}  # lists of strings, handed on comma-joined


def read_toml(path: Path) -> dict[str, Any]:
    """A settings file as a dict; unreadable or malformed is a ConfigError naming it."""
    from .files import read_regular

    try:
        return tomllib.loads(read_regular(path, SETTINGS_MAX_BYTES, "settings file").decode())
    except BadInput as exc:  # a FIFO, a device, a huge file: the user's settings are wrong
        raise ConfigError(exc.message, exc.hint) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text", "fix its encoding") from exc
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the syntax") from exc


def settings() -> dict[str, str]:
    """``config.toml``, checked strictly: unknown keys and wrong types are errors."""
    path = environment().config_file
    if not os.path.lexists(path):
        return {}
    data = read_toml(path)
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key!r}", "known keys: " + ", ".join(sorted(CONFIG_KEYS))
            )
        if key in LIST_KEYS and isinstance(value, list):
            if not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise ConfigError(
                    f"{path}: {key} must be a list of non-empty strings", CONFIG_KEYS[key]
                )
            data[key] = ",".join(value)
        elif not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}: {key} must be a non-empty string", CONFIG_KEYS[key])
    return {key: str(value) for key, value in data.items()}

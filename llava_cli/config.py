"""Where things live, and defaults read from the environment and ``config.toml``.

Precedence for every setting: command-line flag > ``LLAVA_*`` environment variable > config
file > default. (Typer reads the environment for each option; this module holds the paths, the
config file and shared defaults.)
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput, ConfigError

DEFAULT_CTX = 4096
DEFAULT_PROMPT = "Describe this image."
SETTINGS_MAX_BYTES = 1 << 20  # config.toml and models.toml: a registry of thousands fits


@dataclass(frozen=True)
class Paths:
    home: Path | None  # LLAVA_HOME, when set: everything lives under it
    config_dir: Path
    data_dir: Path
    cache_dir: Path


def paths(env: dict[str, str] | None = None) -> Paths:
    env = dict(os.environ) if env is None else env
    if env.get("LLAVA_HOME"):
        home = Path(env["LLAVA_HOME"]).expanduser()
        return Paths(home, home, home, home / "cache")
    user = Path.home()
    if sys.platform == "darwin":
        base = user / "Library" / "Application Support" / "llava"
        return Paths(None, base, base, user / "Library" / "Caches" / "llava")
    if sys.platform == "win32":
        base = Path(env.get("LOCALAPPDATA", user / "AppData" / "Local")) / "llava"
        return Paths(None, base, base, base / "cache")
    return Paths(
        None,
        Path(env.get("XDG_CONFIG_HOME") or user / ".config") / "llava",
        Path(env.get("XDG_DATA_HOME") or user / ".local" / "share") / "llava",
        Path(env.get("XDG_CACHE_HOME") or user / ".cache") / "llava",
    )


def debug_enabled() -> bool:
    return os.environ.get("LLAVA_DEBUG", "") not in ("", "0", "false", "no")


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``), as huggingface_hub reads it."""
    return _true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


HUB_SECONDS = ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT")


def check_hub_environment() -> None:
    """huggingface_hub reads its timeouts with ``int()`` when it is imported, so a bad value
    would be a crash there: check them first, with a clear range."""
    for name in HUB_SECONDS:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            seconds = int(text)
        except ValueError:
            seconds = -1
        if not 1 <= seconds <= 86_400:
            raise ConfigError(
                f"{name}={text!r} is not a whole number of seconds from 1 to 86400",
                f"e.g. {name}=30, or unset it for the default (10)",
            )


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, where pulled models live (shared with other tools).

    Same rules as huggingface_hub: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
    ``$XDG_CACHE_HOME``/huggingface/hub, else ~/.cache/huggingface/hub.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


CONFIG_KEYS = {"model": "the model used when none is named (NAME[:QUANT], OWNER/REPO or a path)"}


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


def config_file() -> Path:
    return paths().config_dir / "config.toml"


def settings() -> dict[str, str]:
    """``config.toml``, checked strictly: unknown keys and wrong types are errors."""
    path = config_file()
    if not os.path.lexists(path):
        return {}
    data = read_toml(path)
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key!r}", "known keys: " + ", ".join(sorted(CONFIG_KEYS))
            )
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}: {key} must be a non-empty string", CONFIG_KEYS[key])
    return {key: str(value) for key, value in data.items()}

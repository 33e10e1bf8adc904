"""Where things live, and defaults read from the environment.

Precedence for every setting: command-line flag > ``LLAVA_*`` environment variable > default.
(Typer reads the environment for each option; this module holds the paths and shared defaults.)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CTX = 4096
DEFAULT_PROMPT = "Describe this image."


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

"""Shared fixtures: tiny real models built at test time, image makers, a CLI runner."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from llava_cli import synthetic

if TYPE_CHECKING:
    from llava_cli.conversation import LoadedModel
    from llava_cli.images import PreparedImage

REPO = Path(__file__).resolve().parents[1]

# System tools that tests drive, each with the Debian package that has it (`make help` names
# them too). A test marked `@pytest.mark.needs("tmux")` skips, naming the package, without it.
SYSTEM_TOOLS = {"tmux": "tmux"}


@pytest.hookimpl(tryfirst=True)  # before any fixture builds a model for a test that will skip
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        for tool in mark.args:
            if shutil.which(tool) is None:
                package = SYSTEM_TOOLS[tool]
                pytest.skip(f"needs {tool}, not on PATH (Debian: apt-get install {package})")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's home, config or real hub."""
    for name in list(os.environ):
        if name.startswith("LLAVA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "llava-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Even a test that turns offline mode off never reaches the real hub: port 9 is closed.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")


@pytest.fixture(scope="session")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> synthetic.ModelPair:
    return synthetic.build_colour_oracle(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="session")
def random_pair(tmp_path_factory: pytest.TempPathFactory) -> synthetic.ModelPair:
    return synthetic.build_random(tmp_path_factory.mktemp("random"), seed=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of small solid-colour PNGs: red, green, blue, grey, white."""
    d = tmp_path_factory.mktemp("images")
    colours = {
        "red": (230, 30, 30),
        "green": (30, 200, 40),
        "blue": (20, 40, 220),
        "grey": (128, 128, 128),
        "white": (255, 255, 255),
    }
    for name, rgb in colours.items():
        Image.new("RGB", (48, 40), rgb).save(d / f"{name}.png")
    return d


def llava(
    *args: str | Path,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real CLI in a subprocess (stdout, stderr and the exit code, all separate)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llava_cli", *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, or lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw_rows))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "work"
    d.mkdir()
    yield d


@pytest.fixture(scope="module")
def random_model(random_pair: synthetic.ModelPair) -> Iterator[LoadedModel]:
    """The random pair loaded once per test module (imported lazily: llama.cpp loads only
    for the modules that use it)."""
    from llava_cli.conversation import open_model
    from llava_cli.options import RuntimeOptions

    loaded = open_model(random_pair.model, random_pair.mmproj, RuntimeOptions(ctx=1024))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def oracle_model(oracle: synthetic.ModelPair) -> Iterator[LoadedModel]:
    from llava_cli.conversation import open_model
    from llava_cli.options import RuntimeOptions

    loaded = open_model(oracle.model, oracle.mmproj, RuntimeOptions(ctx=2048))
    yield loaded
    loaded.close()


def pic(images: Path, name: str) -> PreparedImage:
    """One of the ``images`` fixture's pictures, loaded."""
    from llava_cli.images import load

    return load(str(images / f"{name}.png"))

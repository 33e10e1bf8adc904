"""What a run pays before llama.cpp works, cut without changing what a run does: Typer's
values without pydantic, llama_cpp without its high-level half, the registry read once per
command, and the first image decoded while the model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer._click import Context
from typer._coercion import build_runtime_param

from llava_cli import cli, images, modelref, registry, synthetic
from llava_cli.config import reading_once
from llava_cli.errors import ImageError
from tests.conftest import llava


def _commands(command: Any, path: str = "llava") -> list[tuple[str, Any]]:
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, f"{path} {name}")
    return found


SAMPLES: dict[Any, list[Any]] = {
    str: [None, "x", "  two words  ", "caf\u00e9", "\udcff", ""],
    list[str]: [None, (), ("a.png", "b c"), ["one"]],
    int: [None, 0, 40, -1, "0", "7", "-3", "2147483648", "007", " 4", "1_000", "4.0", "x"],
    float: [None, 0.2, 1, "0.5", "1", "-2.25", "1e3", ".5", "inf", "0.30000000000000004"],
    bool: [None, True, False, "1", "no"],
}


def _coerced(runtime: Any, value: Any, param: Any, ctx: Context) -> tuple[str, Any]:
    try:
        result = runtime.coerce(value, param=param, ctx=ctx)
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    return type(result).__name__, result


def test_plain_values_are_what_typers_own_coercion_gives() -> None:
    """Every parameter of every command, with values plain and not: the shortcut's result (or
    error) is the one Typer's pydantic adapter gives."""
    command = cli.with_plain_values(typer.main.get_command(cli.app))
    checked = 0
    for path, cmd in _commands(command):
        ctx = Context(cmd, info_name=path)
        for param in cmd.params:
            descriptor = param.type_descriptor
            typer_own = build_runtime_param(descriptor)
            for value in SAMPLES[descriptor.annotation]:
                ours = _coerced(param._runtime_param, value, param, ctx)
                assert ours == _coerced(typer_own, value, param, ctx), (path, param.name, value)
                checked += 1
    assert checked > 300


def test_a_bad_number_is_still_refused_in_typers_words() -> None:
    """A value the shortcut leaves alone still gets Typer's message (exit 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "llava_cli", "ask", "x.png", "-p", "q", "--top-k", "many"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "Error: invalid value for '--top-k': must be a whole number — see llava ask --help\n"
    )


def test_llama_cpp_is_bound_without_its_high_level_half() -> None:
    """The engine sees llama_cpp's C bindings and version without numpy or jinja2 loading;
    anything else of the package (the Llama class) still works, loading them then."""
    script = textwrap.dedent(
        """
        import sys
        from importlib.metadata import version
        import llava_cli.engine.model
        import llama_cpp
        names = ("numpy", "jinja2", "llama_cpp.llama")
        heavy = lambda: sorted(m for m in names if m in sys.modules)
        assert llama_cpp.llama_backend_init is not None and llama_cpp.mtmd_cpp is not None
        assert llama_cpp.__version__ == version("llama_cpp_python"), llama_cpp.__version__
        print(heavy())
        print(llama_cpp.Llama.__name__, heavy())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "Llama ['jinja2', 'llama_cpp.llama', 'numpy']"]


@pytest.mark.slow
def test_an_ask_imports_nothing_it_does_not_use(
    oracle: synthetic.ModelPair, images: Path, tmp_path: Path
) -> None:
    """A whole ``ask`` on named files: no pydantic (Typer's coercion), no numpy or jinja2
    (llama_cpp's high-level half), no hub client."""
    script = textwrap.dedent(
        """
        import atexit, sys
        from llava_cli import cli
        unused = ("pydantic", "numpy", "jinja2", "huggingface_hub", "llava_cli.hub", "ssl")
        atexit.register(lambda: print(sorted(m for m in unused if m in sys.modules)))
        sys.argv = ["llava", *sys.argv[1:]]
        cli.main()
        """
    )
    args = [images / "red.png", "--model", oracle.model, "--mmproj", oracle.mmproj, "-p", "Q"]
    result = subprocess.run(
        [sys.executable, "-c", script, "ask", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "red\n[]\n"


def test_the_registry_is_read_once_per_command() -> None:
    with reading_once():
        first = modelref._registry()
        assert modelref._registry() is first
        assert first == registry.load()
    with reading_once():
        assert modelref._registry() is not first  # the next command reads the files again
    assert modelref._registry() is not modelref._registry()  # outside a command, each time


def _png(tmp_path: Path, name: str, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path = tmp_path / name
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def _truncated_png(tmp_path: Path) -> Path:
    full = tmp_path / "noise.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return cut


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_an_image_loaded_in_the_background_is_the_one_load_gives(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"picture.{fmt.lower()}"
    Image.new("RGB", (40, 30), (10, 200, 90)).save(path, format=fmt)
    assert images._quiet_decoder(path.read_bytes()) == (fmt != "TIFF")
    assert images.BackgroundLoad(str(path))() == images.load(str(path))


def _failure(action: Any) -> str:
    with pytest.raises(ImageError) as caught:
        action()
    return caught.value.one_line()


@pytest.mark.parametrize("case", ["truncated", "missing", "too many bytes", "too many pixels"])
def test_a_background_load_fails_as_load_does(tmp_path: Path, case: str) -> None:
    source = str(_truncated_png(tmp_path) if case == "truncated" else _png(tmp_path, "a.png"))
    limits: dict[str, int] = {}
    if case == "missing":
        source = str(tmp_path / "nope.png")
    elif case == "too many bytes":
        limits = {"max_bytes": 10}
    elif case == "too many pixels":
        limits = {"max_pixels": 100}
    expected = _failure(lambda: images.load(source, **limits))
    assert _failure(images.BackgroundLoad(source, **limits)) == expected


def test_a_tiff_decoded_on_the_callers_thread_still_keeps_libtiff_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """libtiff's complaints (here: a compression this build lacks) stay off stderr and name
    the cause, as with ``load``."""
    hopper = Path(__file__).parent / "pillow_images" / "hopper_webp.tif"
    expected = _failure(lambda: images.load(str(hopper)))
    assert _failure(images.BackgroundLoad(str(hopper))) == expected
    assert capfd.readouterr().err == ""
    assert "WEBP compression support is not configured" in expected


@pytest.mark.slow
def test_a_bad_image_still_wins_over_a_bad_model(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    """The image is decoded while the model loads; when both fail, the image's error is the
    one said (exit 4), as when the model was loaded only after the image was decoded."""
    cut = _truncated_png(tmp_path)
    cut_model = tmp_path / "cut-model.gguf"
    cut_model.write_bytes(oracle.model.read_bytes()[:5000])
    result = llava("ask", cut, "-p", "Q", "--model", cut_model, "--mmproj", oracle.mmproj)
    assert result.returncode == 4
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {cut} is truncated or corrupt"), lines


@pytest.mark.slow
def test_a_tiff_is_answered_and_a_bad_model_still_fails_with_a_good_image(
    oracle: synthetic.ModelPair, tmp_path: Path
) -> None:
    tiff = tmp_path / "blue.tiff"
    Image.new("RGB", (48, 40), (20, 40, 220)).save(tiff)
    model = ["--model", str(oracle.model), "--mmproj", str(oracle.mmproj)]
    result = llava("ask", tiff, "-p", "Q", *model)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"blue\n", b"")

    cut_model = tmp_path / "cut-model.gguf"
    cut_model.write_bytes(oracle.model.read_bytes()[:5000])
    red = _png(tmp_path, "red.png")
    failed = llava("ask", red, "-p", "Q", "--model", cut_model, "--mmproj", oracle.mmproj)
    assert failed.returncode == 4 and failed.stdout == b""
    lines = failed.stderr.decode().splitlines()
    assert len(lines) == 1 and "cut-model.gguf" in lines[0], lines


def test_the_whole_llama_cpp_package_leaves_llavas_log_routing_in_place(tmp_path: Path) -> None:
    """Running llama_cpp's own __init__ late (a name only it defines) sets its own log
    callback; llava's routing comes back: llama.cpp's lines stay off stderr and its last
    error is still ours to quote."""
    script = textwrap.dedent(
        """
        import sys
        import llava_cli.engine
        import llama_cpp
        from llava_cli.engine import native
        native.init(False)
        llama_cpp.Llama  # the package's real __init__ runs now
        params = llama_cpp.llama_model_default_params()
        assert not llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
        print(native.LOGS.last_error())
        """
    )
    missing = tmp_path / "missing.gguf"
    result = subprocess.run(
        [sys.executable, "-c", script, str(missing)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip(), "llama.cpp's error reached llava's log routing"


@pytest.mark.slow
def test_a_load_stops_when_the_image_beside_it_has_failed(oracle: synthetic.ModelPair) -> None:
    """What ask's runner relies on: a model load asked to give up fails at once (llama.cpp's
    progress callback says stop), as it does on Ctrl-C."""
    from llava_cli.engine.model import Engine, LoadOptions
    from llava_cli.engine.native import INTERRUPTS
    from llava_cli.errors import ModelFileError

    with INTERRUPTS.loading_unless(lambda: True), pytest.raises(ModelFileError):
        Engine.load(LoadOptions(model=oracle.model, mmproj=oracle.mmproj))
    assert INTERRUPTS.give_up() is False  # left as it was: the next load goes ahead
    Engine.load(LoadOptions(model=oracle.model, mmproj=oracle.mmproj)).close()

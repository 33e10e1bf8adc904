"""The package's imports, read from its source: every third-party package it imports is declared
in pyproject.toml, each stays behind the one module (or package) that owns it, and llava's own
modules depend downwards only, from the command line to the errors.

Every import counts, wherever it is written: at the top, inside a function (the lazy imports
that keep ``llava --help`` fast), under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llava_cli"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. llava_cli.hub.remote
    line: int
    name: str  # what it imports, absolute: llava_cli.store, huggingface_hub.errors, os.path

    @property
    def top(self) -> str:
        return self.name.partition(".")[0]

    def __str__(self) -> str:
        path = module_path(self.module).relative_to(REPO)
        return f"{path}:{self.line} imports {self.name}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(module: str) -> Path:
    base = REPO.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def imports_of(module: str) -> Iterator[Import]:
    """Every import the module writes, resolved to absolute names. ``from . import x`` names the
    submodule ``x`` when there is one, else the package."""
    path = module_path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield Import(module, node.lineno, submodule if submodule in MODULES else base)


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]
THIRD_PARTY = [
    imp for imp in ALL_IMPORTS if imp.top not in sys.stdlib_module_names and imp.top != "llava_cli"
]


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503


def declared() -> dict[str, Requirement]:
    """pyproject.toml's [project] dependencies, by normalized distribution name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    return {normalized(r.name): r for r in requirements}


@functools.cache
def installed_packages() -> Mapping[str, list[str]]:
    """Top-level import name -> the distributions that provide it (slow: read once)."""
    return importlib.metadata.packages_distributions()


def distributions_of(top: str) -> list[str]:
    return [normalized(d) for d in installed_packages().get(top, [])]


def test_the_walk_sees_lazy_relative_and_type_checking_imports() -> None:
    """Else every check below would pass on nothing."""
    remote = {i.name for i in imports_of("llava_cli.hub.remote")}
    assert "huggingface_hub" in remote  # inside list_files()
    assert {"llava_cli.hub.failures", "llava_cli.errors"} <= remote  # from .failures, ..errors
    assert "numpy.typing" in {i.name for i in imports_of("llava_cli.synthetic")}  # TYPE_CHECKING
    assert len(MODULES) > 40 and len(THIRD_PARTY) > 30


def test_every_third_party_import_is_declared() -> None:
    wanted = declared()
    problems = []
    for imp in THIRD_PARTY:
        found = distributions_of(imp.top)
        if not found:
            problems.append(f"{imp}: no installed distribution provides {imp.top!r}")
        elif not any(d in wanted for d in found):
            problems.append(
                f"{imp}: its distribution {' or '.join(found)} is not in pyproject.toml's"
                " [project] dependencies (it may only arrive through another package): declare it"
            )
    assert problems == [], "\n".join(problems)


def test_every_declared_dependency_is_imported() -> None:
    used = {d for imp in THIRD_PARTY for d in distributions_of(imp.top)}
    unused = sorted(set(declared()) - used)
    assert unused == [], f"declared in pyproject.toml but imported by no module: {unused}"


def test_the_installed_versions_are_inside_the_declared_ranges() -> None:
    """The ranges say what was tested: the versions this suite runs against are in them."""
    outside = []
    for name, requirement in declared().items():
        version = importlib.metadata.version(name)
        if not requirement.specifier.contains(version, prereleases=True):
            outside.append(f"{requirement} excludes the installed {name} {version}")
    assert outside == [], "\n".join(outside)


# Which of llava's modules may import each third-party package: a module, or a package with
# everything in it. The reasons are the design, in one line each.
OWNERS: dict[str, tuple[tuple[str, ...], str]] = {
    "llama_cpp": (("llava_cli.engine",), "the engine is the only code that talks to llama.cpp"),
    "huggingface_hub": (("llava_cli.hub",), "the hub package turns the hub's errors into ours"),
    "httpx2": (("llava_cli.hub",), "huggingface_hub's HTTP client: its errors are the hub's"),
    "filelock": (("llava_cli.hub",), "one lock per blob, shared with huggingface_hub"),
    "typer": (
        ("llava_cli.cli", "llava_cli.cli_options", "llava_cli.guard", "llava_cli.commands"),
        "the command line is parsed at the top; nothing below the commands knows of it",
    ),
    "rich": (("llava_cli.render",), "all terminal output goes through render"),
    "markdown_it": (("llava_cli.render",), "render parses answers as Markdown, HTML off"),
    "prompt_toolkit": (("llava_cli.repl",), "the chat prompt lives in repl"),
    "PIL": (
        ("llava_cli.images", "llava_cli.commands.doctor"),
        "images is the only decoder; doctor only draws (encodes) its self-test pictures",
    ),
    "numpy": (
        ("llava_cli.engine", "llava_cli.synthetic"),
        "llama.cpp's arrays in the engine; the synthetic models' weights",
    ),
    "gguf": (("llava_cli.synthetic",), "writes the synthetic models (gguf_file reads GGUF itself)"),
    "jinja2": (("llava_cli.template_sandbox",), "chat templates run only inside the sandbox"),
    "jsonschema": (("llava_cli.structured",), "structured answers are checked in one place"),
}


# Allowed, though not used today: the commands and guard may need typer (typer.Exit, prompts).
UNUSED_ALLOWANCES = {("typer", "llava_cli.guard"), ("typer", "llava_cli.commands")}


def within(module: str, owners: tuple[str, ...]) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


def ownership_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        if imp.top not in OWNERS:
            problems.append(f"{imp}: {imp.top} has no entry in OWNERS: say who may import it")
            continue
        owners, reason = OWNERS[imp.top]
        if not within(imp.module, owners):
            problems.append(f"{imp}: only {', '.join(owners)} may import {imp.top} ({reason})")
    return problems


def test_each_third_party_package_stays_with_its_owner() -> None:
    problems = ownership_problems(THIRD_PARTY)
    assert problems == [], "\n".join(problems)


def test_an_import_outside_its_owner_is_named() -> None:
    found = ownership_problems([Import("llava_cli.images", 7, "rich.console")])
    assert found == [
        "llava_cli/images.py:7 imports rich.console: only llava_cli.render may import rich"
        " (all terminal output goes through render)"
    ]
    assert ownership_problems([Import("llava_cli.engine.model", 3, "llama_cpp.mtmd_cpp")]) == []
    assert ownership_problems([Import("llava_cli.hub.remote", 3, "requests")]) == [
        "llava_cli/hub/remote.py:3 imports requests: requests has no entry in OWNERS:"
        " say who may import it"
    ]


def test_every_owner_still_imports_its_package() -> None:
    """An allowance nobody uses is a door left open: remove it from OWNERS."""
    stale = [
        f"{owner} no longer imports {top}: remove it from OWNERS[{top!r}]"
        for top, (owners, _) in OWNERS.items()
        for owner in owners
        if (top, owner) not in UNUSED_ALLOWANCES
        and not any(i.top == top and within(i.module, (owner,)) for i in THIRD_PARTY)
    ]
    assert stale == [], "\n".join(stale)


# llava's own modules, top to bottom: a module imports from its own layer or the ones below,
# never above. (The picture: cli → commands → {conversation, modelref} → {engine, hub,
# registry, store, cache} → {templates, images, render, config} → {errors, options}.)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "the command line",
        (
            "llava_cli.__main__",
            "llava_cli.cli",
            "llava_cli.cli_options",
            "llava_cli.guard",
            "llava_cli.commands",
        ),
    ),
    (
        "the chat's prompt, slash commands and transcripts",
        ("llava_cli.repl", "llava_cli.slash", "llava_cli.transcript"),
    ),
    (
        "conversations and model references",
        ("llava_cli.conversation", "llava_cli.modelref", "llava_cli.structured"),
    ),
    (
        "the engine, the hub, what is on disk",
        (
            "llava_cli.engine",
            "llava_cli.hub",
            "llava_cli.registry",
            "llava_cli.store",
            "llava_cli.cache",
        ),
    ),
    (
        "formats, files and the terminal",
        (
            "llava_cli.templates",
            "llava_cli.template_sandbox",
            "llava_cli.thinking",
            "llava_cli.textstream",
            "llava_cli.images",
            "llava_cli.files",
            "llava_cli.gguf_file",
            "llava_cli.gguf_checks",
            "llava_cli.memory",
            "llava_cli.gbnf",
            "llava_cli.gbnf_rules",
            "llava_cli.synthetic",
            "llava_cli.render",
            "llava_cli.terminal",
            "llava_cli.config",
        ),
    ),
    (
        "errors, options and plain helpers",
        (
            "llava_cli",  # the package itself: __version__ only
            "llava_cli.errors",
            "llava_cli.options",
            "llava_cli.text",
            "llava_cli.units",
            "llava_cli.digests",
        ),
    ),
]


def layer_of(module: str) -> int | None:
    """The index of the layer that lists the module or its package (``llava_cli`` itself
    stands for the package's ``__init__`` only)."""
    for index, (_, members) in enumerate(LAYERS):
        packages = [m for m in members if m != "llava_cli"]
        if module in members or any(module.startswith(p + ".") for p in packages):
            return index
    return None


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if layer_of(m) is None]
    assert missing == [], (
        f"add these modules to a layer in LAYERS (tests/test_layering.py): {missing}"
    )


def layering_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        if imp.top != "llava_cli":
            continue
        here, there = layer_of(imp.module), layer_of(imp.name)
        if here is not None and there is not None and there < here:
            problems.append(
                f"{imp}: {LAYERS[here][0]} may not import from {LAYERS[there][0]}, a layer above"
            )
    return problems


def test_dependencies_point_down_the_layers() -> None:
    problems = layering_problems(ALL_IMPORTS)
    assert problems == [], "\n".join(problems)


def test_an_import_up_the_layers_is_named() -> None:
    assert layering_problems([Import("llava_cli.hub.remote", 9, "llava_cli.commands.pull")]) == [
        "llava_cli/hub/remote.py:9 imports llava_cli.commands.pull: the engine, the hub, what is"
        " on disk may not import from the command line, a layer above"
    ]
    assert layering_problems([Import("llava_cli.errors", 1, "llava_cli.cli")]) != []
    assert layering_problems([Import("llava_cli.cli", 1, "llava_cli.errors")]) == []
    assert layering_problems([Import("llava_cli.store", 1, "llava_cli.registry")]) == []


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"], ["chat", "--help"]])
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    """`llava --help` and `llava ask --help` stay fast: no llama_cpp, numpy, Pillow or hub."""
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

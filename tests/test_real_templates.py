"""Every registry family's real chat template (tests/templates, sources in families.toml),
held to what the model's own processor renders (golden/, written by
scripts/template-goldens.py with Hugging Face transformers), and run end to end: the colour
oracle re-labelled with each template answers through ``llava ask`` and ``llava chat``."""

from __future__ import annotations

import datetime
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from llava_cli import synthetic
from llava_cli.templates import JinjaFormat, Message

from .conftest import llava

FOLDER = Path(__file__).parent / "templates"
FAMILIES: dict[str, dict[str, Any]] = tomllib.loads((FOLDER / "families.toml").read_text())
SCENARIOS: dict[str, dict[str, Any]] = tomllib.loads((FOLDER / "scenarios.toml").read_text())
CASES = [
    (family, scenario)
    for family, spec in FAMILIES.items()
    for scenario, s in SCENARIOS.items()
    if spec.get("think") or not s.get("think")
]


def messages(scenario: str) -> list[Message]:
    return [
        Message(m["role"], m["text"], n_images=m.get("images", 0))
        for m in SCENARIOS[scenario]["messages"]
    ]


def golden(family: str, scenario: str, *, bos: str | None = None) -> str:
    """The processor's rendering; ``bos``: the BOS text of the model it runs on (templates
    write ``bos_token``; the oracle's is ``<s>``)."""
    text = (FOLDER / "golden" / f"{family}.{scenario}.txt").read_text()
    text = text.replace("{TODAY}", datetime.date.today().isoformat())
    old = FAMILIES[family].get("bos")
    return text.replace(old, bos) if bos is not None and old else text


def template(family: str) -> str:
    return (FOLDER / FAMILIES[family]["file"]).read_text()


def test_every_family_and_scenario_has_a_golden() -> None:
    names = {p.name for p in (FOLDER / "golden").glob("*.txt")}
    assert names == {f"{f}.{s}.txt" for f, s in CASES}
    covered = {key for spec in FAMILIES.values() for key in spec["models"]}
    from llava_cli import registry

    jinja_models = {
        key
        for key, spec in registry.load().models.items()
        if spec.chat_format == "gguf" and key not in NOT_JINJA
    }
    assert jinja_models <= covered, "a registry model without its real template in the tests"


# Registry models whose GGUF template is not Jinja (tested in test_templates.py).
NOT_JINJA = {"moondream2"}


@pytest.mark.parametrize(("family", "scenario"), CASES)
def test_rendering_equals_the_processors(family: str, scenario: str) -> None:
    spec = FAMILIES[family]
    fmt = JinjaFormat(
        template(family), bos_token=spec.get("bos", ""), eos_token=spec.get("eos", "")
    )
    think = bool(SCENARIOS[scenario].get("think"))
    assert fmt.render(messages(scenario), think=think).text == golden(family, scenario)


@pytest.mark.parametrize("family", [f for f, s in FAMILIES.items() if s.get("think")])
def test_reasoning_templates_are_recognised_and_off_by_default(family: str) -> None:
    fmt = JinjaFormat(template(family), bos_token="<bos>")
    assert fmt.thinking is not None and fmt.thinking.can_turn_off
    off = fmt.render(messages("follow-up")).text
    on = fmt.render(messages("follow-up"), think=True).text
    assert off != on


@cache
def _oracle(family: str, root: Path) -> synthetic.ModelPair:
    return synthetic.build_colour_oracle(root / family, chat_template=template(family))


@pytest.fixture
def oracle_for(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.getbasetemp() / "real-template-oracles"
    return lambda family: _oracle(family, root)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ask_answers_through_the_real_template(family: str, oracle_for: Any, images: Path) -> None:
    pair = oracle_for(family)
    args = ["--model", pair.model, "--mmproj", pair.mmproj, "--temperature", "0"]
    system = SCENARIOS["system"]["messages"][0]["text"]
    question = SCENARIOS["system"]["messages"][1]["text"]
    result = llava("ask", images / "red.png", "-p", question, "--system", system, *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"red\n", b"")
    shown = llava(
        "ask", images / "red.png", "-p", question, "--system", system, "--show-prompt", *args
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.decode() == golden(family, "system", bos="<s>")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_turn_chat_through_the_real_template(
    family: str, oracle_for: Any, images: Path
) -> None:
    pair = oracle_for(family)
    first = SCENARIOS["follow-up"]["messages"][0]["text"]
    second = SCENARIOS["follow-up"]["messages"][2]["text"]
    script = f"{first}\n/prompt {second}\n{second}\n"
    result = llava(
        "chat",
        images / "red.png",
        "--model",
        pair.model,
        "--mmproj",
        pair.mmproj,
        "--temperature",
        "0",
        stdin=script.encode(),
    )
    assert result.returncode == 0, result.stderr
    prompt = golden(family, "follow-up", bos="<s>")
    prompt += "" if prompt.endswith("\n") else "\n"
    assert result.stdout.decode() == "red\n" + prompt + "red\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gguf_template", "chat_format", "expected"),
    [
        # Moondream2's GGUF: tokenizer.chat_template is the name "vicuna" (llama.cpp renders it;
        # layout from src/llama-chat.cpp).
        ("vicuna", "auto", "Be brief.\n\nUSER: <__media__>Q?\nASSISTANT:"),
        # Mistral Small 3.1: the registry's mistral-v7-tekken (llama.cpp's rendering).
        (
            None,
            "mistral-v7-tekken",
            "[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]<__media__>Q?[/INST]",
        ),
    ],
)
def test_builtin_formats_answer_end_to_end(
    gguf_template: str | None, chat_format: str, expected: str, tmp_path: Path, images: Path
) -> None:
    pair = synthetic.build_colour_oracle(tmp_path / "m", chat_template=gguf_template)
    args = [
        "--model",
        pair.model,
        "--mmproj",
        pair.mmproj,
        "--chat-format",
        chat_format,
        "--system",
        "Be brief.",
        "-p",
        "Q?",
    ]
    result = llava("ask", images / "red.png", *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"red\n", b"")
    shown = llava("ask", images / "red.png", "--show-prompt", *args)
    assert (shown.returncode, shown.stdout.decode()) == (0, expected)


def test_registry_builtin_formats_render_as_their_familys_processor() -> None:
    """A registry entry on one of llama.cpp's formats gives the prompt its family's own template
    gives (the tokenizer adds the BOS the template writes)."""
    from llava_cli import registry
    from llava_cli.engine import builtin_templates
    from llava_cli.templates import BuiltinFormat

    family_of = {"mistral-small-3.1-24b": "mistral-small-3_1"}
    for key, spec in registry.load().models.items():
        if spec.chat_format in ("gguf", "llava"):
            continue
        family = family_of[key]  # every such entry is held to a real template
        fmt = BuiltinFormat(spec.chat_format, builtin_templates.apply)
        rendered = fmt.render(messages("system"))
        bos = FAMILIES[family].get("bos", "")
        assert rendered.add_bos and bos + rendered.text == golden(family, "system")

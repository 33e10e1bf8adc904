"""Write tests/templates/golden/*.txt: each real template in tests/templates rendered by Hugging
Face transformers' own chat-template renderer (what ``apply_chat_template`` runs), with typed
content as the models' processors pass it; the template's image text becomes ``<__media__>``.

Not part of the test run (it needs transformers): run it by hand after adding a template,
in an environment with ``pip install transformers jinja2``:

    python scripts/template-goldens.py
"""

from __future__ import annotations

import datetime
import sys
import tomllib
from pathlib import Path
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

FOLDER = Path(__file__).resolve().parents[1] / "tests" / "templates"
MARKER = "<__media__>"
TODAY = "{TODAY}"  # a template that prints the date: the test puts today's date back


def hf_messages(family: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as a processor's user passes it."""
    out = []
    for m in messages:
        role, text, n = m["role"], m["text"], m.get("images", 0)
        if "images_in_string" in family:  # a template that reads only strings
            content: Any = (family["images_in_string"] + "\n") * n + text
        elif role in family.get("string_roles", []):
            content = text
        else:
            content = [{"type": "image"}] * n + [{"type": "text", "text": text}]
        out.append({"role": role, "content": content})
    return out


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a template refuses a system message no processor output exists: the golden then
    records llava's rule (the system text in front of the first question, after its images),
    not an independent rendering."""
    system = [m["text"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for m in rest:
        if system and m["role"] == "user":
            m["text"] = "\n".join(system) + "\n" + m["text"]
            break
    return rest


def main() -> int:
    families = tomllib.loads((FOLDER / "families.toml").read_text())
    scenarios = tomllib.loads((FOLDER / "scenarios.toml").read_text())
    out_dir = FOLDER / "golden"
    out_dir.mkdir(exist_ok=True)
    today = datetime.date.today().isoformat()
    for name, family in families.items():
        source = (FOLDER / family["file"]).read_text()
        for scenario, spec in scenarios.items():
            if spec.get("think") and not family.get("think"):
                continue
            kwargs: dict[str, Any] = {
                "bos_token": family.get("bos", ""),
                "eos_token": family.get("eos", ""),
            }
            if family.get("think"):
                kwargs["enable_thinking"] = bool(spec.get("think"))
            messages = spec["messages"]
            try:
                text = render(source, hf_messages(family, messages), kwargs)
            except Exception as exc:  # a template without a system role: fold it, as llama.cpp
                if not any(m["role"] == "system" for m in messages):
                    raise
                print(f"{name}/{scenario}: {exc}; system folded into the first user turn")  # noqa: T201
                text = render(source, hf_messages(family, fold_system(messages)), kwargs)
            image = family.get("image") or family["images_in_string"]
            text = text.replace(image, MARKER).replace(today, TODAY)
            (out_dir / f"{name}.{scenario}.txt").write_text(text)
            print(f"wrote golden/{name}.{scenario}.txt")  # noqa: T201
    return 0


def render(source: str, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=source, add_generation_prompt=True, **kwargs
    )
    return str(rendered[0])


if __name__ == "__main__":
    sys.exit(main())

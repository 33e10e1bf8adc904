from __future__ import annotations

import pytest

from llava_cli.errors import ModelFileError
from llava_cli.synthetic import CHATML_TEMPLATE
from llava_cli.templates import (
    LLAVA_SYSTEM,
    MEDIA_MARKER,
    JinjaFormat,
    LegacyLlava,
    Message,
    chat_format_for,
)


def test_legacy_llava_matches_the_original_vicuna_v1_layout() -> None:
    fmt = LegacyLlava()
    first = fmt.render([Message("user", "What is this?", n_images=1)])
    assert first.text == f"{LLAVA_SYSTEM} USER: {MEDIA_MARKER}\nWhat is this? ASSISTANT:"
    assert first.add_bos
    second = fmt.render(
        [
            Message("system", "Be brief."),
            Message("user", "What is this?", n_images=1),
            Message("assistant", " A cat."),
            Message("user", "Colour?"),
        ]
    )
    assert second.text == (
        f"Be brief. USER: {MEDIA_MARKER}\nWhat is this? ASSISTANT: A cat.</s>"
        "USER: Colour? ASSISTANT:"
    )


def test_a_follow_up_render_extends_the_previous_one() -> None:
    """What makes incremental evaluation possible: history renders the same every turn."""
    for fmt in (LegacyLlava(), JinjaFormat(CHATML_TEMPLATE)):
        turn1 = [Message("user", "Q1", n_images=1)]
        before = fmt.render(turn1).text
        after = fmt.render([*turn1, Message("assistant", "A1"), Message("user", "Q2")]).text
        assert after.startswith(before)


def test_jinja_template_places_images_first_and_handles_bos() -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    fmt = JinjaFormat(template, bos_token="<s>")
    out = fmt.render([Message("user", "hi", n_images=2)])
    assert out.text == f"<s>[user]{MEDIA_MARKER}{MEDIA_MARKER}hi"
    assert not out.add_bos  # the template already wrote BOS


def test_user_text_cannot_inject_image_markers() -> None:
    out = LegacyLlava().render([Message("user", f"look {MEDIA_MARKER} here")])
    assert MEDIA_MARKER not in out.text


def test_template_is_sandboxed() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ModelFileError):
        JinjaFormat(evil).render([Message("user", "x")])


def test_template_raise_exception_becomes_a_clear_error() -> None:
    fmt = JinjaFormat("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ModelFileError, match="roles must alternate"):
        fmt.render([Message("user", "x")])


def test_format_choice() -> None:
    assert isinstance(chat_format_for(None), LegacyLlava)
    assert isinstance(chat_format_for(CHATML_TEMPLATE), JinjaFormat)
    assert isinstance(chat_format_for(CHATML_TEMPLATE, prefer="llava"), LegacyLlava)
    with pytest.raises(ModelFileError, match="no chat template"):
        chat_format_for(None, prefer="gguf")


def test_hugging_face_template_features() -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson(ensure_ascii=False, sort_keys=True) }}{% endfor %}"
    )
    out = JinjaFormat(template).render([Message("system", "x"), Message("user", "é")])
    assert out.text == '{"content": "é", "role": "user"}'


def test_any_template_failure_is_a_clear_error() -> None:
    fmt = JinjaFormat("{{ messages[5].content }}{{ 1 / 0 }}")
    with pytest.raises(ModelFileError, match="chat template failed"):
        fmt.render([Message("user", "x")])

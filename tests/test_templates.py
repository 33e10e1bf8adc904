from __future__ import annotations

import time
from pathlib import Path

import pytest

from llava_cli.errors import ModelFileError, UsageError
from llava_cli.synthetic import CHATML_TEMPLATE
from llava_cli.templates import (
    LLAVA_SYSTEM,
    MEDIA_MARKER,
    BuiltinFormat,
    JinjaFormat,
    LegacyLlava,
    Message,
    chat_format_for,
    check_format_name,
)
from llava_cli.thinking import ThinkingSplitter


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


def test_a_string_template_gets_images_first_each_on_its_line_and_handles_bos() -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    fmt = JinjaFormat(template, bos_token="<s>")
    out = fmt.render([Message("user", "hi", n_images=2)])
    assert out.text == f"<s>[user]{MEDIA_MARKER}\n{MEDIA_MARKER}\nhi"
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
    assert isinstance(chat_format_for(" \n"), LegacyLlava)  # a blank template is none
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
    # The template skips the system role, so the system text is folded into the first turn.
    assert out.text == '{"content": "x\\né", "role": "user"}'


def test_any_template_failure_is_a_clear_error() -> None:
    fmt = JinjaFormat("{{ messages[5].content }}{{ 1 / 0 }}")
    with pytest.raises(ModelFileError, match="chat template failed"):
        fmt.render([Message("user", "x")])


def test_llava_1_5_system_prompt_is_the_one_it_was_trained_with() -> None:
    # upstream LLaVA, llava/conversation.py, conv_vicuna_v1.system
    assert LLAVA_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )


def test_a_template_that_is_a_builtin_name_is_rendered_by_llama_cpp() -> None:
    """Moondream2's GGUF carries the name ``vicuna``, not Jinja."""
    from llava_cli.engine import builtin_templates

    fmt = chat_format_for(
        "vicuna",
        builtin_names=builtin_templates.names(),
        apply_builtin=builtin_templates.apply,
    )
    assert isinstance(fmt, BuiltinFormat)
    out = fmt.render([Message("system", "Be brief."), Message("user", "Q?", n_images=1)])
    # llama.cpp's src/llama-chat.cpp, LLM_CHAT_TEMPLATE_VICUNA
    assert out.text == f"Be brief.\n\nUSER: {MEDIA_MARKER}Q?\nASSISTANT:"
    assert out.add_bos


def test_every_builtin_name_is_a_format_and_a_typo_lists_them() -> None:
    from llava_cli.engine import builtin_templates

    names = builtin_templates.names()
    assert {"vicuna", "chatml", "llama2", "mistral-v7", "gemma"} <= set(names)
    for name in (*names, "auto", "gguf", "llava"):
        assert check_format_name(name, names) == name
    with pytest.raises(UsageError, match="did you mean mistral-v7") as err:
        check_format_name("mistral-v77", names)
    assert "vicuna" in err.value.hint


def test_every_registry_chat_format_is_one_llava_knows() -> None:
    from llava_cli import registry
    from llava_cli.engine import builtin_templates

    for spec in registry.load().models.values():
        if spec.chat_format != "gguf":
            check_format_name(spec.chat_format, builtin_templates.names())


def test_a_system_message_is_folded_where_the_template_refuses_it() -> None:
    # Mistral-7B-Instruct-v0.2's template (tests/templates): raises on a system role.
    source = (Path(__file__).parent / "templates" / "mistral-7b-instruct-v0.2.jinja").read_text()
    fmt = JinjaFormat(source, bos_token="<s>", eos_token="</s>")
    out = fmt.render([Message("system", "Be brief."), Message("user", "Q?", n_images=1)])
    assert out.text == f"<s>[INST] {MEDIA_MARKER}\nBe brief.\nQ? [/INST]"


def test_typed_parts_go_where_the_template_puts_them() -> None:
    template = (
        "{% for m in messages %}{% for p in m.content %}"
        "{% if p.type == 'image' %}<img>{% else %}[{{ p.text }}]{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    fmt = JinjaFormat(template)
    out = fmt.render([Message("user", f"two <img> {MEDIA_MARKER}", n_images=2)])
    assert out.text == f"{MEDIA_MARKER}{MEDIA_MARKER}[two  ]"  # user text cannot add images


def test_thinking_is_off_by_default_where_the_template_can_say_so() -> None:
    template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}A:"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>"
        "{% else %}<think>{% endif %}{% endif %}"
    )
    fmt = JinjaFormat(template)
    assert fmt.thinking is not None
    assert (fmt.thinking.can_turn_off, fmt.thinking.starts_open) == (True, True)
    assert fmt.render([Message("user", "Q")]).text == "QA:<think></think>"
    assert fmt.render([Message("user", "Q")], think=True).text == "QA:<think>"


@pytest.mark.parametrize(
    "template",
    [
        "{{ raise_exception('no') }}",
        "{% for i in range(10**9) %}{{ i }}{% endfor %}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
    ],
)
def test_hostile_templates_fail_fast_with_a_clear_error(template: str) -> None:
    start = time.monotonic()
    with pytest.raises(ModelFileError) as err:
        JinjaFormat(template, origin="evil.gguf").render([Message("user", "x", n_images=1)])
    assert time.monotonic() - start < 1.0
    line = err.value.one_line()
    assert line.startswith("evil.gguf: ") and "\n" not in line
    assert "--chat-format llava" not in line


def test_the_error_hint_names_the_format_that_fits() -> None:
    fmt = chat_format_for(
        "{{ raise_exception('Only user and assistant roles') }}", suggest="mistral-v7"
    )
    with pytest.raises(ModelFileError) as err:
        fmt.render([Message("user", "x")])
    assert "Only user and assistant roles" in err.value.message
    assert "--chat-format mistral-v7" in err.value.hint and "--show-prompt" in err.value.hint


@pytest.mark.parametrize(
    ("chunks", "thinking", "answer"),
    [
        (["<think>", "Let me see.", "</think>", "\n\nred"], "Let me see.", "red"),
        (["<th", "ink>\nhm</th", "ink>red"], "hm", "red"),  # tags cut across chunks
        (["red ", "<think>x</think>"], "", "red <think>x</think>"),  # only at the start
        (["  <think>a", "b</think> ok"], "ab", "ok"),
        (["plain answer"], "", "plain answer"),
        (["<thi"], "", "<thi"),  # a cut-short tag is text after all
    ],
)
def test_thinking_splitter(chunks: list[str], thinking: str, answer: str) -> None:
    splitter = ThinkingSplitter("<think>", "</think>")
    pieces = [p for c in chunks for p in splitter.feed(c)] + splitter.finish()
    assert "".join(t for is_thinking, t in pieces if is_thinking).strip() == thinking
    assert "".join(t for is_thinking, t in pieces if not is_thinking) == answer


def test_thinking_splitter_when_the_prompt_opened_the_block() -> None:
    splitter = ThinkingSplitter("<|channel>thought", "<channel|>", inside=True)
    pieces = [p for c in ("\nweigh it", "<channel|>", "blue") for p in splitter.feed(c)]
    assert pieces == [(True, "weigh it"), (False, "blue")]


def test_earlier_thinking_is_kept_only_where_the_template_reads_it_back() -> None:
    turns = [
        Message("user", "Q1", n_images=1),
        Message("assistant", "red", thinking="It looks red to me."),
        Message("user", "Q2"),
    ]
    # Qwen3.5's real template (tests/templates) drops reasoning before the last question.
    qwen = (Path(__file__).parent / "templates" / "qwen3.5.jinja").read_text()
    assert "It looks red" not in JinjaFormat(qwen).render(turns).text
    keeps = (
        "{% for m in messages %}{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
        "</think>{% endif %}{{ m.content }}|{% endfor %}"
    )
    assert "<think>It looks red to me.</think>red|" in JinjaFormat(keeps).render(turns).text


def test_an_answer_that_mentions_the_tag_in_its_first_chunk_is_all_answer() -> None:
    splitter = ThinkingSplitter("<think>", "</think>")
    pieces = splitter.feed("Use <think> tags") + splitter.finish()
    assert pieces == [(False, "Use <think> tags")]

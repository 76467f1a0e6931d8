"""Chat templates: the GGUF's own wins, then the family's, then ChatML."""

from __future__ import annotations

import pytest

from kvproxy.model.chat_template import ChatTemplate, ChatTemplateError


def gemma() -> ChatTemplate:
    return ChatTemplate.for_model("gemma3", None, bos_token="<bos>", eos_token="<eos>")


def test_gemma_turn_format_with_system_folded_into_the_first_turn() -> None:
    prompt = gemma().render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "family" in gemma().source


def test_gemma_refuses_roles_that_do_not_alternate() -> None:
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma().render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_ggufs_own_template_wins() -> None:
    t = ChatTemplate.for_model(
        "gemma3", "{% for m in messages %}[{{ m.content }}]{% endfor %}", "<s>", "</s>"
    )
    assert t.source == "gguf"
    assert t.render([{"role": "user", "content": "x"}]) == "[x]"


def test_unknown_family_falls_back_to_chatml() -> None:
    t = ChatTemplate.for_model("mystery", None, "", "")
    assert (
        t.render([{"role": "user", "content": "x"}])
        == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )

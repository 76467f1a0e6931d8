"""kvproxy.model.message_spans and kvproxy.upstream.message_delimiters: where llama-server (Jinja on) sees
user messages start, and so where it cuts a chat prompt.

The pure parts are checked on llama.cpp's own examples. The whole is checked against a real
llama-server built from the pinned source: with ``-lv 4`` it logs every prompt call it makes
("cached n_tokens = N, memory_seq_rm [N, end)", one line a call), so for each chat template the
calls kvproxy predicts (kvproxy.scoring.prompt_fill, from the user starts it found) must be the calls
llama-server made. A llama.cpp that splits messages differently, or cuts differently, fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvproxy.corpus import english_text
from kvproxy.model.chat_template import GEMMA_TEMPLATE
from kvproxy.model.message_spans import (
    Delimiter,
    Segment,
    autoparser_delimiters,
    diff_split,
    segmentize_markers,
    specialized_delimiters,
    user_start_marker,
    user_starts,
)
from kvproxy.scoring.llama_server import chat_prompt
from kvproxy.scoring.prompt_fill import PromptFill
from kvproxy.upstream.message_delimiters import DelimiterCache, template_delimiters
from kvproxy.upstream.replicas import ReplicaPool, Timeouts
from tests.llama_servers import LlamaServer, start_llama_server
from tests.llama_tools import llama_bin


def templates_dir() -> Path:
    """The pinned llama.cpp's chat templates (asked when used: llama_bin may build llama.cpp)."""
    return llama_bin().parent / "src" / "models" / "templates"


CHATML_RENDERS = {
    "empty": "",
    "user": "<|im_start|>user\nU_USER_MSG Hello END_U<|im_end|>\n",
    "user assistant": "<|im_start|>user\nU_USER_MSG Hello END_U<|im_end|>\n"
    "<|im_start|>assistant\nA_ASST_MSG I can help END_A",
}


def test_segments_are_tags_and_text() -> None:
    assert segmentize_markers(b"<|im_start|>user\nhi[INST]x") == [
        Segment(True, b"<|im_start|>"),
        Segment(False, b"user\nhi"),
        Segment(True, b"[INST]"),
        Segment(False, b"x"),
    ]
    assert segmentize_markers(b"a < b") == [Segment(False, b"a "), Segment(False, b"< b")]  # unclosed


def test_the_diff_is_what_the_right_render_adds() -> None:
    d = diff_split(b"<s>", b"<s><|user|>\nhi<|end|>")
    assert (d.prefix, d.left, d.right) == (b"<s>", b"", b"<|user|>\nhi<|end|>")
    assert diff_split(b"", b"<a>x").right == b"<a>x"
    assert diff_split(b"<a>x", b"<a>x").prefix == b"<a>x"  # no difference: all of it is the prefix


def test_the_user_marker_skips_end_markers_and_blank_text() -> None:
    assert user_start_marker(CHATML_RENDERS) == "<|im_start|>user"
    gemma = {"empty": "<bos>", "user": "<bos><start_of_turn>user\nU_USER_MSG Hello END_U<end_of_turn>\n"}
    assert user_start_marker(gemma) == "<start_of_turn>user"
    # the fallback when a template fails on no messages: an end-of-turn marker before it is skipped
    fallback = {
        "empty": None,
        "user2 assistant": "[U]V_USER_MSG Hello END_V[A]A_ASST_MSG I can help END_A",
        "user2 assistant user": "[U]V_USER_MSG Hello END_V[A]A_ASST_MSG I can help END_A[/END]\n[U]"
        "U_USER_MSG Hello END_U",
    }
    assert user_start_marker(fallback) == "[U]"
    assert user_start_marker({"empty": None, "user": "x"}) == ""


def test_autoparser_delimiters_put_the_assistant_first() -> None:
    assert autoparser_delimiters("", CHATML_RENDERS) == (
        Delimiter("assistant", "<|im_start|>assistant"),
        Delimiter("user", "<|im_start|>user"),
    )


def test_dedicated_parsers_have_their_own_lists() -> None:
    templates = templates_dir()
    qwen = specialized_delimiters((templates / "Qwen3.5-4B.jinja").read_text())
    assert qwen is not None and [d.role for d in qwen] == ["assistant", "tool", "tool", "user", "system"]
    gemma4 = specialized_delimiters((templates / "google-gemma-4-31B-it.jinja").read_text())
    assert gemma4 == (Delimiter("user", "<|turn>user"), Delimiter("assistant", "<|turn>model"))
    assert specialized_delimiters(GEMMA_TEMPLATE) is None  # the autoparser's
    assert specialized_delimiters((templates / "Kimi-K2-Thinking.jinja").read_text()) == ()  # none


def test_the_split_takes_the_first_delimiter_matching_at_a_position() -> None:
    user, tool = ("user", [7, 8]), ("tool", [7, 8, 9])
    tokens = [1, 7, 8, 2, 7, 8, 9, 3, 7]
    assert user_starts(tokens, [tool, user]) == [1]  # at 4 the tool response wins
    assert user_starts(tokens, [user, tool]) == [1, 4]
    assert user_starts(tokens, [("assistant", []), user]) == []  # an empty delimiter matches anywhere
    assert user_starts(tokens, []) == []


# ---- against llama-server ---------------------------------------------------------------------------


CALL = re.compile(r"cached n_tokens = (\d+), memory_seq_rm")


def _chats() -> dict[str, list[dict[str, str]]]:
    """Three user turns (the middle one is no cut once a checkpoint exists), with and without a
    system message (a chat that opens with a user message is cut right after the BOS)."""
    words = english_text().split()
    # short turns (4 to 12 words): the cuts are set by where messages start, not by their length;
    # the templates' own text keeps some prompts past 516 tokens (the ``ubatch + 4`` cut)
    turns = [" ".join(words[100 * i : 100 * i + 4 + 2 * i]) for i in range(5)]
    roles = ("user", "assistant")
    alternating = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {
        "system first": [{"role": "system", "content": "Answer briefly."}, *alternating],
        "user first": alternating,
    }


CHATS = _chats()
# the templates kvproxy serves (the GGUF's none: ChatML; Gemma's), then one of each dedicated parser
# and of the autoparser's patches, then plain autoparser templates of other families
CASES: dict[str, tuple[str, ...]] = {
    "chatml fallback": (),
    "gemma (kvproxy)": ("gemma.jinja",),
    "legacy gemma": ("--no-jinja", "--chat-template", "gemma"),
    **{
        name: (name + ".jinja",)
        for name in (
            "Qwen3.5-4B",
            "google-gemma-4-31B-it",
            "openai-gpt-oss-120b",
            "deepseek-ai-DeepSeek-V3.2",
            "Kimi-K3",
            "MiniMax-M3",
            "inclusionai-ling-3.0-flash",
            "openbmb-MiniCPM5-1B",
            "muse-glimmer",
            "Cohere2MoE",
            "Kimi-K2-Thinking",
            "NVIDIA-Nemotron-Nano-v2",
            "fireworks-ai-llama-3-firefunction-v2",
            "Apriel-1.6-15b-Thinker-fixed",
            "upstage-Solar-Open-100B",
            "CohereForAI-c4ai-command-r-plus-tool_use",
            "meta-llama-Llama-3.1-8B-Instruct",
            "Qwen-Qwen3-0.6B",
            "google-gemma-2-2b-it",
            "mistralai-Mistral-Nemo-Instruct-2407",
            "microsoft-Phi-3.5-mini-instruct",
            "ibm-granite-granite-4.0",
            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
            "GLM-4.7-Flash",
        )
    },
}


if os.environ.get("KVPROXY_ALL_TEMPLATES"):  # every template the pinned llama.cpp carries (4 min)
    CASES.update({p.stem: (p.name,) for p in sorted(templates_dir().glob("*.jinja")) if p.stem not in CASES})


def _server_args(case: str, tmp: Path) -> tuple[tuple[str, ...], bool]:
    args = CASES[case]
    if args[:1] == ("--no-jinja",):
        return (), False  # tests.llama_servers starts it so
    if args == ("gemma.jinja",):
        (tmp / "gemma.jinja").write_text(GEMMA_TEMPLATE)
        return ("--chat-template-file", str(tmp / "gemma.jinja")), True
    if args:
        return ("--chat-template-file", str(templates_dir() / args[0])), True
    return (), True


@contextlib.contextmanager
def traced_server(model: Path, tmp: Path, case: str) -> Iterator[LlamaServer]:
    """llama-server logging every prompt call; no prompt cache in RAM, so each chat starts afresh:
    the calls of a prompt with nothing cached, as PromptFill models."""
    args, jinja = _server_args(case, tmp)
    flags = ("-np", "1", "-lv", "4", "--cache-ram", "0", "--slot-save-path", str(tmp))  # slots can be erased
    srv = start_llama_server(model, tmp, *flags, *args, jinja=jinja)
    try:
        yield srv
    finally:
        srv.kill()


async def _kvproxy_view(url: str, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    pool = ReplicaPool([url], Timeouts())
    try:
        return await chat_prompt(pool, messages, DelimiterCache())
    finally:
        await pool.close()


def served_calls(srv: LlamaServer, messages: list[dict[str, str]]) -> list[int] | None:
    """Where llama-server's prompt calls started for this chat (None: the template refused it), on
    an erased slot: an earlier chat's checkpoints would change the cuts (one at position 1, which a
    chat opening with a user message leaves, survives even ``cache_prompt: false``)."""
    httpx.post(f"{srv.url}/slots/0?action=erase", timeout=30).raise_for_status()
    seen = len(srv.log.read_text(errors="replace"))
    body = {"messages": messages, "max_tokens": 1}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
    # the tiny model's one random token may not parse in the template's own output format (gpt-oss's
    # channels): that 500 comes after the prompt's calls were made and logged
    unparsed = r.status_code == 500 and "does not match the expected" in r.text
    if r.status_code != 200 and not unparsed:
        return None
    return [int(m.group(1)) for m in CALL.finditer(srv.log.read_text(errors="replace")[seen:])]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kvproxy_cuts_a_chat_where_llama_server_did(tiny_gemma_path: Path, tmp_path: Path, case: str) -> None:
    """The bundled Gemma's tokenizer with tiny random weights (tests/tiny_gemma3.py): where llama-server
    cuts depends on the template and the token ids, not on the weights, and the real ones made each
    chat's prefill cost seconds."""
    compared = 0
    with traced_server(tiny_gemma_path, tmp_path, case) as srv:
        for name, messages in CHATS.items():
            served = served_calls(srv, messages)
            if served is None:
                continue
            tokens, starts = asyncio.run(_kvproxy_view(srv.url, messages))
            ours = [a for a, _ in PromptFill().for_prompt(starts).calls(len(tokens), cuts_apply=True)]
            assert ours == served, (case, name, starts, _delimiters(srv.url))
            compared += 1
            if CASES[case][:1] == ("--no-jinja",):
                assert starts == []  # legacy templates: no message spans
    if not compared:
        pytest.skip(f"{case}: the template refused every chat")


def _delimiters(url: str) -> Any:
    async def run() -> Any:
        pool = ReplicaPool([url], Timeouts())
        try:
            async with pool.acquire() as replica:
                return await template_delimiters(replica)
        finally:
            await pool.close()

    return asyncio.run(run())

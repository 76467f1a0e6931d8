"""A stand-in for the embedded backend, for the fast in-process tests of routing, validation and
error mapping (tests/test_api_fast.py): no model, no threads, answers at once.

It keeps the contracts the serving layer relies on: one token per UTF-8 byte of the prompt (so
``max_token_bytes`` is 1, exactly), the Gemma turn format from kvproxy's own chat templates, and a
generation that streams one letter a token and ends in a :class:`Finished` event.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from kvproxy.backends.base import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    KVConfig,
    TextDelta,
)
from kvproxy.backends.grammar import json_gbnf
from kvproxy.config import KVCacheType
from kvproxy.model.chat_template import ChatTemplate
from kvproxy.model.gguf_info import ModelInfo
from kvproxy.model.memory import AttentionShape

SHAPE = AttentionShape(n_layers=2, n_head_kv=1, head_dim_k=64, head_dim_v=64)


class StubBackend:
    ready = True
    n_vocab = 300
    n_ubatch = 64
    max_token_bytes = 1

    def __init__(self, name: str = "stub", n_ctx: int = 256, *, fail: bool = False) -> None:
        self.model_name = name
        self.n_ctx = n_ctx
        self.fail = fail  # every generation fails at once (a backend error)
        self.kv = KVConfig(KVCacheType.Q4_0, KVCacheType.Q4_0)
        self.info = ModelInfo(Path("stub.gguf"), name, "gemma3", n_ctx, None, SHAPE)
        self.chat_template = ChatTemplate.for_model("gemma3", None, bos_token="<bos>", eos_token="<eos>")
        self.generated: list[GenerationRequest] = []

    async def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.chat_template.render(messages)

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return ([1] if add_bos else []) + [2 + b for b in text.encode()]

    async def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """The embedded backend's grammar builder, in process (the backend runs it, and has llama.cpp
        parse the result, in its grammar compiler's child process)."""
        return json_gbnf(schema)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self.generated.append(request)
        if self.fail:
            raise BackendError("the stub was told to fail")
        if request.grammar is not None:  # JSON output: "{}" in two tokens, ended by the grammar
            yield TextDelta("{")
            yield TextDelta("}")
            yield Finished("stop", len(request.prompt_tokens), 2, (125, 127, 0))
            return
        n = min(request.max_tokens, 3)
        for i in range(n):
            yield TextDelta(chr(ord("a") + i))
        yield Finished("length", len(request.prompt_tokens), n, tuple(range(2, 2 + n)))


class IdleScorer:
    """Never asked to score in these tests (the shadow rate is 0 and nothing is forced)."""

    async def start(self) -> None:
        pass

    async def score(self, job: Any) -> Any:
        raise AssertionError("the fast tests shadow nothing")

    def close(self) -> None:
        pass

"""Scoring on a plain llama-server reference: teacher-forced top-K, one n_predict=1 completion per
position, and the primary's own tokenizer for the prompt and the answer (what the top-K estimator
needs from HTTP servers; the relay itself is kvproxy.upstream.llama_server)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from kvproxy.kld import PositionScores, coarse_kld_row
from kvproxy.model.message_spans import user_starts
from kvproxy.scoring.job import PrimaryReport
from kvproxy.upstream.message_delimiters import DelimiterCache
from kvproxy.upstream.replicas import (
    Replica,
    ReplicaPool,
    UpstreamError,
    map_transport_error,
    map_upstream_status,
)

log = logging.getLogger(__name__)


@dataclass
class _ServerState:
    """What the per-position scorer learns once about one reference llama-server."""

    free_slots: list[int]  # slots no job of this process scores on now; empty: do not pin
    plain_token: int | None  # a token whose text is whole UTF-8, to steer the one sampled token


class LlamaServerReference:
    """Teacher-forced top-K scoring on a plain llama-server: an n_predict=1 completion per position.

    Every position sends its whole prefix as token ids with ``cache_prompt: true``, so the server
    reuses the cached prefix and each step costs about one decode. Up to ``batch`` positions go in
    one request (``/completion`` takes an array of prompts and answers a list, in order of
    ``index``): the proxy's CPU per job was mostly the per-request HTTP work, about 0.2 ms a
    position.

    One job's requests are pinned to one server slot (``id_slot``). llama-server spreads the prompts
    of one request over its free slots, and a slot whose cache ran past the next prefix must cut it
    back: a recurrent state (Qwen3.5/3.6) or a sliding-window cache cannot be cut, so the prompt was
    processed again from the start. On llama-server's default 4 slots that cost 52 to 81 prompt
    tokens a position (120-token prompt, 64 positions, tiny qwen35moe, gemma3 and llama alike);
    pinned, every position after the prompt costs one token and the answers equal a fresh prefill of
    each prefix to 1e-5 (docs/production.md, "Hybrid and shared-KV models").

    The one sampled token is steered to a plain one (``logit_bias``): llama-server reports no
    ``completion_probabilities`` when the sampled token ends in an incomplete UTF-8 character (a
    byte token), and the top-K it reports comes from the raw logits, which the bias does not touch.
    """

    def __init__(self, pool: ReplicaPool, *, top_k: int, batch: int = 32) -> None:
        self.pool = pool
        self.top_k = top_k
        self.batch = batch
        self._servers: dict[str, _ServerState] = {}

    async def _server(self, replica: Replica) -> _ServerState:
        known = self._servers.get(replica.url)
        if known is not None:
            return known
        slots: list[int] = []
        plain: int | None = None
        status, content = await replica.get("/props")
        if status == 200:
            with contextlib.suppress(ValueError, TypeError):
                slots = list(range(int(orjson.loads(content)["total_slots"])))
        body = {"content": "a", "add_special": False, "parse_special": False}
        status, content = await replica.post("/tokenize", orjson.dumps(body))
        if status == 200:
            with contextlib.suppress(ValueError, TypeError, IndexError):
                plain = int(orjson.loads(content)["tokens"][0])
        state = _ServerState(slots, plain)
        self._servers[replica.url] = state
        return state

    async def _next_token_tops(
        self, replica: Any, prefixes: list[list[int]], slot: int | None, plain: int | None
    ) -> list[tuple[list[int], list[float]]]:
        body: dict[str, Any] = {
            "prompt": prefixes if len(prefixes) > 1 else prefixes[0],
            "n_predict": 1,
            "n_probs": self.top_k,
            "cache_prompt": True,
            "temperature": 0.0,
            "post_sampling_probs": False,
        }
        if slot is not None:
            body["id_slot"] = slot
        if plain is not None:
            body["logit_bias"] = [[plain, 1000.0]]
        status, content = await replica.post("/completion", orjson.dumps(body))
        if status != 200:
            raise map_upstream_status(replica, status, content)
        data = orjson.loads(content)
        answers = sorted(data, key=lambda r: int(r.get("index", 0))) if isinstance(data, list) else [data]
        if len(answers) != len(prefixes):
            raise ValueError(f"the reference answered {len(answers)} positions for {len(prefixes)} prompts")
        out = []
        for answer in answers:
            if "completion_probabilities" not in answer:
                raise ValueError("the reference gave no probabilities for a position")
            probs = answer["completion_probabilities"][0]["top_logprobs"]
            out.append(([int(p["id"]) for p in probs], [float(p["logprob"]) for p in probs]))
        return out

    async def score(self, prompt: list[int], report: PrimaryReport) -> PositionScores:
        n = len(report.token_ids)
        kld = np.zeros(n)
        same = np.zeros(n, dtype=bool)
        p_ref = np.zeros(n)
        p_pri = np.exp(np.asarray(report.token_logprobs, dtype=np.float64))
        async with self.pool.acquire() as replica:
            slot: int | None = None
            try:
                server = await self._server(replica)
                slot = server.free_slots.pop() if server.free_slots else None
                for start in range(0, n, self.batch):
                    stop = min(start + self.batch, n)
                    prefixes = [prompt + report.token_ids[:j] for j in range(start, stop)]
                    tops = await self._next_token_tops(replica, prefixes, slot, server.plain_token)
                    for j, (ids, lps) in zip(range(start, stop), tops, strict=True):
                        kld[j] = coarse_kld_row(ids, lps, report.top_ids[j], report.top_logprobs[j])
                        same[j] = bool(ids) and bool(report.top_ids[j]) and ids[0] == report.top_ids[j][0]
                        tok = report.token_ids[j]
                        # P_ref of the emitted token, when it is among the reference's top K (else 0)
                        p_ref[j] = float(np.exp(lps[ids.index(tok)])) if tok in ids else 0.0
            except BaseException as exc:
                # the server may have restarted with other slots: learn them again next time
                self._servers.pop(replica.url, None)
                slot = None
                if isinstance(exc, UpstreamError):
                    raise map_transport_error(replica, exc) from exc
                raise
            finally:
                if slot is not None and replica.url in self._servers:
                    self._servers[replica.url].free_slots.append(slot)
        return PositionScores(kld, same, p_ref, p_pri, first_position=len(prompt))


async def prompt_tokens_chat(pool: ReplicaPool, request: dict[str, Any] | list[Any]) -> list[int]:
    """The prompt token ids the primary itself used: its template, then its tokenizer.

    ``request``: the chat request as sent (its tools, ``chat_template_kwargs`` and the like shape the
    prompt; ``/apply-template`` reads them as the chat route does), or only its messages."""
    body = request if isinstance(request, dict) else {"messages": request}
    async with pool.acquire() as replica:
        return await _chat_tokens(replica, body)


async def chat_prompt(
    pool: ReplicaPool, request: dict[str, Any] | list[Any], delimiters: DelimiterCache
) -> tuple[list[int], list[int]]:
    """The prompt token ids (as :func:`prompt_tokens_chat`), and where the primary saw user
    messages start in them (it cuts its prompt batches there: kvproxy.model.message_spans), from one
    replica."""
    body = request if isinstance(request, dict) else {"messages": request}
    async with pool.acquire() as replica:
        tokens = await _chat_tokens(replica, body)
        return tokens, user_starts(tokens, await delimiters.get(replica))


async def _chat_tokens(replica: Replica, body: dict[str, Any]) -> list[int]:
    status, content = await replica.post("/apply-template", orjson.dumps(body))
    if status != 200:
        raise map_upstream_status(replica, status, content)
    return await _tokenize(replica, orjson.loads(content)["prompt"])


async def prompt_tokens_text(pool: ReplicaPool, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    async with pool.acquire() as replica:
        return await _tokenize(replica, prompt)


async def tokenize_answer(pool: ReplicaPool, text: str) -> list[int]:
    """An answer's text as token ids, by the primary's tokenizer: no BOS, and special-token text
    kept as text (llama-server writes a generated control token as nothing, so its text in an
    answer was generated as plain text)."""
    body = {"content": text, "add_special": False, "parse_special": False}
    async with pool.acquire() as replica:
        status, content = await replica.post("/tokenize", orjson.dumps(body))
        if status != 200:
            raise map_upstream_status(replica, status, content)
    return [int(t) for t in orjson.loads(content)["tokens"]]


async def _tokenize(replica: Replica, text: str) -> list[int]:
    body = {"content": text, "add_special": True, "parse_special": True}
    status, content = await replica.post("/tokenize", orjson.dumps(body))
    if status != 200:
        raise map_upstream_status(replica, status, content)
    return [int(t) for t in orjson.loads(content)["tokens"]]

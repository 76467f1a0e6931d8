"""llama-server over HTTP: relaying OpenAI requests to the primary, and scoring on the reference.

Unsampled requests are relayed byte for byte (the body as the client sent it, the response and SSE
chunks as the upstream sent them): no JSON is parsed on that path. A shadowed request asks the
primary for ``logprobs`` with ``top_logprobs = K`` (every llama-server logprob entry carries the token
id), parses the response, takes the generated token ids and the primary's top-K per position, and
strips from the client's response what the client did not ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson

from kvproxy.kld import PositionScores, coarse_kld_row
from kvproxy.message_spans import user_starts
from kvproxy.observers import NULL_SERVING, ServingEvents, TokenClock
from kvproxy.shadow.job import PrimaryReport
from kvproxy.sse import EventTooLarge, SSEDecoder
from kvproxy.upstream.message_delimiters import DelimiterCache
from kvproxy.upstream.replicas import (
    JSON_HEADERS,
    Replica,
    ReplicaPool,
    UpstreamError,
    UpstreamFailure,
    is_timeout,
    map_transport_error,
    map_upstream_status,
    read_capped,
    refused,
    too_large,
)

log = logging.getLogger(__name__)

DONE_END = (b"[DONE]",)  # an OpenAI stream's end: its last event is ``data: [DONE]``
_USAGE_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_USAGE_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')


def strip_logprobs(choice: dict[str, Any], wants_logprobs: bool, wants_top: int) -> list[dict[str, Any]]:
    """Take the logprob entries out of one choice, leaving what the client asked for."""
    lp = choice.get("logprobs")
    entries: list[dict[str, Any]] = (lp.get("content") if isinstance(lp, dict) else None) or []
    if not wants_logprobs:
        # absent, as llama-server answers a request without logprobs: shadowing stays invisible
        choice.pop("logprobs", None)
    elif entries:
        choice["logprobs"] = {
            **lp,  # type: ignore[dict-item]
            "content": [{**e, "top_logprobs": (e.get("top_logprobs") or [])[:wants_top]} for e in entries],
        }
    return entries


class LlamaServerPrimary:
    """Serves one deployment's requests from llama-server replicas."""

    def __init__(self, pool: ReplicaPool, *, top_k: int, events: ServingEvents = NULL_SERVING) -> None:
        self.pool = pool
        self.top_k = top_k
        self.events = events

    def record_error(self, kind: str) -> None:
        self.events.upstream_error(kind)

    def _failure(self, replica: Replica, exc: BaseException) -> UpstreamFailure:
        """Count an exchange that failed below HTTP and say it as the client's error."""
        self.record_error("timeout" if is_timeout(exc) else "unavailable")
        return map_transport_error(replica, exc)

    # ---- relay without shadow ---------------------------------------------------------------

    async def _send(
        self, path: str, content: bytes, *, deadline: float
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """Send to the least busy replica; a refused connection (the request never reached it) ejects
        that replica and tries the next one. Returns with the replica's outstanding count held and
        the response's headers read (its body not yet)."""
        attempts = len(self.pool.replicas)
        for attempt in range(attempts):
            replica = self.pool.pick()
            replica.outstanding += 1
            try:
                async with asyncio.timeout_at(deadline):
                    resp = await replica.session.post(replica.url + path, data=content, headers=JSON_HEADERS)
                    if resp.status != 200:
                        try:
                            body = await read_capped(resp, replica.url, self.pool.limits.max_body_bytes)
                        except UpstreamFailure:
                            resp.close()
                            body = b""
                        resp.release()
                        self.record_error("status")
                        raise map_upstream_status(replica, resp.status, body)
                return replica, resp
            except UpstreamError as exc:
                replica.outstanding -= 1
                err = self._failure(replica, exc)
                if not refused(exc) or attempt + 1 == attempts:
                    raise err from exc
            except BaseException:
                replica.outstanding -= 1
                raise
        raise AssertionError("unreachable")

    async def post_json(self, path: str, content: bytes) -> bytes:
        deadline = asyncio.get_running_loop().time() + self.pool.timeouts.total
        replica, resp = await self._send(path, content, deadline=deadline)
        body = await self._read_whole(replica, resp, deadline)
        self._count_usage(body)
        return body

    async def _read_whole(self, replica: Replica, resp: aiohttp.ClientResponse, deadline: float) -> bytes:
        """The whole body, at most ``max_body_bytes`` of it (the rest of a larger one is never
        read); the replica's request ends here either way."""
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_capped(resp, replica.url, self.pool.limits.max_body_bytes)
        except UpstreamError as exc:
            resp.close()
            raise self._failure(replica, exc) from exc
        except UpstreamFailure:
            resp.close()
            self.record_error("too_large")
            raise
        finally:
            replica.outstanding -= 1
        resp.release()
        return body

    def _count_usage(self, body: bytes) -> None:
        """Token counts from the usage object, without parsing the whole response."""
        if not self.events.active:
            return
        tail = body[-600:]
        prompt, completion = _USAGE_PROMPT.search(tail), _USAGE_COMPLETION.search(tail)
        if prompt and completion:
            self.events.tokens(int(prompt.group(1)), int(completion.group(1)))

    async def open_stream(
        self, path: str, content: bytes, *, ends: tuple[bytes, ...] | None = DONE_END
    ) -> AsyncIterator[bytes]:
        """Start a streamed request and wait for the upstream's status before any byte goes out.

        Returns the raw SSE byte stream, cut at event boundaries (LF, CRLF or CR line ends): an event
        split across chunks is held until it is whole. If the upstream dies or stalls mid-stream, or
        ends without ``data: [DONE]`` (or, given ``ends``, without an event holding one of those
        markers; ``None``: any end is an end), the iterator raises :class:`UpstreamFailure` after
        the last whole event (the serving layer sends it as an SSE error event) and closes.
        """
        deadline = asyncio.get_running_loop().time() + self.pool.timeouts.total
        replica, resp = await self._send(path, content, deadline=deadline)
        if resp.content_type == "application/json":  # a 200 that is no stream: an error object, say
            body = await self._read_whole(replica, resp, deadline)
            self.record_error("invalid_response")
            raise not_a_stream(replica, body)
        clock = TokenClock(self.events)
        max_event = self.pool.limits.max_event_bytes

        async def relay() -> AsyncIterator[bytes]:
            tail = b""
            decoder = SSEDecoder(max_event_bytes=max_event)
            markers = None if ends is DONE_END else ends
            ended = ends is None
            try:
                async with asyncio.timeout_at(deadline):
                    async for chunk in resp.content.iter_any():
                        clock.tick()  # a chunk is about one token: llama-server flushes per token
                        tail = (tail + chunk)[-600:]
                        whole = decoder.feed_raw(chunk)
                        if whole:
                            if markers and not ended:
                                ended = any(m in whole for m in markers)
                            yield whole
                if decoder.pending:
                    yield decoder.pending
                self._count_usage(tail)
                if ends is DONE_END:
                    ended = b"[DONE]" in tail[-32:]
                if not ended:
                    self.record_error("stream_ended")
                    raise UpstreamFailure(
                        502,
                        f"The upstream {replica.url} ended the stream early.",
                        type="server_error",
                        code="upstream_stream_ended",
                    )
            except UpstreamError as exc:
                raise self._failure(replica, exc) from exc
            except EventTooLarge as exc:
                self.record_error("too_large")
                raise too_large(replica.url, "an SSE event", exc.limit, "upstream_max_event_bytes") from exc
            finally:
                if resp.content.at_eof():
                    resp.release()  # the connection goes back to the pool
                else:
                    resp.close()  # a client that left (or a broken stream) closes the upstream request
                replica.outstanding -= 1

        return relay()


def not_a_stream(replica: Replica, body: bytes) -> UpstreamFailure:
    """A streamed request answered 200 with a JSON body instead of events: the upstream's error
    object as a 502 (its message kept), or an invalid response."""
    try:
        failure = error_object(replica.url, orjson.loads(body))
    except ValueError:
        failure = None
    return failure or UpstreamFailure(
        502,
        f"The upstream {replica.url} answered a streamed request with JSON, not a stream.",
        type="server_error",
        code="upstream_invalid_response",
    )


def error_object(url: str | None, data: Any) -> UpstreamFailure | None:
    """A 200 whose body is ``{"error": ...}`` is a failure the upstream said with the wrong status:
    502 ``upstream_error`` with its message, never relayed as a success."""
    if not isinstance(data, dict) or "error" not in data:
        return None
    err = data["error"]
    message = err.get("message") if isinstance(err, dict) else err
    return UpstreamFailure(
        502,
        f"The upstream{' ' + url if url else ''} answered 200 with an error: {str(message or err)[:500]}",
        type="server_error",
        code="upstream_error",
    )


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
    messages start in them (it cuts its prompt batches there: kvproxy.message_spans), from one
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

"""What a generation request asks of the shadow path, read from its headers, and where an opted-in
response's per-token scores are filed.

``X-KVProxy-Shadow: force|skip`` overrides the deployment's sample rate for one request;
``X-KVProxy-Token-Scores: keep`` keeps its per-position numbers (kvproxy.shadow.token_scores). Both
are HTTP, so they are read here and handed down as a :class:`~kvproxy.shadow.ask.ShadowAsk`: the
shadow path never sees a header. A kept slot is filed under the response's ``id`` (a stream's: from
its first event) once the response exists.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kvproxy import sse
from kvproxy.errors import OpenAIError
from kvproxy.http import request_id
from kvproxy.scoring.kept import NOT_SAMPLED, KeptScores
from kvproxy.shadow.ask import ShadowAsk, ShadowDirective
from kvproxy.shadow.token_scores import TokenScoreStore

SHADOW_HEADER = "X-KVProxy-Shadow"
TOKEN_SCORES_HEADER = "X-KVProxy-Token-Scores"


def parse_shadow_header(value: str | None) -> ShadowDirective | None:
    """``force`` / ``skip`` (any case); None when absent. Anything else is a ValueError."""
    if value is None:
        return None
    v = value.strip().lower()
    if v == "force" or v == "skip":
        return v  # type: ignore[return-value]
    raise ValueError(f"{SHADOW_HEADER} must be 'force' or 'skip', not {value!r}")


def parse_token_scores_header(value: str | None) -> bool:
    """True for ``keep`` (any case), False when absent; anything else is a ValueError."""
    if value is None:
        return False
    if value.strip().lower() == "keep":
        return True
    raise ValueError(f"{TOKEN_SCORES_HEADER} must be 'keep', not {value!r}")


def shadow_directive(request: Request) -> ShadowDirective | None:
    """The ``X-KVProxy-Shadow`` request header, or a 400 naming it."""
    try:
        return parse_shadow_header(request.headers.get(SHADOW_HEADER))
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=SHADOW_HEADER) from exc


def keeps_token_scores(request: Request) -> bool:
    """The opt-in ``X-KVProxy-Token-Scores: keep`` header, or a 400 naming it."""
    try:
        return parse_token_scores_header(request.headers.get(TOKEN_SCORES_HEADER))
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=TOKEN_SCORES_HEADER) from exc


def shadow_ask(request: Request, store: TokenScoreStore | None) -> ShadowAsk:
    """The request's ask; with a fresh slot from ``store`` when it opted in to keeping scores."""
    directive = shadow_directive(request)
    keep = store.new_slot() if store is not None and keeps_token_scores(request) else None
    return ShadowAsk(directive, keep, request_id.request_id(request.scope))


def file_kept(store: TokenScoreStore, ask: ShadowAsk, response: Response, owner: bytes | None) -> Response:
    """File an opted-in request's slot under its response's ``id``, as ``owner``'s (the key that
    asked, kvproxy.http.access.key_owner); a request that was not sampled says so at once."""
    slot = ask.keep
    if slot is None:
        return response
    if not slot.claimed:  # not sampled (shadow skipped or shed): nothing will come
        slot.end(NOT_SAMPLED)
    if isinstance(response, StreamingResponse):
        response.body_iterator = _file_from_stream(store, response.body_iterator, slot, owner)
    else:
        rid = _response_id(bytes(response.body))
        if rid is not None:
            store.put(rid, slot, owner)
    return response


async def _file_from_stream(
    store: TokenScoreStore,
    chunks: AsyncIterable[str | bytes | memoryview],
    slot: KeptScores,
    owner: bytes | None,
) -> AsyncIterator[str | bytes | memoryview]:
    filed = False
    async for chunk in chunks:
        if not filed:
            data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            rid = _response_id(sse.first_data(data) or b"")
            if rid is not None:
                store.put(rid, slot, owner)
                filed = True
        yield chunk


def _response_id(body: bytes) -> str | None:
    """A response's ``id``: at the top of a completion or a chunk, inside ``response`` for the
    Responses API's object's first event (``response.created``)."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("response"), dict):
        data = data["response"]
    rid = data.get("id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and rid else None

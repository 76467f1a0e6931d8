"""The OpenAI-compatible routes: read the JSON body, route by ``model``, hand over to that deployment."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvproxy.access import key_owner
from kvproxy.errors import OpenAIError
from kvproxy.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)
from kvproxy.serving.base import shadow_directive
from kvproxy.serving.router import Router
from kvproxy.shadow.pool import SHADOW_HEADER
from kvproxy.shadow.token_scores import TOKEN_SCORES_HEADER, TokenScoreStore, parse_token_scores_header

router = APIRouter(
    prefix="/v1",
    responses={
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)


def _request_schema(model: type) -> dict[str, Any]:
    """Document the body (validated per deployment after routing, so not by FastAPI itself)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


async def _json_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    raw = await request.body()
    try:
        # orjson refuses what a tokenizer cannot encode (a lone UTF-16 surrogate, invalid UTF-8)
        # and non-JSON such as NaN, where json.loads lets them through to a 500 further on
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(
            400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return raw, body


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


async def complete(router: Router, path: str, request: Request) -> Response:
    """Both completion routes: read the body, route by ``model``, hand over to that deployment.
    Served by ``kvproxy.api.fast_path`` in front of FastAPI (the routes below document them)."""
    raw, body = await _json_body(request)
    serving = router.route(body.get("model"))
    shadow = shadow_directive(request.headers.get(SHADOW_HEADER))
    handle = serving.handle_chat if path == CHAT else serving.handle_completion
    if not _keeps_token_scores(request):
        return await handle(raw, body, shadow)
    store: TokenScoreStore = request.app.state.token_scores
    return await store.serve(lambda: handle(raw, body, shadow), key_owner(request.scope))


def _keeps_token_scores(request: Request) -> bool:
    """The opt-in ``X-KVProxy-Token-Scores: keep`` header (kvproxy.shadow.token_scores), or a 400."""
    try:
        return parse_token_scores_header(request.headers.get(TOKEN_SCORES_HEADER))
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=TOKEN_SCORES_HEADER) from exc


def _router(request: Request) -> Router:
    r: Router = request.app.state.router
    return r


@router.post(
    "/chat/completions", response_model=ChatCompletion, openapi_extra=_request_schema(ChatCompletionRequest)
)
async def chat_completions(request: Request) -> Response:
    return await complete(_router(request), CHAT, request)


@router.post("/completions", response_model=Completion, openapi_extra=_request_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    return await complete(_router(request), COMPLETIONS, request)


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _router(request).models()

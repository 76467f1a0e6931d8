"""The OpenAI-compatible routes: read the JSON body, route by ``model``, hand over to that deployment.

Every route is served under ``/v1`` and, as llama-server serves them, without the prefix too
(``/chat/completions``, ``/completions``, ``/responses``, ``/models``, ``/embeddings``); the aliases
are kept out of the OpenAPI document. A ``POST /v1/...`` that kvproxy does not serve itself is relayed
to the primary of the deployment its ``model`` names (llama-server's embeddings, rerank, ...), behind
the same API keys; the embedded backend answers it with a 404 naming the route.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import Match

from kvproxy.errors import OpenAIError, unknown_route
from kvproxy.http.access import key_owner
from kvproxy.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from kvproxy.protocol_responses import STATELESS, ResponseObject, ResponsesRequest
from kvproxy.serving import output_cap
from kvproxy.serving.base import Serving, shadow_directive
from kvproxy.serving.router import Router
from kvproxy.shadow.pool import SHADOW_HEADER
from kvproxy.shadow.token_scores import TOKEN_SCORES_HEADER, TokenScoreStore, parse_token_scores_header

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}
router = APIRouter(prefix="/v1", responses=_ERRORS)
aliases = APIRouter(include_in_schema=False, responses=_ERRORS)  # the same routes without /v1


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


CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
GENERATION_ROUTES = (CHAT, COMPLETIONS, RESPONSES)


def _handler(serving: Serving, path: str) -> Any:
    if path.endswith("/chat/completions"):
        return serving.handle_chat
    return serving.handle_completion if path.endswith("/completions") else serving.handle_responses


async def complete(router: Router, path: str, request: Request) -> Response:
    """The generation routes (chat, completions, responses; with or without ``/v1``): read the body,
    route by ``model``, hand over to that deployment. Served by ``kvproxy.api.fast_path`` in front of
    FastAPI (the routes below document them)."""
    raw, body = await _json_body(request)
    serving = router.route(body.get("model"))
    shadow = shadow_directive(request.headers.get(SHADOW_HEADER))
    handle = _handler(serving, path)
    if not _keeps_token_scores(request):
        response: Response = await handle(raw, body, shadow)
    else:
        store: TokenScoreStore = request.app.state.token_scores
        response = await store.serve(lambda: handle(raw, body, shadow), key_owner(request.scope))
    cap = output_cap.applied_cap(_route_kind(path), body, router.max_tokens_default)
    if cap is not None:
        response.headers[output_cap.HEADER] = str(cap)
    return response


def _route_kind(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chat"
    return "completions" if path.endswith("/completions") else "responses"


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
@aliases.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await complete(_router(request), CHAT, request)


@router.post("/completions", response_model=Completion, openapi_extra=_request_schema(CompletionRequest))
@aliases.post("/completions")
async def completions(request: Request) -> Response:
    return await complete(_router(request), COMPLETIONS, request)


@router.post("/responses", response_model=ResponseObject, openapi_extra=_request_schema(ResponsesRequest))
@aliases.post("/responses")
async def responses(request: Request) -> Response:
    return await complete(_router(request), RESPONSES, request)


@router.get("/models", response_model=ModelList)
@aliases.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _router(request).models()


@router.get("/models/{model:path}", response_model=ModelCard)
@aliases.get("/models/{model:path}", response_model=ModelCard)
async def model(model: str, request: Request) -> ModelCard:
    return _router(request).model(model)


@router.api_route("/responses/{response_id}", methods=["GET", "DELETE"])
@router.post("/responses/{response_id}/cancel")
@router.get("/responses/{response_id}/input_items")
async def stored_response(response_id: str) -> Response:
    """What needs a stored response: refused, naming it (kvproxy keeps none)."""
    raise OpenAIError(
        400, f"Stored responses are not supported: {STATELESS}.", param="response_id", code="unsupported"
    )


async def relay_other(request: Request, path: str | None = None) -> Response:
    """A route kvproxy does not serve itself: relayed (to ``path``, by default the one asked for) to
    the primary of the deployment its body's ``model`` names (a 404 naming the route on the
    embedded backend, or without a model)."""
    path = path or request.url.path
    raw, body = await _json_body(request)
    if "model" not in body:
        raise unknown_route(request.method, path)
    serving = _router(request).route(body.get("model"))
    return await serving.handle_other(path, raw, body, shadow_directive(request.headers.get(SHADOW_HEADER)))


@router.post("/embeddings", responses={502: {"model": ErrorResponse}})
@aliases.post("/embeddings")
async def embeddings(request: Request) -> Response:
    """Relayed to a llama-server primary's ``/v1/embeddings`` (started with ``--embeddings``; its
    unprefixed ``/embeddings`` has another format); the embedded backend answers 404."""
    return await relay_other(request, "/v1/embeddings")


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def other(path: str, request: Request) -> Response:
    """Everything else under ``/v1``: a POST is relayed (:func:`relay_other`); another method on a
    route that exists is a 405, on one that does not a 404 naming it."""
    if request.method == "POST":
        try:
            return await relay_other(request)
        except OpenAIError as exc:
            if exc.detail.code == "invalid_json":  # not an OpenAI-style request: no such route
                raise unknown_route(request.method, request.url.path) from exc
            raise
    for route in router.routes:
        if route is not request.scope.get("route") and route.matches(request.scope)[0] is Match.PARTIAL:
            raise OpenAIError(405, "Method Not Allowed", code="method_not_allowed")
    raise unknown_route(request.method, request.url.path)

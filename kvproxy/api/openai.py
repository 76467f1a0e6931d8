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
from pydantic import BaseModel
from starlette.routing import Match

from kvproxy.api.shadow_ask import file_kept, shadow_ask
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
from kvproxy.serving.base import Kind, handler
from kvproxy.serving.router import Router
from kvproxy.shadow.token_scores import TokenScoreStore

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


# The generation routes, in one table: path under /v1 -> (what it is, its request and answer models).
# kvproxy.api.fast_path answers them (and their aliases without /v1) in front of FastAPI; the FastAPI
# routes made from this table document them (OpenAPI) and name them for the metrics.
GENERATION: dict[str, tuple[Kind, type[BaseModel], type[BaseModel]]] = {
    "/chat/completions": ("chat", ChatCompletionRequest, ChatCompletion),
    "/completions": ("completion", CompletionRequest, Completion),
    "/responses": ("responses", ResponsesRequest, ResponseObject),
}
GENERATION_PATHS: dict[str, Kind] = {
    path: kind for suffix, (kind, _, _) in GENERATION.items() for path in (f"/v1{suffix}", suffix)
}


async def complete(router: Router, path: str, request: Request) -> Response:
    """A generation route (chat, completions, responses; with or without ``/v1``): read the body,
    route by ``model``, hand over to that deployment."""
    raw, body = await _json_body(request)
    serving = router.route(body.get("model"))
    store: TokenScoreStore = request.app.state.token_scores
    ask = shadow_ask(request, store)
    kind = GENERATION_PATHS[path]
    response = await handler(serving, kind)(raw, body, ask)
    cap = output_cap.applied_cap(_CAP_KIND[kind], body, router.max_tokens_default)
    if cap is not None:
        response.headers[output_cap.HEADER] = str(cap)
    return file_kept(store, ask, response, key_owner(request.scope))


_CAP_KIND = {"chat": "chat", "completion": "completions", "responses": "responses"}  # output_cap's names


def _router(request: Request) -> Router:
    r: Router = request.app.state.router
    return r


async def _generate(request: Request) -> Response:
    return await complete(_router(request), request.scope["path"], request)


_NAMES = {"chat": "chat_completions", "completion": "completions", "responses": "responses"}
for _suffix, (_kind, _request, _answer) in GENERATION.items():
    router.add_api_route(
        _suffix,
        _generate,
        methods=["POST"],
        response_model=_answer,
        openapi_extra=_request_schema(_request),
        name=_NAMES[_kind],  # the operation ids stay chat_completions_v1_chat_completions_post, ...
    )
    aliases.add_api_route(_suffix, _generate, methods=["POST"], name=_NAMES[_kind])


@router.get("/models", response_model=ModelList)
@aliases.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _router(request).models()


@router.get("/models/{model:path}", response_model=ModelCard)
@aliases.get("/models/{model:path}", response_model=ModelCard)
async def model(model: str, request: Request) -> ModelCard:
    return _router(request).model(model)


@router.get("/responses/{response_id}")
@router.delete("/responses/{response_id}")
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
    return await serving.handle_other(path, raw, body, shadow_ask(request, None))


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

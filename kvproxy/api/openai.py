"""The OpenAI-compatible routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvproxy.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)
from kvproxy.serving import OpenAIServing, shadow_directive
from kvproxy.shadow import SHADOW_HEADER

router = APIRouter(
    prefix="/v1",
    responses={
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletion | StreamingResponse:
    serving = _serving(request)
    shadow = shadow_directive(request.headers.get(SHADOW_HEADER))
    if body.stream:
        chunks = await serving.chat_stream(body, shadow)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    return await serving.chat(body, shadow)


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    serving = _serving(request)
    shadow = shadow_directive(request.headers.get(SHADOW_HEADER))
    if body.stream:
        chunks = await serving.completion_stream(body, shadow)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    return await serving.completion(body, shadow)


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _serving(request).models()

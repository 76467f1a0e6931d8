"""Liveness and readiness, llama-server style: 503 while the model loads, 200 once it serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvproxy.errors import OpenAIError, model_loading

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    if state.load_error is not None:
        err = OpenAIError(500, f"The model failed to load: {state.load_error}", type="server_error",
                          code="model_load_failed")
        return JSONResponse(err.body(), status_code=500)
    if not state.serving.backend.ready:
        err = model_loading()
        return JSONResponse(err.body(), status_code=err.status)
    return JSONResponse({"status": "ok"})

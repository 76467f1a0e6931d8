"""Liveness and readiness, llama-server style: 503 while the model loads, 200 once it serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvproxy.errors import model_load_failed, model_loading
from kvproxy.serving import OpenAIServing

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    serving: OpenAIServing = request.app.state.serving
    if serving.load_error is not None:
        err = model_load_failed(serving.load_error)
    elif not serving.backend.ready:
        err = model_loading()
    else:
        return JSONResponse({"status": "ok"})
    return JSONResponse(err.body(), status_code=err.status)

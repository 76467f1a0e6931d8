"""Liveness and readiness, llama-server style: 503 while a model loads, 200 once everything serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvproxy.errors import model_load_failed, model_loading
from kvproxy.serving.router import Router

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """503 while an embedded model loads, 500 if one failed to load; HTTP deployments report their
    replicas in the status route and do not hold the proxy's readiness hostage."""
    r: Router = request.app.state.router
    for d in r.embedded():
        if d.load_error is not None:
            err = model_load_failed(d.load_error)
            return JSONResponse(err.body(), status_code=err.status)
        if not d.backend.ready:
            err = model_loading()
            return JSONResponse(err.body(), status_code=err.status)
    return JSONResponse({"status": "ok"})

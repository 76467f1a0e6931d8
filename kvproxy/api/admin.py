"""kvproxy's own routes: the quality status of every deployment."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(prefix="/kvproxy/v1")
metrics_router = APIRouter()


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """Per deployment: KV configs of primary and reference, shadow counts, KLD since start and recent."""
    return {"deployments": [d.status() for d in request.app.state.deployments]}


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

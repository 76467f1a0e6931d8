"""kvproxy's own routes: the quality status of every deployment."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kvproxy.serving import OpenAIServing

router = APIRouter(prefix="/kvproxy/v1")


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """Per deployment: KV configs of primary and reference, shadow counts, KLD since start and recent."""
    serving: OpenAIServing = request.app.state.serving
    return {"deployments": [serving.deployment.status()]}

"""kvproxy's own routes: the quality status of every deployment."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter(prefix="/kvproxy/v1")


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """Per deployment: KV configs of primary and reference, shadow counts, KLD since start and recent."""
    return {"deployments": [d.status() for d in request.app.state.deployments]}

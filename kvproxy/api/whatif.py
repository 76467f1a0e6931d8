"""``GET /kvproxy/v1/what-if``: every deployment's live what-if (an admin route, like the status).

The same objects as the ``what_if`` key of ``/kvproxy/v1/status`` (null where a deployment has no
``--what-if``, or a proxy deployment's scoring server shows none; ``what_if_reason`` says why),
without the rest of the status: what a dashboard polling the frontier needs.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kvproxy.deployments.status import what_if_keys

router = APIRouter(prefix="/kvproxy/v1")


@router.get("/what-if")
async def what_if(request: Request) -> dict[str, Any]:
    """Per deployment: the what-if's configs (KV bytes, KLD statistics, frontier), budget pick, jobs."""
    return {"deployments": [{"name": d.name, **what_if_keys(d)} for d in request.app.state.deployments]}

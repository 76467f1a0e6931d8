"""kvproxy's own routes: the quality status of every deployment, kept per-token scores, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvproxy.api.shadow_ask import TOKEN_SCORES_HEADER
from kvproxy.deployments.status import deployment_status
from kvproxy.errors import OpenAIError
from kvproxy.http.access import key_owner
from kvproxy.scoring.kept import PENDING
from kvproxy.shadow.token_scores import TokenScoreStore
from kvproxy.telemetry.gpu import gpu_status

router = APIRouter(prefix="/kvproxy/v1")
metrics_router = APIRouter()


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """Per deployment: KV configs of primary and reference, shadow counts and coverage, KLD since
    start and recent, KV memory, the KLD history and distribution; the GPUs' memory (null without)."""
    return {
        "deployments": [deployment_status(d) for d in request.app.state.deployments],
        "gpu": gpu_status(request.app.state.gpu.latest()),
    }


@router.get("/scores/{response_id}")
async def scores(response_id: str, request: Request) -> JSONResponse:
    """Per-position KLD and same-top of one response whose request sent
    ``X-KVProxy-Token-Scores: keep``: 202 while its shadow job is pending, 200 once it has ended
    (``status`` scored, failed, dropped or not_sampled), 404 if unknown, expired, or kept for
    another API key."""
    store: TokenScoreStore = request.app.state.token_scores
    slot = store.get(response_id, key_owner(request.scope))  # only the key that asked for them
    if slot is None:
        raise OpenAIError(
            404,
            f"No kept scores for response {response_id!r}: unknown, expired, kept for another API key, "
            f"or its request did not send {TOKEN_SCORES_HEADER}: keep.",
            code="not_found",
        )
    status_code = 202 if slot.state == PENDING else 200
    return JSONResponse({"id": response_id, **slot.as_dict()}, status_code=status_code)


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""The scoring routes of an embedded deployment, used by proxies whose reference is this server.

``GET /kvproxy/v1/info`` says what this server scores with; ``POST /kvproxy/v1/score`` scores one
job exactly (a prefill per KV config, full vocabulary) and returns per-position numbers only: no
vocabulary-wide row ever crosses HTTP.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.errors import OpenAIError, model_loading
from kvproxy.scoring.contexts import memory_kind
from kvproxy.scoring.contract import KVSpec, ScoreAnswer, ScoreBody, ScoreInfo
from kvproxy.scoring.embedded import ScoreRequest
from kvproxy.scoring.prompt_fill import check_calls

router = APIRouter(prefix="/kvproxy/v1")


def _embedded(request: Request) -> EmbeddedDeployment:
    for d in request.app.state.deployments:
        if isinstance(d, EmbeddedDeployment):
            return d
    raise OpenAIError(404, "This kvproxy has no embedded deployment to score with.", code="not_found")


@router.get("/info")
async def info(request: Request) -> ScoreInfo:
    d = _embedded(request)
    return ScoreInfo(
        model=d.name,
        score=d.ready,
        primary=KVSpec.of(d.backend.kv),
        reference=KVSpec.of(d.reference_kv or d.backend.kv),
        n_ctx=d.backend.n_ctx,
        n_ubatch=d.backend.n_ubatch,
        score_path=d.score_path,
        device=str(d.backend.offload),
        memory=memory_kind(d.backend.llama_model) if d.ready else None,
    )


@router.post("/score")
async def score(body: ScoreBody, request: Request) -> ScoreAnswer:
    d = _embedded(request)
    if not d.ready:
        raise model_loading()
    n_vocab = d.backend.n_vocab
    fields = {"prompt_tokens": body.prompt_tokens, "token_ids": body.token_ids}
    fields["check_ids"] = [t for ids in body.check_ids or [] for t in ids]
    for param, ids in fields.items():  # llama.cpp and numpy would index past the vocabulary (a 500)
        bad = next((t for t in ids if t >= n_vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"token id {bad} is outside the vocabulary of {n_vocab}", param=param)
    if len(body.prompt_tokens) + len(body.token_ids) - 1 > d.backend.n_ctx:
        raise OpenAIError(
            400,
            f"the sequence does not fit the scoring context of {d.backend.n_ctx} tokens",
            param="token_ids",
            code="context_length_exceeded",
        )
    fill = None
    if body.prompt_fill is not None:
        if any(p >= len(body.prompt_tokens) for p in body.prompt_fill.user_starts):
            raise OpenAIError(400, "a user start lies outside the prompt", param="prompt_fill.user_starts")
        try:
            fill = body.prompt_fill.fill()
            if fill.given is not None:
                check_calls(fill.given, len(body.prompt_tokens))
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="prompt_fill.calls") from exc
    try:
        job = ScoreRequest(body.prompt_tokens, body.token_ids, body.check_ids, fill)
        s = await d.scorer.score_request(job)
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from exc
    return ScoreAnswer(
        estimator="exact",
        kld=s.kld.tolist(),
        same_top=s.same_top.tolist(),
        p_ref=s.p_ref.tolist(),
        p_primary=s.p_primary.tolist(),
        check_logprobs=s.check_logprobs,
    )

"""The scoring routes of an embedded deployment, used by proxies whose reference is this server.

``GET /kvproxy/v1/info`` says what this server scores with; ``POST /kvproxy/v1/score`` scores one
job exactly (a prefill per KV config, full vocabulary) and returns per-position numbers only: no
vocabulary-wide row ever crosses HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.errors import OpenAIError, model_loading
from kvproxy.scoring.embedded import ScoreRequest
from kvproxy.scoring.prompt_fill import PromptFill

router = APIRouter(prefix="/kvproxy/v1")


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    check_ids: list[list[Annotated[int, Field(ge=0)]]] | None = None
    # how the live primary (a llama-server) cut the prompt into calls: the decode-path replay cuts it
    # the same way, so its rows are the served ones (kvproxy.scoring.prompt_fill)
    prompt_fill: PromptFillSpec | None = None


class PromptFillSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch: Annotated[int, Field(ge=1)] = 2048
    ubatch: Annotated[int, Field(ge=1)] = 512
    checkpoints: bool = True
    checkpoint_min_step: Annotated[int, Field(ge=0)] = 8192
    # where the primary saw user messages start in this prompt (llama-server with Jinja templates
    # cuts there; kvproxy.model.message_spans): token positions inside the prompt
    user_starts: list[Annotated[int, Field(ge=0)]] = []


def _fill(spec: PromptFillSpec) -> PromptFill:
    fields = spec.model_dump()
    return PromptFill(**{**fields, "user_starts": ()}).for_prompt(fields["user_starts"])


def _embedded(request: Request) -> EmbeddedDeployment:
    for d in request.app.state.deployments:
        if isinstance(d, EmbeddedDeployment):
            return d
    raise OpenAIError(404, "This kvproxy has no embedded deployment to score with.", code="not_found")


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    d = _embedded(request)
    return {
        "model": d.name,
        "score": d.ready,
        "primary": d.backend.kv.as_dict(),
        "reference": (d.reference_kv or d.backend.kv).as_dict(),
        "n_ctx": d.backend.n_ctx,
        # its contexts' micro-batch: it sizes the sliding-window cache, so a replay matches a primary's
        # rows only with the primary's (-ub), as it does only with its thread count on a CPU
        "n_ubatch": d.backend.n_ubatch,
        "score_path": d.score_path,
        "device": str(d.backend.offload),
    }


@router.post("/score")
async def score(body: ScoreBody, request: Request) -> dict[str, Any]:
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
    if body.prompt_fill is not None and any(
        p >= len(body.prompt_tokens) for p in body.prompt_fill.user_starts
    ):
        raise OpenAIError(400, "a user start lies outside the prompt", param="prompt_fill.user_starts")
    try:
        fill = _fill(body.prompt_fill) if body.prompt_fill is not None else None
        job = ScoreRequest(body.prompt_tokens, body.token_ids, body.check_ids, fill)
        s = await d.scorer.score_request(job)
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from exc
    return {
        "estimator": "exact",
        "kld": s.kld.tolist(),
        "same_top": s.same_top.tolist(),
        "p_ref": s.p_ref.tolist(),
        "p_primary": s.p_primary.tolist(),
        "check_logprobs": s.check_logprobs,
    }

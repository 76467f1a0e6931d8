"""Scorers for HTTP primaries: what the reference is, found out once, and scoring a job on it.

A kvproxy scoring server (``kvproxy backend``) answers ``/kvproxy/v1/info`` and scores exactly; a
plain llama-server says 404 there and is scored per position from its top-K logprobs.
"""

from __future__ import annotations

from kvproxy.kld import PositionScores
from kvproxy.shadow.job import ShadowJob
from kvproxy.upstream.llama_server import LlamaServerReference, prompt_tokens_chat, prompt_tokens_text
from kvproxy.upstream.replicas import ReplicaPool
from kvproxy.upstream.score_client import ScoreRouteReference, probe_score_route

Reference = LlamaServerReference | ScoreRouteReference


class ReferenceResolver:
    """Which kind of reference a pool is: asked at start-up and, if it could not be reached then,
    again before the first job (a connection error fails that job and is asked again)."""

    def __init__(self, pool: ReplicaPool, *, top_k: int) -> None:
        self.pool = pool
        self.top_k = top_k
        self.reference: Reference | None = None

    @property
    def estimator(self) -> str:
        if self.reference is None:
            return "undetermined"
        return "exact" if isinstance(self.reference, ScoreRouteReference) else f"top-{self.top_k}"

    @property
    def score_path(self) -> str:
        """A scoring server says its own; a plain llama-server scores per position, one token a
        step on cached prefixes, against the rows the primary served: the decode path."""
        if self.reference is None:
            return "undetermined"
        if isinstance(self.reference, ScoreRouteReference):
            return self.reference.info.score_path
        return "decode"

    async def resolve(self) -> Reference:
        if self.reference is None:
            info = await probe_score_route(self.pool)
            self.reference = (
                ScoreRouteReference(self.pool, info)
                if info is not None
                else LlamaServerReference(self.pool, top_k=self.top_k)
            )
        return self.reference


class HttpScorer:
    """Scores an HTTP primary's job: the primary tokenizes the prompt, the reference scores."""

    def __init__(self, primary: ReplicaPool, reference: ReferenceResolver) -> None:
        self.primary = primary
        self.reference = reference

    async def score(self, job: ShadowJob) -> PositionScores:
        reference = await self.reference.resolve()
        if job.report is None:
            raise ValueError("an HTTP primary's job carries what the primary reported")
        source = job.source or {}
        if "messages" in source:
            prompt = await prompt_tokens_chat(self.primary, source["messages"])
        else:
            prompt = await prompt_tokens_text(self.primary, source.get("prompt", ""))
        return await reference.score(prompt, job.report)

"""A deployment served by llama-server replicas, scored on its reference (if it has one)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import orjson

from kvproxy.backends.base import KVConfig
from kvproxy.deployments.base import DeploymentBase, ShadowOptions
from kvproxy.deployments.spec import ServerSpec
from kvproxy.kld import PositionScores
from kvproxy.model.memory import AttentionShape, kv_memory_summary
from kvproxy.scoring.job import ShadowJob
from kvproxy.scoring.llama_server import LlamaServerReference
from kvproxy.scoring.prompt_fill import PromptFill
from kvproxy.scoring.score_client import ScoreRouteReference
from kvproxy.scoring.scorers import HttpScorer, ReferenceResolver
from kvproxy.scoring.whatif_client import WhatIfReading, read_what_if, unavailable
from kvproxy.shadow.guard import Guard
from kvproxy.shadow.pool import ShadowSampler
from kvproxy.tasks import cancel_and_wait
from kvproxy.telemetry.export import export_kv_memory
from kvproxy.telemetry.metrics import Metrics
from kvproxy.upstream.llama_server import LlamaServerPrimary
from kvproxy.upstream.replicas import ReplicaPool, UpstreamError, UpstreamFailure

log = logging.getLogger(__name__)

# What asking the primary for its top-20 logprobs costs a client (issue 25): measured side by side
# by benchmarks/shadow_itl.py (docs/benchmarks.md), and on an H100 in docs/reference-design.md
LOGPROBS_COST = (
    "shadowed requests' inter-token latency +{cpu} at p50 on a 2-core CPU "
    "(benchmarks/shadow_itl.py); 2.3 -> 3.8-5.4 ms a token on an H100 GPU"
)
LOGPROBS_COST_CPU = "7 %"


class HttpDeployment(DeploymentBase):
    def __init__(
        self,
        name: str,
        *,
        primary_pool: ReplicaPool,
        reference_pool: ReplicaPool | None,
        primary_kv: KVConfig | None,
        reference_kv: KVConfig | None,
        shadow: ShadowOptions,
        guard: Guard | None = None,
        top_k: int = 20,
        primary_logprobs: bool = False,
        prompt_fill: PromptFill | None = None,
        metrics: Metrics | None = None,
        servers: dict[str, tuple[AttentionShape, ServerSpec]] | None = None,
    ) -> None:
        super().__init__(name, primary_kv=primary_kv, reference_kv=reference_kv, guard=guard, metrics=metrics)
        # per role, the model's shape and how its llama-servers were started (the deployments
        # file's `server` tables): what the KV figures need
        self.servers = servers or {}
        self.primary_pool = primary_pool
        self.reference_pool = reference_pool
        self.build: str | None = None  # the primary's llama.cpp build (its /props build_info), once read
        self.top_k = top_k
        # ask the primary for top-K logprobs on shadowed requests (the top-K estimator needs them;
        # they slow the primary: docs/benchmarks.md), else send shadowed requests unchanged
        self.primary_logprobs = primary_logprobs
        self.primary = LlamaServerPrimary(primary_pool, top_k=top_k, events=self.events)
        self.resolver = (
            ReferenceResolver(reference_pool, top_k=top_k, prompt_fill=prompt_fill)
            if reference_pool
            else None
        )
        # the scoring server's live what-if, read in the background (docs/what-if.md, proxy mode)
        self.what_if_reading = unavailable(
            "not read yet" if reference_pool else "no reference: nothing is scored, so nothing is replayed"
        )
        self._what_if_task: asyncio.Task[None] | None = None
        if self.resolver is None:  # nothing to score on: nothing is sampled
            self._start_shadow(dataclasses.replace(shadow, sampler=ShadowSampler(0.0)), _NoReference())
        else:
            self._start_shadow(shadow, HttpScorer(primary_pool, self.resolver))
        if metrics is not None:
            self._export(metrics)

    def backends_up(self) -> tuple[tuple[str, str, bool], ...]:
        pools = [("primary", self.primary_pool)]
        if self.reference_pool is not None:
            pools.append(("reference", self.reference_pool))
        return tuple((role, r.url, r.healthy) for role, pool in pools for r in pool.replicas)

    def _export(self, metrics: Metrics) -> None:
        for role, kv in (("primary", self.primary_kv), ("reference", self._declared_reference_kv)):
            if kv is not None and role in self.servers:
                shape, srv = self.servers[role]
                export_kv_memory(metrics, self.name, role, shape, kv, srv.ctx_size, **srv.layout())

    @property
    def scores_top_k(self) -> bool:
        """The reference is known to be a plain llama-server (the top-K estimator, which needs the
        primary's top K); False while it is not known yet."""
        return self.resolver is not None and isinstance(self.resolver.reference, LlamaServerReference)

    @property
    def estimator(self) -> str:  # type: ignore[override]
        return self.resolver.estimator if self.resolver is not None else "none"

    @property
    def score_path(self) -> str:  # type: ignore[override]
        return self.resolver.score_path if self.resolver is not None else "none"

    @property
    def ready(self) -> bool:
        return any(r.healthy for r in self.primary_pool.replicas)

    async def start(self) -> None:
        cost = self.describe_logprobs()
        if cost is not None:
            log.warning("deployment %s: %s", self.name, cost)
        self.primary_pool.start()
        await self.primary_pool.check_health()
        await self.read_build()
        await self.check_servers()
        if self.reference_pool is not None and self.resolver is not None:
            self.reference_pool.start()
            with contextlib.suppress(*UpstreamError, UpstreamFailure):  # asked again before a job
                await self.resolve_reference()
        self.shadow.pool.start()
        if self.reference_pool is not None:
            self._what_if_task = asyncio.create_task(self._poll_what_if(), name="kvproxy-what-if")

    async def _poll_what_if(self) -> None:
        """The scoring server's what-if every health interval, off the request path: the status
        and what-if routes show the last reading, and never wait for a scoring server."""
        assert self.reference_pool is not None
        while True:
            try:
                await self.read_what_if()
            except Exception:  # read_what_if says every failure in its reading; this keeps the loop
                log.exception("deployment %s: reading the what-if failed", self.name)
            await asyncio.sleep(self.reference_pool.health_interval)

    async def read_what_if(self) -> None:
        reading = await self._what_if_reading()
        if reading.reason is not None and reading.reason != self.what_if_reading.reason:
            log.info("deployment %s: no what-if: %s", self.name, reading.reason)
        self.what_if_reading = reading

    async def _what_if_reading(self) -> WhatIfReading:
        """A `kvproxy backend` reference's what-if, from its first healthy replica (each replica
        replays the share of jobs it scores: with several, the figures are that one's; the
        reading's ``source`` names it)."""
        reference = self.resolver.reference if self.resolver is not None else None
        if isinstance(reference, ScoreRouteReference):
            replicas = reference.pool.replicas
            replica = next((r for r in replicas if r.healthy), replicas[0])
            return await read_what_if(replica, reference.info.model)
        if reference is None:
            return unavailable(
                "the reference's kind is not known yet (its /kvproxy/v1/info has not answered)"
            )
        return unavailable(
            "the reference is a plain llama-server: the what-if runs in a `kvproxy backend --what-if "
            "CONFIGS` as the reference (docs/what-if.md)"
        )

    def what_if_status(self) -> tuple[dict[str, Any] | None, str | None]:
        return self.what_if_reading.what_if, self.what_if_reading.reason

    async def read_build(self) -> None:
        """The primary's llama.cpp build, for ``system_fingerprint`` (kvproxy.serving.base): the
        first replica's /props that says it; unknown when none does."""
        for replica in self.primary_pool.replicas:
            with contextlib.suppress(*UpstreamError, ValueError, KeyError, TypeError, AttributeError):
                status, body = await replica.get("/props", timeout=5)
                build = orjson.loads(body).get("build_info") if status == 200 else None
                if isinstance(build, str) and build.strip():
                    self.build = build.strip()
                    return

    async def check_servers(self) -> None:
        """Say so when a llama-server runs other slots than its `server` table declares: the KV
        figures would be sized for the wrong number of streams (its /props reports its slots)."""
        pools = [("primary", self.primary_pool), ("reference", self.reference_pool)]
        for role, pool in pools:
            if pool is None or role not in self.servers:
                continue
            declared = self.servers[role][1].n_seq
            for replica in pool.replicas:
                with contextlib.suppress(*UpstreamError, ValueError, KeyError, TypeError):
                    status, body = await replica.get("/props", timeout=5)
                    slots = int(orjson.loads(body)["total_slots"]) if status == 200 else declared
                    if slots != declared:
                        log.warning(
                            "deployment %s: %s %s runs %d slots, its server table says %d: the KV "
                            "figures assume %d",
                            self.name,
                            role,
                            replica.url,
                            slots,
                            declared,
                            declared,
                        )

    async def resolve_reference(self) -> None:
        assert self.resolver is not None
        known = self.resolver.reference is not None
        await self.resolver.resolve()
        if not known and self.scores_top_k and not self.primary_logprobs:
            log.warning(
                "deployment %s: the reference is a plain llama-server (the top-%d estimator), which "
                "compares the primary's top %d logprobs; they are not asked for (primary_logprobs is "
                "off), so shadowed requests are skipped (kvproxy_shadow_skipped_total{reason="
                '"logprobs_off"}). Turn it on (%s), or score on a `kvproxy backend` (exact, nothing '
                "asked of the primary)",
                self.name,
                self.top_k,
                self.top_k,
                logprobs_cost(),
            )

    def describe_logprobs(self) -> str | None:
        """What the opt-in costs, said where it is on (the banner and the start-up log)."""
        if not self.primary_logprobs:
            return None
        return (
            f"shadowed requests ask the primary for its top-{self.top_k} logprobs (primary_logprobs): "
            f"{logprobs_cost()}"
        )

    @property
    def reference_kv(self) -> KVConfig | None:
        """As declared, unless the reference is a kvproxy scoring server: it says its own."""
        reference = self.resolver.reference if self.resolver is not None else None
        if isinstance(reference, ScoreRouteReference):
            return reference.info.reference_kv
        return self._declared_reference_kv

    @reference_kv.setter
    def reference_kv(self, kv: KVConfig | None) -> None:
        self._declared_reference_kv = kv

    async def stop(self) -> None:
        await self.cancel_probes()
        await cancel_and_wait([self._what_if_task])
        await self.shadow.pool.stop()
        await self.primary_pool.close()
        if self.reference_pool is not None:
            await self.reference_pool.close()

    def close(self) -> None:
        pass

    def kv_figures(self) -> dict[str, Any] | None:
        """KV bytes of one primary replica, as its llama-server sizes them, where the deployments
        file says how it was started (its `server` table); else unknown."""
        kv = self.primary_kv
        if kv is None or "primary" not in self.servers:
            return None
        shape, srv = self.servers["primary"]
        return kv_memory_summary(shape, kv.cache_type_k, kv.cache_type_v, srv.ctx_size, **srv.layout())

    def backend_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"primary_replicas": self.primary_pool.status()}
        if self.reference_pool is not None and self.resolver is not None:
            reference = self.resolver.reference
            out["reference_replicas"] = self.reference_pool.status()
            out["reference_kind"] = (
                "kvproxy-score" if isinstance(reference, ScoreRouteReference) else "llama-server"
            )
            if isinstance(reference, ScoreRouteReference):
                out["replica_consistency"] = reference.consistency()
        return out


def logprobs_cost() -> str:
    return LOGPROBS_COST.format(cpu=LOGPROBS_COST_CPU)


class _NoReference:
    """A deployment without a reference samples nothing, so this is never asked to score."""

    async def score(self, job: ShadowJob) -> PositionScores:
        raise RuntimeError("this deployment has no reference to score on")

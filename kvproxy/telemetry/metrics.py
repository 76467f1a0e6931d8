"""Prometheus metrics: the quality signal, the shadow path, serving, and KV-cache memory.

Names carry the ``kvproxy_`` prefix and base units; counters end in ``_total``. Every label value
comes from configuration (deployment names, KV types, estimators, route templates, fixed buckets),
never from a request: a client cannot create series (an unknown model is a 404, not a label).
The registry is injected, so each test can use a fresh one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvproxy.kld import PositionScores
from kvproxy.telemetry.collector import DeploymentCollector

# per-token KLD resolves 1e-5 .. 10 (half-decade steps)
KLD_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DELTA_P_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

# the method label's values; any other method the HTTP parser accepts (PROPFIND, M-SEARCH, ...: 35 in
# all) counts as "other", so a client cannot add series
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# the token's position in its context: quantization loss tends to grow with context
POSITION_BUCKETS = ((512, "<512"), (2048, "512-2k"), (8192, "2k-8k"), (32768, "8k-32k"))
POSITION_OVER = ">32k"

# score_path: which llama.cpp numerics scored both sides (decode: one token a step, as served;
# prefill: a chunked replay, which understates on CUDA): never compare series across paths
QUALITY_LABELS = (
    "deployment",
    "model",
    "cache_type_k",
    "cache_type_v",
    "reference_type",
    "estimator",
    "score_path",
)


def position_bucket(position: int) -> str:
    for limit, name in POSITION_BUCKETS:
        if position < limit:
            return name
    return POSITION_OVER


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # the deployments' state (queue, drift, guard, replicas, slots), read at scrape time
        self.deployments = DeploymentCollector()
        registry.register(self.deployments)
        q = QUALITY_LABELS
        self.token_kld = Histogram(
            "kvproxy_token_kld",
            "Per-token KL(reference || primary), nats, by the token's context position.",
            (*q, "context"),
            buckets=KLD_BUCKETS,
            registry=registry,
        )
        # A family of its own rather than a label on the quality series (which would split every
        # existing series and the queries over them): per-token KLD by what the answer was.
        self.turn_token_kld = Histogram(
            "kvproxy_turn_token_kld",
            "Per-token KL(reference || primary), nats, by turn: text, or tool_call (an answer "
            "holding tool calls; all its tokens are scored).",
            ("deployment", "model", "turn"),
            buckets=KLD_BUCKETS,
            registry=registry,
        )
        self.request_mean_kld = Histogram(
            "kvproxy_request_mean_kld",
            "Mean per-token KLD of each scored request, nats.",
            q,
            buckets=KLD_BUCKETS,
            registry=registry,
        )
        self.delta_p = Histogram(
            "kvproxy_token_delta_p",
            "Q(t) - P(t) of each emitted token (primary minus reference).",
            q,
            buckets=DELTA_P_BUCKETS,
            registry=registry,
        )
        self.delta_p_squared = Counter(
            "kvproxy_token_delta_p_squared",
            "Sum of squared Δp: RMS Δp = sqrt(rate(this) / rate(scored tokens)).",
            q,
            registry=registry,
        )
        self.served_divergence = Histogram(
            "kvproxy_served_divergence",
            "Per-token coarse KL(served top-K || replay of the same KV config on the score path): what "
            "serving added (batching several streams, another build), apart from the KV config's cost.",
            ("deployment", "model", "cache_type_k", "cache_type_v", "score_path"),
            buckets=KLD_BUCKETS,
            registry=registry,
        )
        self.scored_tokens = Counter(
            "kvproxy_scored_tokens", "Tokens scored against the reference.", q, registry=registry
        )
        self.same_top_tokens = Counter(
            "kvproxy_same_top_tokens",
            "Scored tokens whose most likely next token is the same on both sides.",
            q,
            registry=registry,
        )
        self.shadow_requests = Counter(
            "kvproxy_shadow_requests",
            "Shadow jobs by outcome (sampled, scored, dropped, failed; shed: not sampled, proxy saturated).",
            ("deployment", "outcome"),
            registry=registry,
        )
        self.shadow_skipped = Counter(
            "kvproxy_shadow_skipped",
            'Sampled jobs not scored although nothing failed, by reason (part of outcome="dropped"): '
            "logprobs_off, logprobs_refused, tool_calls, reasoning, several_choices, no_token_count, "
            "retokenize_mismatch, unreplayable (a cached prompt prefix no replay reproduces).",
            ("deployment", "reason"),
            registry=registry,
        )
        self.shadow_token_ids = Counter(
            "kvproxy_shadow_token_ids",
            "Scored jobs by where their generated token ids came from: primary (in process), logprobs "
            "(the primary's own), retokenized (its answer's text re-tokenized by its tokenizer).",
            ("deployment", "source"),
            registry=registry,
        )
        self.shadow_sustainable_rate = Gauge(
            "kvproxy_shadow_sustainable_rate",
            "Scoring capacity / generation load: the shadow rate the scorer keeps up with (NaN until "
            "known; kvproxy.shadow.capacity).",
            ("deployment",),
            registry=registry,
        )
        self.shadow_lag = Histogram(
            "kvproxy_shadow_lag_seconds",
            "From the end of a response to its score being recorded.",
            ("deployment",),
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.connections_open = Gauge(
            "kvproxy_connections_open",
            "Open client connections (capped by --max-connections).",
            registry=registry,
        )
        self.connections_closed = Counter(
            "kvproxy_connections_closed",
            "Client connections the server closed on its own limits, by reason: header_timeout, "
            "body_timeout, unread_body (answered before its body was in), evicted (the oldest waiting "
            "for its headers, at the cap), over_cap (503 at the cap), refused (past the hard ceiling).",
            ("reason",),
            registry=registry,
        )
        self.requests = Counter(
            "kvproxy_requests",
            "HTTP requests by route and status.",
            ("route", "method", "status"),
            registry=registry,
        )
        self.request_duration = Histogram(
            "kvproxy_request_duration_seconds",
            "End-to-end request time (for streams: until the last byte).",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "kvproxy_time_to_first_token_seconds",
            "From the request to the first generated text.",
            ("deployment",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "kvproxy_inter_token_latency_seconds",
            "Between two successive pieces of generated text.",
            ("deployment",),
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "kvproxy_prompt_tokens", "Prompt tokens of finished requests.", ("deployment",), registry=registry
        )
        self.completion_tokens = Counter(
            "kvproxy_completion_tokens",
            "Completion tokens of finished requests.",
            ("deployment",),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "kvproxy_upstream_errors", "Upstream failures by kind.", ("deployment", "kind"), registry=registry
        )
        self.drift_transitions = Counter(
            "kvproxy_drift_transitions",
            "Changes of drift state, by the state entered.",
            ("deployment", "state"),
            registry=registry,
        )
        self.guard_switches = Counter(
            "kvproxy_guard_switches",
            "Guard route changes, by where traffic went (fallback or primary).",
            ("deployment", "to"),
            registry=registry,
        )
        self.guard_probes = Counter(
            "kvproxy_guard_probes",
            "Sampled requests replayed on a guarded primary while on the fallback, by outcome.",
            ("deployment", "outcome"),
            registry=registry,
        )
        self.context_device = Gauge(
            "kvproxy_llama_context_device",
            "1 for the device each in-process llama.cpp context computes on (CPU, CUDA0, ...).",
            ("deployment", "context", "device"),
            registry=registry,
        )
        kv = ("deployment", "role", "cache_type_k", "cache_type_v")
        self.kv_bytes_per_token = Gauge(
            "kvproxy_kv_cache_bytes_per_token",
            "KV-cache bytes one token costs (every layer holding it).",
            kv,
            registry=registry,
        )
        self.kv_bytes = Gauge(
            "kvproxy_kv_cache_bytes",
            "KV-cache bytes llama.cpp allocates at the configured context (checked within 1 %).",
            kv,
            registry=registry,
        )
        self.kv_f16_bytes = Gauge(
            "kvproxy_kv_cache_f16_bytes",
            "What the same KV cache would take in f16.",
            kv,
            registry=registry,
        )
        self.kv_saving_ratio = Gauge(
            "kvproxy_kv_cache_saving_ratio",
            "f16 bytes divided by this config's bytes.",
            kv,
            registry=registry,
        )
        self.recurrent_bytes = Gauge(
            "kvproxy_recurrent_state_bytes",
            "Recurrent-state bytes of a hybrid model (f32, one state per sequence; not KV, not "
            "changed by the KV types, not in the saving ratio).",
            ("deployment", "role"),
            registry=registry,
        )

    def observe_scores(
        self, labels: dict[str, str], scores: PositionScores, positions: Iterable[int]
    ) -> None:
        """Record one scored job: its tokens, their positions, and the request's mean."""
        n = len(scores)
        if n == 0:
            return
        lv = [labels[k] for k in QUALITY_LABELS]
        by_bucket: dict[str, list[float]] = {}
        for value, pos in zip(scores.kld.tolist(), positions, strict=True):
            by_bucket.setdefault(position_bucket(pos), []).append(value)
        for bucket, values in by_bucket.items():
            h = self.token_kld.labels(*lv, bucket)
            for v in values:
                h.observe(v)
        dp = self.delta_p.labels(*lv)
        for v in scores.delta_p.tolist():
            dp.observe(v)
        self.delta_p_squared.labels(*lv).inc(float(np.sum(scores.delta_p**2)))
        self.request_mean_kld.labels(*lv).observe(float(np.mean(scores.kld)))
        self.scored_tokens.labels(*lv).inc(n)
        self.same_top_tokens.labels(*lv).inc(int(np.count_nonzero(scores.same_top)))


class RequestMetricsMiddleware:
    """Pure ASGI middleware: requests by route template and status, and their duration (for a
    stream, until its last byte). Unmatched paths share one label value."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in HTTP_METHODS else "other"  # the parser accepts WebDAV's too
            self.metrics.requests.labels(name, method, str(status)).inc()
            self.metrics.request_duration.labels(name).observe(time.perf_counter() - start)


def default_metrics() -> Metrics:
    """A registry of the process's own, with the process collector (RSS, CPU, open files)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
    return Metrics(registry)

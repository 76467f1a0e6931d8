"""The what-if of an embedded deployment from its settings (``--what-if``, ``--what-if-rate``,
``--what-if-kld-budget``): candidates checked, their KV costs, the scorer that replays them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvproxy.backends.base import KVConfig
from kvproxy.calibrate import parse_config
from kvproxy.config import Settings
from kvproxy.model.memory import check_head_sizes, kv_bytes_per_token, kv_cache_allocated_bytes
from kvproxy.scoring.embedded import make_scorer
from kvproxy.scoring.whatif_replay import WhatIfReplay
from kvproxy.shadow.whatif import ConfigCost, WhatIfTracker
from kvproxy.shadow.whatif_scorer import WhatIf, WhatIfScorer
from kvproxy.telemetry.metrics import Metrics
from kvproxy.telemetry.whatif import export_whatif

if TYPE_CHECKING:
    from kvproxy.backends.embedded import EmbeddedBackend
    from kvproxy.deployments.embedded import EmbeddedDeployment

log = logging.getLogger(__name__)


def candidate_configs(settings: Settings, served: KVConfig, reference: KVConfig) -> list[KVConfig]:
    """``--what-if`` as KV configs, in the operator's order, without repeats; the served and the
    reference config are left out (both are always on the frontier: the served one scored by the
    shadow scorer, the reference at KLD 0)."""
    out: list[KVConfig] = []
    for spec in settings.what_if:
        kv = parse_config(spec)
        if kv in (served, reference):
            log.info(
                "what-if: %s is the %s config, scored anyway", kv, "served" if kv == served else "reference"
            )
        elif kv not in out:
            out.append(kv)
    return out


def check_candidates(settings: Settings, backend: EmbeddedBackend) -> None:
    """What llama.cpp would refuse a candidate's context for, before anything is loaded."""
    for spec in settings.what_if:
        kv = parse_config(spec)
        try:
            check_head_sizes(
                backend.info.attention, kv.cache_type_k, kv.cache_type_v, flash_attn=settings.flash_attn
            )
        except ValueError as exc:
            raise ValueError(f"what-if config {kv}: {exc}") from None


def whatif_scorer(settings: Settings, backend: EmbeddedBackend, reference: KVConfig) -> WhatIfScorer | None:
    """The deployment's scorer with its what-if, or None when ``--what-if`` names no candidate."""
    candidates = candidate_configs(settings, backend.kv, reference)
    if not candidates:
        return None
    check_candidates(settings, backend)
    shape, slots = backend.info.attention, backend.n_slots
    layout = backend.kv_layout(slots)

    def cost(kv: KVConfig, role: str) -> ConfigCost:
        at_ctx = kv_cache_allocated_bytes(
            shape, kv.cache_type_k, kv.cache_type_v, backend.n_ctx * slots, **layout
        )
        return ConfigCost(kv, role, kv_bytes_per_token(shape, kv.cache_type_k, kv.cache_type_v), at_ctx)

    tracker = WhatIfTracker(
        cost(backend.kv, "served"),
        [cost(kv, "candidate") for kv in candidates],
        cost(reference, "reference"),
        budget=settings.what_if_kld_budget,
        rate=settings.what_if_rate,
        n_ctx=backend.n_ctx,
        window=settings.status_window,
    )
    s = settings

    def replay() -> WhatIfReplay:
        return WhatIfReplay(
            loaded_model(backend),
            candidates=candidates,
            reference=reference,
            n_ctx=s.ctx_size,
            threads=s.threads,
            flash_attn=s.flash_attn,
            batch=min(s.batch_size, s.ctx_size),
            ubatch=backend.n_ubatch,
        )

    return WhatIfScorer(lambda: make_scorer(backend, reference), WhatIf(replay, tracker))


def loaded_model(backend: EmbeddedBackend) -> object:
    """The served ``llama_model`` (llama_cpp._internals.LlamaModel) the candidates' contexts share,
    as :func:`kvproxy.scoring.embedded.make_scorer` takes it."""
    llama = backend._llama
    if llama is None:
        raise RuntimeError("model not loaded")
    return llama._model


def attach(d: EmbeddedDeployment, metrics: Metrics | None) -> None:
    """Wire a built deployment's what-if: its backlog is the shadow queue; status and metrics."""
    scorer = d.scorer
    if not isinstance(scorer, WhatIfScorer):
        return
    pool = d.shadow.pool
    scorer.whatif.backlog = lambda: pool.queued
    d.whatif = scorer.whatif.tracker
    if metrics is not None:
        export_whatif(metrics.registry, d.name, scorer.whatif.tracker)

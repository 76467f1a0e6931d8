"""The calibration baseline file (``baseline.json``), written by ``kvproxy calibrate`` and read by
the drift detector of a deployment that names it (``[deployments.drift] baseline = "..."``).

Per KV config it holds the mean KLD and ``log_sigma``: the spread (standard deviation) of the log of
the mean KLD over request-sized spans of ``segment_tokens`` tokens, which is the noise scale the
detector standardises each request's log mean KLD by. The file says which path calibration scored
on (``score_path``: decode, the numerics generation serves, by default); a deployment scored on the
other path, or top-K through a plain llama-server (which reads lower, see docs/kld.md), is compared
against it at start-up with a warning in the log: a lower reading makes the detector conservative
(slower to flag), never noisier, but a prefill baseline under a decode-path deployment on CUDA can
flag drift that is only the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvproxy.backends.base import KVConfig

SEGMENT_TOKENS = 64  # a typical chat answer's length: the span whose mean the log spread is of


class BaselineEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mean_kld: Annotated[float, Field(ge=0)]
    log_sigma: Annotated[float, Field(gt=0)] | None = None


class BaselineFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    reference: str
    ctx_size: int
    # the numerics calibration scored with: a drift baseline compares like with like only when the
    # deployment scores on the same path (files from before score paths were chunked replays)
    score_path: str = "prefill"
    segment_tokens: int = SEGMENT_TOKENS
    configs: dict[str, BaselineEntry]


@dataclass(frozen=True)
class Baseline:
    mean_kld: float
    log_sigma: float
    score_path: str = "prefill"


def read_baseline(path: Path, kv: KVConfig | None, *, default_log_sigma: float) -> Baseline:
    """The entry of ``path`` for the deployment's primary KV config; a clear ValueError otherwise."""
    if kv is None:
        raise ValueError(
            f"a drift baseline ({path}) needs the primary's KV types: declare cache_type_k/cache_type_v"
        )
    try:
        doc = BaselineFile.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the drift baseline {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        raise ValueError(f"{path} is not a kvproxy calibrate baseline.json: {exc}") from exc
    entry = doc.configs.get(str(kv))
    if entry is None:
        have = ", ".join(doc.configs) or "none"
        raise ValueError(f"{path} has no baseline for the KV config {kv} (it has: {have})")
    if entry.mean_kld == 0.0:
        raise ValueError(f"{path}: {kv} is the calibration's reference (KLD 0), not a baseline")
    sigma = entry.log_sigma if entry.log_sigma is not None and math.isfinite(entry.log_sigma) else None
    return Baseline(entry.mean_kld, sigma or default_log_sigma, doc.score_path)

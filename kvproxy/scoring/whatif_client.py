"""The client side of a scoring server's live what-if (``GET /kvproxy/v1/what-if`` of a ``kvproxy
backend --what-if ...``), so a proxy shows its scoring server's frontier as its own.

The answer is untrusted bytes from another process: it is read with a small timeout and a small
size cap, validated by the pydantic models below (the shape :class:`kvproxy.shadow.whatif.
WhatIfTracker` writes, every config a real KV config, the served, reference and budget-pick
labels among the configs), and dropped when anything is off. Nothing here ever raises: every
failure is a :class:`WhatIfReading` without an object and with a reason a person can act on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType
from kvproxy.upstream.replicas import Replica, UpstreamError, UpstreamFailure, is_timeout

WHATIF_PATH = "/kvproxy/v1/what-if"
# a what-if of every one of the 64 K/V pairs llama.cpp takes is about 40 KB: four times that, and no more
MAX_BODY_BYTES = 256 * 1024
MAX_CONFIGS = 80
TIMEOUT_SECONDS = 2.0

Count = Annotated[int, Field(ge=0)]
Figure = Annotated[float, Field(allow_inf_nan=False)] | None
Label = Annotated[str, Field(max_length=32)]


class _Answer(BaseModel):
    """Read leniently, as the score contract's answers are (fields a newer server adds are
    ignored); the object passed on holds only the fields the server sent that are known here."""

    model_config = ConfigDict(extra="ignore")


class KLDFigures(_Answer):
    """llama-perplexity's statistics of one config (kvproxy.kld.KLDSummary.as_dict); the reference
    carries only the first few (its KLD is 0 by definition)."""

    tokens: Count
    mean: Figure = None
    mean_error: Figure = None
    median: Figure = None
    p90: Figure = None
    p95: Figure = None
    p99: Figure = None
    p999: Figure = None
    max: Figure = None
    same_top: Figure = None
    same_top_error: Figure = None
    rms_delta_p: Figure = None
    rms_delta_p_error: Figure = None


class ConfigRow(_Answer):
    config: Label
    cache_type_k: KVCacheType
    cache_type_v: KVCacheType
    role: Literal["served", "candidate", "reference"]
    bytes_per_token: Count
    allocated_bytes: Count
    pareto: bool
    kld: KLDFigures

    @model_validator(mode="after")
    def _label_is_the_config(self) -> Self:
        """The label is the config's own spelling (the page draws it): nothing else gets through."""
        if self.config != str(KVConfig(self.cache_type_k, self.cache_type_v)):
            raise ValueError(
                f"config {self.config!r} is not {self.cache_type_k.value}/{self.cache_type_v.value}"
            )
        return self


class WhatIfJobs(_Answer):
    scored: Count = 0
    failed: Count = 0
    shed: Count = 0
    not_sampled: Count = 0


class WhatIfStatus(_Answer):
    """One deployment's ``what_if`` object (kvproxy.shadow.whatif.WhatIfTracker.status)."""

    rate: Annotated[float, Field(ge=0, le=1)]
    kld_budget: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    within_budget: Label | None
    served: Label
    reference: Label
    score_path: Annotated[str, Field(max_length=16)]
    n_ctx: Count
    scored_tokens: Count
    jobs: WhatIfJobs
    configs: Annotated[list[ConfigRow], Field(min_length=2, max_length=MAX_CONFIGS)]

    @model_validator(mode="after")
    def _labels_are_configs(self) -> Self:
        roles = {row.config: row.role for row in self.configs}
        if len(roles) != len(self.configs):
            raise ValueError("a config is listed twice")
        if roles.get(self.served) != "served" or roles.get(self.reference) != "reference":
            raise ValueError("the served or the reference config is not among the configs")
        if (
            sum(r == "served" for r in roles.values()) != 1
            or sum(r == "reference" for r in roles.values()) != 1
        ):
            raise ValueError("one served and one reference config")
        if self.within_budget is not None and self.within_budget not in roles:
            raise ValueError("the budget pick is not among the configs")
        return self


class WhatIfEntry(_Answer):
    name: Annotated[str, Field(max_length=512)]
    what_if: WhatIfStatus | None = None


class WhatIfAnswer(_Answer):
    """``GET /kvproxy/v1/what-if``: per deployment of the server (a ``kvproxy backend`` has one)."""

    deployments: Annotated[list[WhatIfEntry], Field(max_length=64)]


@dataclass(frozen=True)
class WhatIfReading:
    """A scoring server's what-if as read (``what_if`` with its ``source``), or why there is none."""

    what_if: dict[str, Any] | None
    reason: str | None


def unavailable(reason: str) -> WhatIfReading:
    return WhatIfReading(None, reason)


def parse_what_if(body: bytes, deployment: str, url: str, read_at: float) -> WhatIfReading:
    """The what-if of ``deployment`` (the server's own name for it, its /kvproxy/v1/info ``model``;
    a server with one deployment answers for it whatever its name) from the route's answer."""
    try:
        answer = WhatIfAnswer.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]  # where and what, never the untrusted value itself
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        return unavailable(
            f"the scoring server {url} answered a what-if that is not valid ({where}: {first['type']})"
        )
    named = [e for e in answer.deployments if e.name == deployment]
    entries = named or (answer.deployments if len(answer.deployments) == 1 else [])
    if not entries:
        return unavailable(f"the scoring server {url} has no deployment {deployment!r} in its what-if")
    status = entries[0].what_if
    if status is None:
        return unavailable(
            f"the scoring server {url} runs no what-if (start it with --what-if CONFIGS: docs/what-if.md)"
        )
    what_if = status.model_dump(mode="json", exclude_unset=True)
    return WhatIfReading({**what_if, "source": {"url": url, "read_at": read_at}}, None)


async def read_what_if(
    replica: Replica,
    deployment: str,
    *,
    timeout: float = TIMEOUT_SECONDS,
    max_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
) -> WhatIfReading:
    """Ask one scoring server for its what-if, with the credentials the proxy sends it for scoring
    (the reference's ``api_key_env``). Its what-if route is an admin route: a server started with
    an ``--admin-token`` other than that key refuses, and the reading says so."""
    url = replica.url
    try:
        status, body = await replica.get(WHATIF_PATH, timeout=timeout, max_bytes=max_bytes)
    except UpstreamFailure:  # the only one get raises: past the size cap
        return unavailable(f"the scoring server {url} answered a what-if larger than {max_bytes:,} bytes")
    except UpstreamError as exc:
        if is_timeout(exc):
            return unavailable(f"the scoring server {url} did not answer its what-if within {timeout:g} s")
        return unavailable(f"the scoring server {url} is unreachable ({type(exc).__name__})")
    if status in (401, 403):
        return unavailable(
            f"the scoring server {url} refused the proxy's key on its admin route {WHATIF_PATH} "
            f"(HTTP {status}): start it without --admin-token, or with the key the proxy sends it"
        )
    if status == 404:
        return unavailable(
            f"the scoring server {url} has no what-if route (a kvproxy from before the what-if)"
        )
    if status != 200:
        return unavailable(f"the scoring server {url} answered its what-if with HTTP {status}")
    return parse_what_if(body, deployment, url, clock())

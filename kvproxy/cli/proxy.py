"""Proxy mode: deployments from ``--primary``/``--reference`` or a deployments file."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from pydantic import ValidationError

from kvproxy.cli.options import fail
from kvproxy.config import Settings
from kvproxy.deployments.build import Deployment, build_deployments
from kvproxy.deployments.spec import BackendSpec, DeploymentSpec, ProxyConfig
from kvproxy.telemetry.metrics import Metrics

# per-position scoring on a plain llama-server costs about 6 decodes a token: a lower default rate
# than the embedded one unless asked for
PROXY_SHADOW_RATE = 0.1


def _key_env(name: str) -> str | None:
    """Proxy mode without a file: the upstream's key comes from this variable when it is set."""
    return name if os.environ.get(name) else None


def _split_urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def model_name_of(url: str) -> str:
    """The name a llama-server serves under (its /v1/models), for --primary without --alias."""
    try:
        data = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=5).json()
        return str(data["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise fail(f"could not ask {url} for its model name ({exc}); pass --alias NAME") from None


def _one_deployment(settings: Settings, primary: str, reference: str | None) -> ProxyConfig:
    urls = _split_urls(primary)
    if not urls:
        raise fail("--primary needs at least one URL")
    given = settings.model_fields_set
    ref_type = settings.reference_cache_type
    spec = DeploymentSpec(
        model=settings.alias or model_name_of(urls[0]),
        primary=BackendSpec(
            urls=urls,
            api_key_env=_key_env("KVPROXY_PRIMARY_API_KEY"),
            cache_type_k=settings.cache_type_k if "cache_type_k" in given else None,
            cache_type_v=settings.cache_type_v if "cache_type_v" in given else None,
        ),
        reference=BackendSpec(
            urls=_split_urls(reference),
            cache_type_k=ref_type,
            cache_type_v=ref_type,
            api_key_env=_key_env("KVPROXY_REFERENCE_API_KEY"),
        )
        if reference
        else None,
        shadow_rate=settings.shadow_rate if "shadow_rate" in given else PROXY_SHADOW_RATE,
        primary_logprobs=settings.primary_logprobs,
        queue_size=settings.shadow_queue_size,
    )
    return ProxyConfig(deployments=[spec])


def proxy_deployments(
    settings: Settings,
    primary: str | None,
    reference: str | None,
    config_file: Path | None,
    metrics: Metrics,
) -> list[Deployment]:
    try:
        if config_file is not None:
            if primary is not None or reference is not None:
                raise fail("give --config or --primary/--reference, not both")
            config = ProxyConfig.from_file(config_file)
        else:
            assert primary is not None
            config = _one_deployment(settings, primary, reference)
        return build_deployments(config, settings, metrics=metrics)
    except (ValidationError, ValueError) as exc:
        raise fail(str(exc)) from None

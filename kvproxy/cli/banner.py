"""What start-up prints: the model, the KV configuration and what it costs, access, the proxy map."""

from __future__ import annotations

from kvproxy import __version__
from kvproxy.backends.devices import cpu_build_features, offload
from kvproxy.config import Settings
from kvproxy.deployments.build import Deployment
from kvproxy.deployments.http import HttpDeployment
from kvproxy.model.gguf_info import ModelInfo
from kvproxy.model.memory import kv_memory_summary, llama_n_ubatch


def describe_startup(settings: Settings, info: ModelInfo) -> str:
    """The embedded default: the model, the KV configuration and what it costs per token."""
    shape = info.attention
    k, v = settings.cache_type_k, settings.cache_type_v
    n_ubatch = llama_n_ubatch(settings.batch_size, settings.ctx_size)
    slots = settings.parallel  # one KV stream of --ctx-size cells per slot (kvproxy.backends.slots)
    m = kv_memory_summary(
        shape,
        k,
        v,
        settings.ctx_size * slots,
        n_ubatch=n_ubatch,
        n_seq=slots,
        flash_attn=settings.flash_attn,
    )
    room = (
        f"the {settings.ctx_size:,}-token context"
        if slots == 1
        else f"{slots} slots of {settings.ctx_size:,} tokens"
    )
    deadline = f"{settings.queue_timeout:g} s" if settings.queue_timeout > 0 else "none"
    kv_layers = shape.kv_layers()
    n_swa = sum(layer.swa for layer in kv_layers)
    swa = (
        f", {n_swa} of {len(kv_layers)} layers sliding-window ({shape.sliding_window} tokens)"
        if n_swa
        else ""
    )
    layers = []
    if len(kv_layers) < shape.n_layers:  # hybrid or shared-KV: say which layers hold KV at all
        others = []
        if shape.recurrent_layers:
            others.append(f"{len(shape.recurrent_layers)} recurrent")
        shared = shape.n_layers - len(kv_layers) - len(shape.recurrent_layers)
        if shared:
            others.append(f"{shared} reading an earlier layer's KV")
        layers.append(f"  layers     {len(kv_layers)} of {shape.n_layers} hold KV ({', '.join(others)})")
    if m["recurrent_bytes"]:
        layers.append(
            f"  recurrent  {m['recurrent_bytes'] / 2**20:.2f} MiB of f32 state per sequence, whatever the KV "
            "types (not in the KV figures)"
        )
    return "\n".join(
        [
            f"kvproxy {__version__}",
            f"  model      {settings.alias or info.name} ({info.architecture}) from {info.path}",
            f"  KV cache   K={k.value} V={v.value}, flash attention {'on' if settings.flash_attn else 'off'}",
            f"  KV bytes   {m['bytes_per_token']:,} per token (f16 would be {m['f16_bytes_per_token']:,}: "
            f"{m['bytes_per_token'] / m['f16_bytes_per_token']:.1%}){swa}",
            f"             {m['allocated_bytes'] / 2**20:.1f} MiB allocated for "
            f"{room} (f16: {m['f16_allocated_bytes'] / 2**20:.1f} MiB)",
            f"  slots      {slots} (--parallel), {settings.max_queue} waiting at most, "
            f"queue deadline {deadline}",
            *layers,
            *(
                [
                    f"  what-if    {', '.join(settings.what_if)} replayed on {settings.what_if_rate:.0%} of "
                    f"scored jobs, KLD budget {settings.what_if_kld_budget:g} (/kvproxy/v1/what-if)"
                ]
                if settings.what_if
                else []
            ),
            f"  device     {offload(settings.n_gpu_layers, shape.n_layers)} (the model and its scorer)",
            f"  CPU code   {describe_cpu_build(cpu_build_features())}",
            f"  threads    {settings.threads}",
            f"  shadow     {settings.shadow_rate:.0%} of requests scored exactly against a "
            f"{settings.reference_cache_type.value} KV reference on the same weights, "
            f"{settings.score_path.value} path (status: /kvproxy/v1/status)",
        ]
    )


def describe_cpu_build(features: tuple[str, ...]) -> str:
    """The instruction sets llama.cpp's CPU code was built with, and whether AMX is among them
    (kvproxy's builds keep it off: it dies of SIGILL in the pinned llama.cpp, docs/deploy.md)."""
    if not features:
        return "unknown (llama.cpp reports no CPU features)"
    amx = "" if any(f.startswith("AMX") for f in features) else " (AMX off)"
    return " ".join(features) + amx


def describe_proxy(deployments: list[Deployment]) -> str:
    lines = [f"kvproxy {__version__} (proxy)"]
    for d in deployments:
        if not isinstance(d, HttpDeployment):
            continue
        kv = str(d.primary_kv) if d.primary_kv else "undeclared KV"
        lines.append(f"  {d.name!r}: primary {', '.join(r.url for r in d.primary_pool.replicas)} ({kv})")
        if d.reference_pool is not None:
            lines.append(
                f"  {'':{len(d.name) + 2}}  reference {', '.join(r.url for r in d.reference_pool.replicas)}, "
                f"shadow {d.shadow.sampler.rate:.0%}"
            )
            cost = d.describe_logprobs()
            lines.append(
                f"  {'':{len(d.name) + 2}}  {cost or 'shadowed requests reach the primary unchanged'}"
            )
    return "\n".join(lines)


def describe_access(settings: Settings) -> str:
    keys, admin, origins = settings.api_keys, settings.admin_token, settings.cors_origins
    cors = f"serving routes open to {', '.join(origins)}" if origins else "off (no --cors-origin)"
    return (
        f"  access     /v1: {f'{len(keys)} API key(s)' if keys else 'open (no --api-key)'}; "
        f"status and metrics: {'admin token' if admin else 'open (no --admin-token)'}; "
        f"bodies up to {settings.max_body_bytes:,} bytes\n"
        f"  CORS       {cors}"
    )


def describe_limits(settings: Settings) -> str:
    n = settings.max_tokens_default
    limit = f"{n:,} tokens" if n else "up to the end of the context"
    return f"  max tokens {limit} for requests that set no limit (--max-tokens-default)"

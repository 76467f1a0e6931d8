"""The deployments file (`kvproxy serve --config FILE`, TOML), validated by pydantic.

```toml
[[deployments]]
model = "gemma-q4"                        # the name clients send
shadow_rate = 0.1
top_k = 20                                # the top K compared by the top-K estimator
primary_logprobs = false                  # ask the primary for them (needed by top-K; slows it)
timeouts = { connect = 5, read = 300, total = 900 }

[deployments.primary]                     # one or more llama-server replicas
urls = ["http://10.0.0.5:8080", "http://10.0.0.6:8080"]
cache_type_k = "q4_0"
cache_type_v = "q4_0"

[deployments.primary.server]              # optional: how each replica was started, for KV figures
model = "/models/gemma-3-27b-it-Q4_K_M.gguf"  # the GGUF it loads (read here for its shape)
ctx_size = 131072                         # its -c
parallel = 4                              # its -np; left out: llama-server's auto (4, unified)
kv_unified = false                        # its --kv-unified; left out: true only without -np

[deployments.reference]                   # a llama-server with an f16 cache, or `kvproxy backend`
urls = ["http://10.0.0.7:8080"]
api_key_env = "REFERENCE_API_KEY"         # optional: its --api-key, read from this variable

[deployments.drift]                       # optional (docs/drift.md)
baseline = "calibration/baseline.json"    # from `kvproxy calibrate`; else a warm-up of 50 requests

[deployments.guard]                       # optional: while in drift, serve from another deployment
fallback = "gemma-q8"
min_hold_seconds = 30
```

llama-server does not report its KV types, so they are declared here (a kvproxy scoring server
reports its own). Every top-level key can be overridden from the environment as
``KVPROXY_CONFIG_<KEY>`` (JSON for lists and tables), e.g. ``KVPROXY_CONFIG_DEPLOYMENTS='[...]'``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType
from kvproxy.model.memory import KVLayout
from kvproxy.scoring.prompt_fill import PromptFill


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSpec(_Strict):
    """How a llama-server was started, so its KV bytes can be sized as it sizes them
    (kvproxy.model.memory.kv_cells): llama-server reports neither its KV types nor its streams."""

    model: Path  # the GGUF it serves, readable here
    ctx_size: Annotated[int, Field(ge=0)] = 0  # -c; 0 (its default): the GGUF's training context
    parallel: Annotated[int, Field(ge=1)] | None = None  # -np; None: auto, which is 4 slots, unified
    kv_unified: bool | None = None  # --kv-unified; None: llama-server's default (on only for auto -np)
    ubatch_size: Annotated[int, Field(ge=1)] = 512  # -ub
    flash_attn: bool = True  # -fa; llama-server's auto turns it on wherever the device supports it

    @property
    def n_seq(self) -> int:
        return self.parallel if self.parallel is not None else 4

    @property
    def unified(self) -> bool:
        return self.kv_unified if self.kv_unified is not None else self.parallel is None

    def layout(self) -> KVLayout:
        return KVLayout(
            n_ubatch=self.ubatch_size, n_seq=self.n_seq, kv_unified=self.unified, flash_attn=self.flash_attn
        )


class BackendSpec(_Strict):
    urls: list[str] = []
    embedded: bool = False
    cache_type_k: KVCacheType | None = None
    cache_type_v: KVCacheType | None = None
    # the name of an environment variable holding the key these upstreams want (llama-server
    # --api-key, kvproxy backend --api-key): the secret stays out of the file
    api_key_env: str | None = None
    # how these llama-servers were started (their -b, -ub, --ctx-checkpoints and
    # --checkpoint-min-step; llama-server's defaults): a kvproxy scoring server replays a primary's
    # prompt cut the way they cut it, so its replay is the served rows (kvproxy.scoring.prompt_fill,
    # docs/production.md)
    batch_size: Annotated[int, Field(ge=1)] = 2048
    ubatch_size: Annotated[int, Field(ge=1)] = 512
    ctx_checkpoints: Annotated[int, Field(ge=0)] = 32
    checkpoint_min_step: Annotated[int, Field(ge=0)] = 8192

    def prompt_fill(self) -> PromptFill:
        return PromptFill(
            self.batch_size, self.ubatch_size, self.ctx_checkpoints > 0, self.checkpoint_min_step
        )

    server: ServerSpec | None = None

    @field_validator("api_key_env")
    @classmethod
    def _key_is_set(cls, name: str | None) -> str | None:
        if name is not None and not os.environ.get(name):
            raise ValueError(f"api_key_env: the environment variable {name} is not set")
        return name

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [u.rstrip("/") for u in urls]

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if bool(self.urls) == self.embedded:
            raise ValueError("give either urls or embedded = true")
        if self.embedded and self.server is not None:
            raise ValueError("`server` describes llama-server replicas; an embedded backend sizes its own")
        return self

    def kv(self, default: KVCacheType | None = None) -> KVConfig | None:
        k = self.cache_type_k or default
        v = self.cache_type_v or self.cache_type_k or default
        return KVConfig(k, v) if k and v else None


class TimeoutSpec(_Strict):
    connect: Annotated[float, Field(gt=0)] = 5.0
    read: Annotated[float, Field(gt=0)] = 300.0
    total: Annotated[float, Field(gt=0)] = 900.0


class DriftSpec(_Strict):
    """The drift detector (kvproxy.shadow.drift): baseline from a calibration file or a warm-up window."""

    baseline: Path | None = None  # a `kvproxy calibrate` baseline.json (relative to this file)
    log_sigma: Annotated[float, Field(gt=0)] = 0.5  # used when the baseline file gives none
    warmup: Annotated[int, Field(ge=2)] = 50
    threshold: Annotated[float, Field(gt=0)] = 10.0
    allowance: Annotated[float, Field(ge=0)] = 1.0


class GuardSpec(_Strict):
    """Opt-in: while in drift, serve from ``fallback`` (another deployment's model name)."""

    fallback: Annotated[str, Field(min_length=1)]
    min_hold_seconds: Annotated[float, Field(ge=0)] = 30.0
    probe_concurrency: Annotated[int, Field(ge=1, le=64)] = 1


class DeploymentSpec(_Strict):
    model: Annotated[str, Field(min_length=1)]
    primary: BackendSpec
    reference: BackendSpec | None = None
    shadow_rate: Annotated[float, Field(ge=0, le=1)] = 0.1
    top_k: Annotated[int, Field(ge=1, le=100)] = 20
    # ask the primary for top_k logprobs on shadowed requests: the top-K estimator (a plain
    # llama-server reference) needs them, and they cost the primary time (docs/benchmarks.md)
    primary_logprobs: bool = False
    queue_size: Annotated[int, Field(ge=1)] = 64
    concurrency: Annotated[int, Field(ge=1, le=64)] = 1
    health_interval: Annotated[float, Field(gt=0)] = 2.0
    timeouts: TimeoutSpec = TimeoutSpec()
    drift: DriftSpec = DriftSpec()
    guard: GuardSpec | None = None

    @model_validator(mode="after")
    def _supported(self) -> Self:
        if self.primary.embedded and self.reference is not None:
            raise ValueError(
                "an embedded primary scores against its own in-process reference; drop `reference`"
            )
        if self.reference is not None and self.reference.embedded:
            raise ValueError(
                "an embedded reference for an HTTP primary is served by `kvproxy backend`: give its URL"
            )
        return self


def check_names(names: list[str], fallbacks: dict[str, str]) -> None:
    """Deployment names are unique and every guard falls back to another deployment (ValueError)."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"deployment names must be unique: {', '.join(dupes)}")
    for name, fallback in fallbacks.items():
        if fallback == name:
            raise ValueError(f"deployment {name!r}: the guard's fallback must be another deployment")
        if fallback not in names:
            raise ValueError(
                f"deployment {name!r}: the guard's fallback {fallback!r} is not a "
                f"deployment (have: {', '.join(names)})"
            )


class ProxyConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVPROXY_CONFIG_", extra="forbid")

    deployments: Annotated[list[DeploymentSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_and_one_embedded(self) -> Self:
        check_names(
            [d.model for d in self.deployments],
            {d.model: d.guard.fallback for d in self.deployments if d.guard},
        )
        if sum(d.primary.embedded for d in self.deployments) > 1:
            raise ValueError("at most one deployment can be embedded (one model in process)")
        for d in self.deployments:
            if d.guard is not None and d.reference is None and not d.primary.embedded:
                raise ValueError(
                    f"deployment {d.model!r}: a guard acts on drift, which needs shadow scoring: "
                    "give a reference"
                )
        return self

    def resolve_paths(self, base: Path) -> ProxyConfig:
        """Relative baseline and model paths are relative to the deployments file."""
        for d in self.deployments:
            if d.drift.baseline is not None and not d.drift.baseline.is_absolute():
                d.drift.baseline = base / d.drift.baseline
            for b in (d.primary, d.reference):
                if b is not None and b.server is not None and not b.server.model.is_absolute():
                    b.server.model = base / b.server.model
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # the environment overrides the file

    @classmethod
    def from_file(cls, path: Path) -> ProxyConfig:
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        return cls(**data).resolve_paths(path.parent)

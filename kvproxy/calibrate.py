"""``kvproxy calibrate``: one teacher-forced sweep over several KV configs on the same tokens.

The text is cut into chunks of ``ctx_size`` tokens, each starting with BOS, and the second half of
every chunk is scored (llama-perplexity's layout), so the figures compare with
``llama-perplexity --kl-divergence``. Each config is scored exactly, over the full vocabulary,
against the reference config on the same weights. Memory stays bounded: the text is read and
tokenized a block at a time, scoring runs in chunks (see kvproxy.scoring.embedded), and
per-config statistics are running sums plus a fixed histogram (kvproxy.shadow.quality).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType, ScorePath
from kvproxy.model.gguf_info import ModelInfo
from kvproxy.model.memory import bits_per_value, kv_cache_allocated_bytes
from kvproxy.shadow.baseline import SEGMENT_TOKENS
from kvproxy.shadow.quality import QualityTracker

# positions per call on the prefill path: 64 or more puts llama.cpp's CPU flash attention on its
# tiled (prefill) kernel for every config; fewer rows take the vector (decode) kernel for f16
PREFILL_CHUNK = 128


def parse_config(spec: str) -> KVConfig:
    """``q8_0`` (K and V) or ``q8_0/q4_0`` (K/V)."""
    k, _, v = spec.strip().partition("/")
    try:
        return KVConfig(KVCacheType(k), KVCacheType(v or k))
    except ValueError:
        types = ", ".join(t.value for t in KVCacheType)
        raise ValueError(f"{spec!r} is not a KV config: use TYPE or K/V with types {types}") from None


def text_chunks(
    blocks: Iterable[str], tokenize: Callable[[str], list[int]], ctx_size: int, bos: int | None
) -> Iterator[list[int]]:
    """Chunks of ``ctx_size`` tokens from text arriving block by block; each starts with BOS.

    The same cut as llama-perplexity: the whole text tokenized after one BOS, split every
    ``ctx_size`` tokens, and each chunk's first token replaced by BOS. A vocabulary that adds no
    BOS (``bos`` None; llama-perplexity checks ``llama_vocab_get_add_bos``) gets the text as it is.
    """
    pending: list[int] = [bos] if bos is not None else []
    for block in blocks:
        pending.extend(tokenize(block))
        while len(pending) >= ctx_size:
            chunk, pending = pending[:ctx_size], pending[ctx_size:]
            yield [bos, *chunk[1:]] if bos is not None else chunk


def read_blocks(path: Path, size: int = 1 << 16) -> Iterator[str]:
    """The file a block at a time, cut at whitespace so no word is split between two blocks."""
    carry = ""
    with path.open(encoding="utf-8", errors="replace") as f:
        while block := f.read(size):
            text = carry + block
            cut = max(text.rfind(" "), text.rfind("\n"))
            if cut <= 0:
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut]
    if carry.strip():
        yield carry


@dataclass(frozen=True)
class ConfigResult:
    config: str
    bits_per_value: float
    kv_bytes: int
    tokens: int
    mean_kld: float
    mean_kld_error: float
    median_kld: float
    p99_kld: float
    same_top: float
    same_top_error: float
    rms_delta_p: float
    chunk_mean_std: float  # spread of per-chunk mean KLD
    segment_log_sigma: float  # spread of log mean KLD over request-sized spans: the drift noise scale


@dataclass
class LogSpread:
    """Running standard deviation (Welford) of log mean KLD over spans of ``SEGMENT_TOKENS``."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add_spans(self, kld: np.ndarray) -> None:
        for start in range(0, len(kld) - SEGMENT_TOKENS + 1, SEGMENT_TOKENS):
            x = math.log(float(np.mean(kld[start : start + SEGMENT_TOKENS])) + 1e-6)
            self.n += 1
            delta = x - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (x - self.mean)

    @property
    def sigma(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan


def result_for(
    config: KVConfig,
    tracker: QualityTracker,
    chunk_means: list[float],
    spread: LogSpread,
    info: ModelInfo,
    ctx_size: int,
) -> ConfigResult:
    s = tracker.since_start()
    bits = (bits_per_value(config.cache_type_k) + bits_per_value(config.cache_type_v)) / 2
    return ConfigResult(
        config=str(config),
        bits_per_value=bits,
        kv_bytes=kv_cache_allocated_bytes(info.attention, config.cache_type_k, config.cache_type_v, ctx_size),
        tokens=s.tokens,
        mean_kld=s.mean,
        mean_kld_error=s.mean_error,
        median_kld=s.median,
        p99_kld=s.p99,
        same_top=s.same_top,
        same_top_error=s.same_top_error,
        rms_delta_p=s.rms_delta_p,
        chunk_mean_std=float(np.std(chunk_means, ddof=1)) if len(chunk_means) > 1 else math.nan,
        segment_log_sigma=spread.sigma,
    )


def pareto_front(results: list[ConfigResult]) -> list[ConfigResult]:
    """Configs no other config beats on both KV bytes and mean KLD."""
    return [
        r
        for r in results
        if not any(
            o is not r
            and o.kv_bytes <= r.kv_bytes
            and o.mean_kld <= r.mean_kld
            and (o.kv_bytes < r.kv_bytes or o.mean_kld < r.mean_kld)
            for o in results
        )
    ]


def recommend(results: list[ConfigResult], budget: float | None) -> ConfigResult | None:
    """The smallest config whose mean KLD stays within the budget."""
    if budget is None:
        return None
    fitting = [r for r in results if r.mean_kld <= budget]
    return min(fitting, key=lambda r: (r.kv_bytes, r.mean_kld)) if fitting else None


def write_outputs(
    out: Path, results: list[ConfigResult], meta: dict[str, Any], recommendation: ConfigResult | None
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{k: _nan_none(v) for k, v in asdict(r).items()} for r in results]
    csv_path = out / "calibration.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path = out / "calibration.json"
    front = {r.config for r in pareto_front(results)}
    doc = {
        **meta,
        "results": rows,
        "pareto_front": sorted(front),
        "recommendation": recommendation.config if recommendation else None,
    }
    json_path.write_text(json.dumps(doc, indent=2, allow_nan=False, default=_nan_none) + "\n")
    baseline = out / "baseline.json"
    baseline.write_text(
        json.dumps(
            {
                "model": meta["model"],
                "reference": meta["reference"],
                "ctx_size": meta["ctx_size"],
                "score_path": meta["score_path"],
                "segment_tokens": SEGMENT_TOKENS,
                "configs": {
                    r.config: {
                        "mean_kld": r.mean_kld,
                        "log_sigma": _nan_none(r.segment_log_sigma),
                        "chunk_mean_std": _nan_none(r.chunk_mean_std),
                    }
                    for r in results
                },
            },
            indent=2,
        )
        + "\n"
    )
    png = out / "calibration.png"
    plot(results, front, png, meta)
    return [csv_path, json_path, baseline, png]


def _nan_none(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def plot(results: list[ConfigResult], front: set[str], path: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    seen: dict[int, int] = {}  # configs of equal size: stack their labels instead of overprinting
    for r in results:
        on_front = r.config in front
        ax.errorbar(
            r.kv_bytes / 2**20,
            r.mean_kld,
            yerr=r.mean_kld_error,
            fmt="o",
            color="tab:red" if on_front else "tab:gray",
            capsize=3,
        )
        k = seen[r.kv_bytes] = seen.get(r.kv_bytes, -1) + 1
        ax.annotate(
            r.config, (r.kv_bytes / 2**20, r.mean_kld), textcoords="offset points", xytext=(6, 4 - 12 * k)
        )
    pts = sorted((r.kv_bytes / 2**20, r.mean_kld) for r in results if r.config in front)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:red", label="Pareto frontier")
    ax.set_xlabel(f"KV cache at {meta['ctx_size']:,} tokens (MiB)")
    ax.set_ylabel(f"mean KLD vs {meta['reference']} (nats/token)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(f"{meta['model']}: KV-cache quality against memory ({meta['tokens_per_config']:,} tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class CtrlC:
    """SIGINT during a sweep: always a request to stop, an exception only while a chunk is scored.

    Why: a KeyboardInterrupt raised at an arbitrary point was unreliable. Sent while the model and the
    scoring contexts were being created, it was lost (measured: the sweep ran on, chunk after chunk;
    llama-cpp-python runs Python inside ctypes callbacks during set-up, and ctypes drops an
    exception raised there), and one escaping the set-up left llama.cpp objects to the interpreter's
    teardown (a SIGSEGV at exit was reported from test runs). Here the handler records the request
    first, so the sweep stops at the next chunk whatever happens to the exception, and raises only
    inside :meth:`scoring` (the chunk in progress is then dropped for every config, as before)."""

    def __init__(self) -> None:
        self.requested = False
        self._raise = False
        self._installed = False
        self._previous: Any = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._raise:
            self._raise = False
            raise KeyboardInterrupt

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self)
            self._installed = True
        return self

    def __exit__(self, *_: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """The one span where a Ctrl-C raises KeyboardInterrupt (unless one came already)."""
        self._raise = not self.requested
        try:
            yield
        finally:
            self._raise = False


@dataclass
class Sweep:
    results: list[ConfigResult]
    interrupted: bool
    chunks: int


def sweep(
    model_path: Path,
    info: ModelInfo,
    configs: list[KVConfig],
    reference: KVConfig,
    blocks: Iterable[str],
    *,
    ctx_size: int,
    threads: int,
    score_path: ScorePath = ScorePath.DECODE,
    n_gpu_layers: int = 0,
    max_chunks: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Sweep:
    """Score every config against the reference on the same chunks; Ctrl-C stops it cleanly.

    ``decode``: each chunk's first half is the prompt, prefilled as generation prefills one, and the
    second half is decoded one token a step (what serving computes); ``prefill``: the second half
    in calls of 128 positions (llama-perplexity's batched numerics; cheaper)."""
    with CtrlC() as ctrl_c:
        trackers, chunk_means, spreads, n = _score_chunks(
            model_path,
            configs,
            reference,
            blocks,
            ctx_size=ctx_size,
            threads=threads,
            score_path=score_path,
            n_gpu_layers=n_gpu_layers,
            max_chunks=max_chunks,
            on_chunk=on_chunk,
            ctrl_c=ctrl_c,
        )
        interrupted = ctrl_c.requested
    scored = [c for c in configs if c != reference]
    results = [
        result_for(c, t, m, sp, info, ctx_size)
        for c, t, m, sp in zip(scored, trackers, chunk_means, spreads, strict=True)
    ]
    if reference in configs:
        tokens = results[0].tokens if results else 0
        bits = (bits_per_value(reference.cache_type_k) + bits_per_value(reference.cache_type_v)) / 2
        results.insert(
            configs.index(reference),
            ConfigResult(
                config=str(reference),
                bits_per_value=bits,
                kv_bytes=kv_cache_allocated_bytes(
                    info.attention, reference.cache_type_k, reference.cache_type_v, ctx_size
                ),
                tokens=tokens,
                mean_kld=0.0,
                mean_kld_error=0.0,
                median_kld=0.0,
                p99_kld=0.0,
                same_top=1.0,
                same_top_error=0.0,
                rms_delta_p=0.0,
                chunk_mean_std=0.0,
                segment_log_sigma=math.nan,
            ),
        )
    return Sweep(results, interrupted, n)


def _score_chunks(
    model_path: Path,
    configs: list[KVConfig],
    reference: KVConfig,
    blocks: Iterable[str],
    *,
    ctx_size: int,
    threads: int,
    score_path: ScorePath,
    n_gpu_layers: int,
    max_chunks: int | None,
    on_chunk: Callable[[int], None] | None,
    ctrl_c: CtrlC,
) -> tuple[list[QualityTracker], list[list[float]], list[LogSpread], int]:
    """The sweep's loop: every chunk scored under every config, or none of its figures counted."""
    import llama_cpp

    from kvproxy.scoring.embedded import EmbeddedScorer, score_against_one_reference

    scored = [c for c in configs if c != reference]
    trackers = [QualityTracker(window=16) for _ in scored]
    chunk_means: list[list[float]] = [[] for _ in scored]
    spreads = [LogSpread() for _ in scored]
    first = ctx_size // 2
    n = 0
    llm = llama_cpp.Llama(str(model_path), n_ctx=64, n_batch=64, n_gpu_layers=n_gpu_layers, verbose=False)
    scorers: list[EmbeddedScorer] = []
    try:
        for c in scored:
            if ctrl_c.requested:
                return trackers, chunk_means, spreads, n
            scorers.append(
                EmbeddedScorer(
                    llm._model,
                    primary=c,
                    reference=reference,
                    n_ctx=ctx_size,
                    threads=threads,
                    flash_attn=True,
                    path=score_path,
                    chunk=PREFILL_CHUNK,
                )
            )

        def tokenize(text: str) -> list[int]:
            return list(llm.tokenize(text.encode(), add_bos=False, special=False))

        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab)) and llm.token_bos() >= 0
        for chunk in text_chunks(blocks, tokenize, ctx_size, llm.token_bos() if adds_bos else None):
            if ctrl_c.requested or (max_chunks is not None and n >= max_chunks):
                break
            try:
                with ctrl_c.scoring():
                    scores = score_against_one_reference(scorers, chunk[: first + 1], chunk[first + 1 :])
            except KeyboardInterrupt:
                break  # the chunk in progress is dropped: every config keeps the same positions
            for s, tracker, means, spread in zip(scores, trackers, chunk_means, spreads, strict=True):
                tracker.add(s)
                means.append(float(np.mean(s.kld)))
                spread.add_spans(s.kld)
            n += 1
            if on_chunk is not None:
                on_chunk(n)
    finally:
        for scorer in scorers:
            scorer.close()
        llm.close()
    return trackers, chunk_means, spreads, n

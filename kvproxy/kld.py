"""KL divergence between a reference and a primary next-token distribution: pure numpy, no I/O.

Definitions match llama-perplexity's ``--kl-divergence``: per position i, P is the reference's
distribution and Q the primary's, ``KLD_i = sum_v P(v) (log P(v) - log Q(v))``; "same top" means
``argmax P == argmax Q``; ``Δp_i = Q(t_i) - P(t_i)`` for the token t_i actually emitted. The summary
statistics (mean ± standard error, median, linear-interpolation percentiles, same-top rate ± binomial
error, RMS Δp) are computed the way llama-perplexity prints them.

Two estimators:

* :func:`exact_kld` from two full logit rows per position (any vocabulary size, vectorized over a
  chunk of positions, float64 log-softmax). Memory: a few float64 copies of the chunk, so callers
  bound it by the chunk size.
* :func:`coarse_kld` when a side only reports its top-K logprobs: both distributions are coarse-grained
  onto the tokens both sides report plus one "rest" bucket holding the remaining mass. By the
  data-processing inequality this is a lower bound of the exact KLD.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def log_softmax(logits: npt.ArrayLike) -> FloatArray:
    """Row-wise log-softmax in float64, shifted by the row maximum (stable for any logit scale)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PositionScores:
    """Per-position results for a run of positions (all arrays have one entry per position)."""

    kld: FloatArray
    same_top: BoolArray
    p_ref: FloatArray  # P(t_i): the reference's probability of the emitted token
    p_primary: FloatArray  # Q(t_i)
    # optional: the primary config's logprobs of tokens a live primary reported (consistency check)
    check_logprobs: list[list[float]] | None = None
    # context length before the first scored token (its position in the sequence)
    first_position: int = 0

    def with_checks(self, checks: list[list[float]]) -> PositionScores:
        return dataclasses.replace(self, check_logprobs=checks)

    def at(self, first_position: int) -> PositionScores:
        return dataclasses.replace(self, first_position=first_position)

    @property
    def positions(self) -> IntArray:
        return np.arange(self.first_position, self.first_position + len(self), dtype=np.int64)

    @property
    def delta_p(self) -> FloatArray:
        return self.p_primary - self.p_ref

    def __len__(self) -> int:
        return int(self.kld.shape[0])

    @staticmethod
    def concat(parts: list[PositionScores]) -> PositionScores:
        if not parts:
            empty = np.zeros(0)
            return PositionScores(empty, np.zeros(0, dtype=bool), empty, empty)
        return PositionScores(
            np.concatenate([p.kld for p in parts]),
            np.concatenate([p.same_top for p in parts]),
            np.concatenate([p.p_ref for p in parts]),
            np.concatenate([p.p_primary for p in parts]),
        )


BLOCK_ELEMENTS = 1 << 17  # logits per temporary buffer: 512 KiB of float32, cache-sized


def exact_kld(
    ref_logits: npt.ArrayLike, primary_logits: npt.ArrayLike, tokens: npt.ArrayLike
) -> PositionScores:
    """Exact KL(P_ref || Q_primary) per position from full logit rows, shape (n, vocab) each.

    ``tokens[i]`` is the token emitted at position i (for Δp). Stable float32 with float64 sums:
    each row is shifted by its own maximum, so exp never overflows; with s = x - max and
    Z = sum exp(s), ``KL = sum(exp(s_p) (s_p - s_q)) / Z_p - log Z_p + log Z_q``. Rounding errors
    in s are largest where s is very negative, i.e. where P is tiny, so the result is accurate to
    about 1e-7 absolute (tests compare it with a float64 brute force). Identical rows give exactly 0.
    Temporaries: three float32 buffers of about ``BLOCK_ELEMENTS`` logits each (the vocabulary is
    processed a block at a time), whatever the chunk.
    """
    xp = np.asarray(ref_logits, dtype=np.float32)
    xq = np.asarray(primary_logits, dtype=np.float32)
    if xp.shape != xq.shape or xp.ndim != 2:
        raise ValueError(f"logit shapes differ or are not (positions, vocab): {xp.shape} vs {xq.shape}")
    toks = np.asarray(tokens, dtype=np.int64)
    n = xp.shape[0]
    if toks.shape != (n,):
        raise ValueError(f"need one token per position: {toks.shape} for {n} positions")
    rows = np.arange(n)
    top_p, top_q = xp.argmax(axis=1), xq.argmax(axis=1)
    max_p, max_q = xp[rows, top_p][:, None], xq[rows, top_q][:, None]
    z_p, z_q, dot = np.zeros(n), np.zeros(n), np.zeros(n)
    # the vocabulary a block at a time (about BLOCK_ELEMENTS logits per buffer, all rows), so the
    # temporaries stay in cache: 1.4x the positions/s at chunk 8, 1.8x at chunk 32 (docs/kld.md)
    vocab = xp.shape[1]
    block = min(vocab, max(2048, BLOCK_ELEMENTS // max(n, 1)))
    buf_p = np.empty((n, block), dtype=np.float32)
    buf_q, buf_e = np.empty_like(buf_p), np.empty_like(buf_p)
    for start in range(0, vocab, block):
        stop = min(vocab, start + block)
        w = stop - start
        sp = np.subtract(xp[:, start:stop], max_p, out=buf_p[:, :w])
        sq = np.subtract(xq[:, start:stop], max_q, out=buf_q[:, :w])
        ep = np.exp(sp, out=buf_e[:, :w])
        z_p += ep.sum(axis=1, dtype=np.float64)
        np.multiply(ep, np.subtract(sp, sq, out=sp), out=sp)  # exp(s_p) * (s_p - s_q)
        dot += sp.sum(axis=1, dtype=np.float64)
        z_q += np.exp(sq, out=sq).sum(axis=1, dtype=np.float64)
    log_zp, log_zq = np.log(z_p), np.log(z_q)
    kld = dot / z_p - log_zp + log_zq
    return PositionScores(
        kld=np.maximum(kld, 0.0),  # tiny negative values are rounding, KL is never below 0
        same_top=top_p == top_q,
        p_ref=np.exp(sq_at(xp, rows, toks, top_p) - log_zp),
        p_primary=np.exp(sq_at(xq, rows, toks, top_q) - log_zq),
    )


def sq_at(x: npt.NDArray[np.float32], rows: IntArray, toks: IntArray, top: IntArray) -> FloatArray:
    """The shifted logit ``x[i, tok_i] - max_i`` in float64."""
    return x[rows, toks].astype(np.float64) - x[rows, top].astype(np.float64)


def _as_list(x: npt.ArrayLike) -> list[Any]:
    return x.tolist() if isinstance(x, np.ndarray) else list(x)  # type: ignore[arg-type]


def coarse_kld_row(
    ref_ids: npt.ArrayLike,
    ref_logprobs: npt.ArrayLike,
    primary_ids: npt.ArrayLike,
    primary_logprobs: npt.ArrayLike,
) -> float:
    """KL of the coarse-grained pair for one position: shared tokens plus one "rest" bucket.

    Each side gives the tokens it knows with their (normalised, natural-log) probabilities; a side
    that knows the full distribution simply passes every token. Tokens known on only one side go
    into the rest bucket on both sides, so both sides use the same partition and the result is a
    lower bound of the exact KL (data-processing inequality). Plain Python on purpose: with the
    top-K lists llama-server returns (K <= 100) it is several times faster than numpy's per-call
    overhead, and it runs once per scored position on the proxy's event loop.
    """
    q = dict(zip(_as_list(primary_ids), _as_list(primary_logprobs), strict=True))
    kl = mass_p = mass_q = 0.0
    for tok, lp in zip(_as_list(ref_ids), _as_list(ref_logprobs), strict=True):
        lq = q.get(tok)
        if lq is None:
            continue
        p = math.exp(lp)
        kl += p * (lp - lq)
        mass_p += p
        mass_q += math.exp(lq)
    lp_rest, lq_rest = math.log(max(1.0 - mass_p, 1e-12)), math.log(max(1.0 - mass_q, 1e-12))
    p_rest = math.exp(lp_rest)
    if p_rest > 1e-12:
        kl += p_rest * (lp_rest - lq_rest)
    return max(kl, 0.0)


def coarse_kld_full_reference(
    ref_logprobs_row: npt.ArrayLike, primary_ids: npt.ArrayLike, primary_logprobs: npt.ArrayLike
) -> float:
    """Coarse-grained KL when the reference's full distribution is known and the primary gave top-K."""
    row = np.asarray(ref_logprobs_row, dtype=np.float64)
    ids = np.asarray(primary_ids, dtype=np.int64)
    return coarse_kld_row(ids, row[ids], ids, primary_logprobs)


# ---- summary statistics ---------------------------------------------------------------------


def mean_and_error(sum_x: float, sum_x2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / (N - 1)), as llama-perplexity computes them.

    llama-perplexity reports no error (0) for ten or fewer values.
    """
    if count < 1:
        return 0.0, 0.0
    mean = sum_x / count
    var = sum_x2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0
    return mean, err


def percentile(sorted_values: npt.ArrayLike, fraction: float) -> float:
    """Linear interpolation at ``fraction * (n - 1)``, llama-perplexity's rule."""
    v = np.asarray(sorted_values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    pos = fraction * (v.size - 1)
    lo = int(pos)
    frac = pos - lo
    return float((1 - frac) * v[lo] + frac * v[min(lo + 1, v.size - 1)])


def median(sorted_values: npt.ArrayLike) -> float:
    v = np.asarray(sorted_values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    mid = v.size // 2
    return float(v[mid]) if v.size % 2 else float(0.5 * (v[mid - 1] + v[mid]))


@dataclass(frozen=True)
class KLDSummary:
    tokens: int
    mean: float
    mean_error: float
    median: float
    p90: float
    p95: float
    p99: float
    p999: float
    max: float
    same_top: float
    same_top_error: float
    rms_delta_p: float
    rms_delta_p_error: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def same_top_rate(n_same: int, count: int) -> tuple[float, float]:
    """Same-top rate and its binomial error sqrt(p(1-p)/(N-1))."""
    if count < 1:
        return math.nan, math.nan
    p = n_same / count
    return p, (math.sqrt(p * (1 - p) / (count - 1)) if count > 1 else 0.0)


def rms_and_error(sum_d2: float, sum_d4: float, count: int) -> tuple[float, float]:
    """RMS Δp and its error (from the error of the mean of Δp², as llama-perplexity does)."""
    mse, mse_err = mean_and_error(sum_d2, sum_d4, count)
    if count < 1:
        return math.nan, math.nan
    rms = math.sqrt(mse)
    return rms, (0.5 / rms * mse_err if rms > 0 else 0.0)


def summarize(scores: PositionScores) -> KLDSummary:
    """llama-perplexity's statistics over a set of scored positions."""
    kld = np.asarray(scores.kld, dtype=np.float64)
    dp = scores.delta_p
    n = int(kld.size)
    mean, err = mean_and_error(float(kld.sum()), float((kld * kld).sum()), n)
    top, top_err = same_top_rate(int(np.count_nonzero(scores.same_top)), n)
    dp2 = dp * dp
    rms, rms_err = rms_and_error(float(dp2.sum()), float((dp2 * dp2).sum()), n)
    s = np.sort(kld)
    return KLDSummary(
        tokens=n,
        mean=mean if n else math.nan,
        mean_error=err if n else math.nan,
        median=median(s),
        p90=percentile(s, 0.90),
        p95=percentile(s, 0.95),
        p99=percentile(s, 0.99),
        p999=percentile(s, 0.999),
        max=float(s[-1]) if n else math.nan,
        same_top=top,
        same_top_error=top_err,
        rms_delta_p=rms,
        rms_delta_p_error=rms_err,
    )

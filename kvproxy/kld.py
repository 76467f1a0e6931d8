"""KL divergence between a reference and a primary next-token distribution: pure numpy, no I/O.

Definitions match llama-perplexity's ``--kl-divergence``: per position i, P is the reference's
distribution and Q the primary's, ``KLD_i = sum_v P(v) (log P(v) - log Q(v))``; "same top" means
``argmax P == argmax Q``; ``Δp_i = Q(t_i) - P(t_i)`` for the token t_i actually emitted. The summary
statistics (mean ± standard error, median, linear-interpolation percentiles, same-top rate ± binomial
error, RMS Δp) are computed the way llama-perplexity prints them.

Two estimators:

* :func:`exact_kld` from two full logit rows per position (any vocabulary size, vectorized over a
  chunk of positions, float32 blocks with float64 totals, the vocabulary split over two threads).
  Memory: four fixed float32 slabs per thread, whatever the chunk.
* :func:`coarse_kld` when a side only reports its top-K logprobs: both distributions are coarse-grained
  onto the tokens both sides report plus one "rest" bucket holding the remaining mass. By the
  data-processing inequality this is a lower bound of the exact KLD.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kvproxy.priority import lower_thread_priority

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def log_softmax(logits: npt.ArrayLike) -> npt.NDArray[np.floating[Any]]:
    """Row-wise log-softmax, shifted by the row maximum (stable for any logit scale), the normaliser
    summed in float64. float32 rows stay float32 (a 262,144-wide row is 1 MiB, not 2); anything
    else is computed in float64."""
    x = np.asarray(logits)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64))
    return shifted - log_z.astype(x.dtype)  # type: ignore[no-any-return]


def logprobs_at(row: npt.ArrayLike, ids: Sequence[int]) -> list[float]:
    """log-softmax of one logits row at ``ids`` only, with :func:`log_softmax`'s very arithmetic
    (a float32 row: float32 shift, float64 normaliser, float32 result), so equal rows give bit-equal
    logprobs: the replay's check of what a primary served compares like with like."""
    x = np.asarray(row)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    m = x.max()
    log_z = x.dtype.type(np.log(np.exp(x - m).sum(dtype=np.float64)))
    return [float((x[i] - m) - log_z) for i in ids]


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
    # per position, the coarse KL between what the primary served (its top-K) and a replay of the
    # same KV config on the score path: what serving (batching, another build) added; NaN where the
    # primary reported nothing to compare (only a kvproxy scoring server gives this)
    served_divergence: FloatArray | None = None
    # where the scored (generated) token ids came from: the primary itself, its logprobs, or its
    # answer's text re-tokenized (kvproxy.scoring.job.ID_SOURCES); None: not said
    ids_source: str | None = None

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


BLOCK_ELEMENTS = 1 << 18  # logits per temporary slab (1 MiB of float32): bigger blocks, fewer numpy calls
PARTIAL = 64  # logits per float32 partial sum; the partial sums are added in float64
EXACT_SUM_LOGITS = 1 << 14  # blocks up to this many logits per slab: np.exp and float64 sums
LOG2_E = np.float32(math.log2(math.e))
KLD_THREADS = min(2, os.cpu_count() or 1)  # the caller plus at most one helper thread
THREAD_MIN_LOGITS = 1 << 18  # below this many logits per side the helper's hand-off (~0.1 ms) eats the gain


@dataclass(frozen=True)
class _RangeSums:
    """One vocabulary range of every row, shifted by the range's own maxima."""

    top_p: IntArray  # argmax over the range (absolute column)
    top_q: IntArray
    max_p: FloatArray  # the maxima (the shifts), float64
    max_q: FloatArray
    sums: FloatArray  # (4, n): sum e_p, sum e_q, sum e_p d, sum (e_q - e_p); e = exp(x - max), d = s_p - s_q


def _block_width(n: int, vocab: int) -> int:
    """Columns per block: about BLOCK_ELEMENTS logits per slab, a multiple of PARTIAL."""
    width = max(2048, BLOCK_ELEMENTS // max(n, 1)) // PARTIAL * PARTIAL
    return min(width, -(-vocab // PARTIAL) * PARTIAL)


def _ranges(vocab: int, width: int) -> list[tuple[int, int]]:
    """The vocabulary in two halves of whole blocks when it has two blocks or more, else one range.
    The split depends only on the shapes, so results do not depend on the threads that run it."""
    blocks = -(-vocab // width)
    if blocks < 2:
        return [(0, vocab)]
    mid = (blocks + 1) // 2 * width
    return [(0, mid), (mid, vocab)]


def _range_sums(
    xp: npt.NDArray[np.float32], xq: npt.NDArray[np.float32], start: int, stop: int, width: int
) -> _RangeSums:
    """The four sums of columns [start, stop), a block of ``width`` columns at a time.

    Per block: 7 numpy passes over 4 float32 slabs (the two shifts, d, the scaling for exp2 and
    one exp2 over both sides, the product, the difference) and one reduction of all four slabs to
    float32 partial sums of PARTIAL logits (einsum: numpy's own loop, never BLAS, whose pool
    threads would escape the caller's priority class), added in float64. docs/kld.md has the figures.
    """
    n = xp.shape[0]
    rows = np.arange(n)
    top_p = xp[:, start:stop].argmax(axis=1) + start
    top_q = xq[:, start:stop].argmax(axis=1) + start
    shift_p, shift_q = xp[rows, top_p][:, None], xq[rows, top_q][:, None]
    padded = min(width, -(-(stop - start) // PARTIAL) * PARTIAL)
    flat = np.empty(4 * n * padded, dtype=np.float32)
    sums = np.zeros((4, n))
    for lo in range(start, stop, width):
        hi = min(stop, lo + width)
        cols = -(-(hi - lo) // PARTIAL) * PARTIAL
        slab = flat[: 4 * n * cols].reshape(4, n, cols)
        if cols > hi - lo:
            slab[:, :, hi - lo :] = 0.0  # padding adds nothing to the sums
        b = slab[:, :, : hi - lo]
        np.subtract(xp[:, lo:hi], shift_p, out=b[0])  # s_p <= 0, exactly 0 at the maximum
        np.subtract(xq[:, lo:hi], shift_q, out=b[1])
        np.subtract(b[0], b[1], out=b[2])  # d = s_p - s_q
        small = b[0].size <= EXACT_SUM_LOGITS
        if small:
            np.exp(b[:2], out=b[:2])  # e_p, e_q
        else:  # exp(s) = exp2(s log2 e): twice as fast as numpy's float32 exp, see the docstring
            np.multiply(b[:2], LOG2_E, out=b[:2])
            np.exp2(b[:2], out=b[:2])
        np.multiply(b[2], b[0], out=b[2])  # e_p d
        np.subtract(b[1], b[0], out=b[3])  # e_q - e_p
        if small:  # float64 sums cost nothing here
            sums += b.sum(axis=2, dtype=np.float64)
        else:
            partial = np.einsum("...k->...", slab.reshape(4, n, cols // PARTIAL, PARTIAL))
            sums += partial.sum(axis=2, dtype=np.float64)
    return _RangeSums(top_p, top_q, shift_p[:, 0].astype(np.float64), shift_q[:, 0].astype(np.float64), sums)


def _merge(parts: list[_RangeSums]) -> tuple[IntArray, IntArray, FloatArray, FloatArray, FloatArray]:
    """Ranges to whole rows: (top_p, top_q, max_p, max_q, sums) with every sum shifted by the row's
    maxima. A range shifted by m_r < m is rescaled by exp(m_r - m) in float64, and its d by
    (a - b) where a, b are the two sides' rescalings: exact up to float64 rounding."""
    if len(parts) == 1:
        only = parts[0]
        return only.top_p, only.top_q, only.max_p, only.max_q, only.sums
    rows = np.arange(parts[0].max_p.shape[0])
    mp, mq = np.stack([r.max_p for r in parts]), np.stack([r.max_q for r in parts])
    # the first maximum wins, as np.argmax over the whole row
    best_p, best_q = mp.argmax(axis=0), mq.argmax(axis=0)
    top_p = np.stack([r.top_p for r in parts])[best_p, rows]
    top_q = np.stack([r.top_q for r in parts])[best_q, rows]
    max_p, max_q = mp[best_p, rows], mq[best_q, rows]
    sums = np.zeros_like(parts[0].sums)
    for r in parts:
        a, b = r.max_p - max_p, r.max_q - max_q  # <= 0
        ea, eb = np.exp(a), np.exp(b)
        zp, zq, dot, diff = r.sums
        sums[0] += ea * zp
        sums[1] += eb * zq
        sums[2] += ea * (dot + (a - b) * zp)
        sums[3] += eb * diff + (eb - ea) * zp
    return top_p, top_q, max_p, max_q, sums


_helper_lock = threading.Lock()
_helper: ThreadPoolExecutor | None = None
_helper_pid = 0


def _helper_pool() -> ThreadPoolExecutor:
    """The one helper thread, created on first use (again after a fork), in SCHED_IDLE like the
    shadow worker (kvproxy.priority); concurrent.futures joins it at interpreter exit."""
    global _helper, _helper_pid
    with _helper_lock:
        if _helper is None or _helper_pid != os.getpid():
            _helper = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kvproxy-kld", initializer=lower_thread_priority
            )
            _helper_pid = os.getpid()
        return _helper


def _all_range_sums(
    xp: npt.NDArray[np.float32], xq: npt.NDArray[np.float32], threads: int
) -> list[_RangeSums]:
    """Every range's sums, the second range on the helper thread when ``threads`` > 1. The caller
    takes back a range the helper has not started (busy, or slow to wake), so a helper never
    makes a call slower than one thread by more than a submit."""
    n, vocab = xp.shape
    width = _block_width(n, vocab)
    ranges = _ranges(vocab, width)
    if threads < 2 or len(ranges) < 2:
        return [_range_sums(xp, xq, lo, hi, width) for lo, hi in ranges]
    (lo0, hi0), (lo1, hi1) = ranges
    try:
        future = _helper_pool().submit(_range_sums, xp, xq, lo1, hi1, width)
    except RuntimeError:  # interpreter shutting down: no new threads
        return [_range_sums(xp, xq, lo, hi, width) for lo, hi in ranges]
    first = _range_sums(xp, xq, lo0, hi0, width)
    second = _range_sums(xp, xq, lo1, hi1, width) if future.cancel() else future.result()
    return [first, second]


def exact_kld(
    ref_logits: npt.ArrayLike, primary_logits: npt.ArrayLike, tokens: npt.ArrayLike
) -> PositionScores:
    """Exact KL(P_ref || Q_primary) per position from full logit rows, shape (n, vocab) each.

    ``tokens[i]`` is the token emitted at position i (for Δp). Stable float32 with float64 totals:
    each row is shifted by its own maximum (s = x - max, so exp never overflows and is exact at the
    top), d = s_p - s_q, Z = sum exp(s), and

        KL = sum(exp(s_p) d) / Z_p + log1p(sum(exp(s_q) - exp(s_p)) / Z_p)

    (``log Z_q - log Z_p`` directly when Z_q / Z_p is outside [0.5, 2]). Both terms are of the
    size of d, not of log Z, so float32 partial sums of 64 logits, added in float64, keep the
    result within about 1e-7 absolute (or 1e-6 relative) of a float64 brute force (tests);
    identical rows give exactly 0. p_ref and p_primary are accurate to about 1e-7 relative on
    large rows (float32 partial sums; exp2 of the float32 product s log2 e), to about 1e-8 for
    blocks up to ``EXACT_SUM_LOGITS`` (np.exp and float64 sums).
    Large inputs are split into two vocabulary halves, the second computed on one reused,
    low-priority helper thread (:data:`KLD_THREADS`); the halves, and so the results, do not depend on
    whether a helper ran. Temporaries: four float32 slabs of about ``BLOCK_ELEMENTS`` logits per
    thread, whatever the chunk.
    """
    xp = np.asarray(ref_logits, dtype=np.float32)
    xq = np.asarray(primary_logits, dtype=np.float32)
    if xp.shape != xq.shape or xp.ndim != 2:
        raise ValueError(f"logit shapes differ or are not (positions, vocab): {xp.shape} vs {xq.shape}")
    toks = np.asarray(tokens, dtype=np.int64)
    n = xp.shape[0]
    if toks.shape != (n,):
        raise ValueError(f"need one token per position: {toks.shape} for {n} positions")
    threads = KLD_THREADS if xp.size >= THREAD_MIN_LOGITS else 1
    return _scores(xp, xq, toks, _all_range_sums(xp, xq, threads))


def _scores(
    xp: npt.NDArray[np.float32], xq: npt.NDArray[np.float32], toks: IntArray, parts: list[_RangeSums]
) -> PositionScores:
    """The per-position results from the merged sums."""
    top_p, top_q, max_p, max_q, (z_p, z_q, dot, diff) = _merge(parts)
    ratio = diff / z_p  # Z_q / Z_p - 1, without the cancellation of two float32 sums
    near = (ratio >= -0.5) & (ratio <= 1.0)
    log_ratio = np.where(near, np.log1p(np.where(near, ratio, 0.0)), np.log(z_q) - np.log(z_p))
    kld = dot / z_p + log_ratio
    log_zp = np.log(z_p)
    rows = np.arange(xp.shape[0])
    return PositionScores(
        kld=np.maximum(kld, 0.0),  # tiny negative values are rounding, KL is never below 0
        same_top=top_p == top_q,
        p_ref=np.exp(xp[rows, toks].astype(np.float64) - max_p - log_zp),
        p_primary=np.exp(xq[rows, toks].astype(np.float64) - max_q - (log_zp + log_ratio)),
    )


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

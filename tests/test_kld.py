"""kld.py against brute-force float64 references, on random rows and on real Gemma 3 270M logits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvproxy import kld
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker


def brute_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Textbook KL(P || Q) in float64, one row, element by element with exact summation."""
    ps = [float(x) for x in p_logits]
    qs = [float(x) for x in q_logits]
    mp, mq = max(ps), max(qs)
    lse_p = mp + math.log(math.fsum(math.exp(x - mp) for x in ps))
    lse_q = mq + math.log(math.fsum(math.exp(x - mq) for x in qs))
    return math.fsum(math.exp(a - lse_p) * ((a - lse_p) - (b - lse_q)) for a, b in zip(ps, qs, strict=True))


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + math.log(math.fsum(np.exp(x - m))))


# exact_kld works in stable float32 with float64 sums: accurate to about 1e-7 absolute.
ABS = 1e-7


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_exact_matches_brute_force_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (5, 1000)).astype(np.float32)
    pri = (ref + rng.normal(0, 0.5, ref.shape)).astype(np.float32)
    toks = rng.integers(0, 1000, 5)
    got = kld.exact_kld(ref, pri, toks)
    for i in range(5):
        assert got.kld[i] == pytest.approx(brute_kl(ref[i], pri[i]), rel=1e-6, abs=ABS)
        assert got.p_ref[i] == pytest.approx(softmax64(ref[i])[toks[i]], rel=1e-9)
        assert got.p_primary[i] == pytest.approx(softmax64(pri[i])[toks[i]], rel=1e-9)
        assert got.same_top[i] == (ref[i].argmax() == pri[i].argmax())
    assert np.allclose(got.delta_p, got.p_primary - got.p_ref)


def test_exact_at_gemma_vocabulary_size() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 4, (2, 262_144)).astype(np.float32)
    pri = (ref + rng.normal(0, 0.2, ref.shape)).astype(np.float32)
    got = kld.exact_kld(ref, pri, [0, 1])
    for i in range(2):
        assert got.kld[i] == pytest.approx(brute_kl(ref[i], pri[i]), rel=1e-6, abs=ABS)


@pytest.fixture(scope="module")
def real_logits(gemma_path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Full-vocabulary rows from real Gemma 3 270M: f16 KV reference and q4_0 KV primary."""
    import llama_cpp

    from kvproxy.backends.base import KVConfig
    from kvproxy.config import KVCacheType as T
    from kvproxy.scoring.embedded import EmbeddedScorer

    llm = llama_cpp.Llama(str(gemma_path), n_ctx=256, verbose=False)
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. It was a sunny day in the park.")
    scorer = EmbeddedScorer(
        llm._model,
        primary=KVConfig(T.Q4_0, T.Q4_0),
        reference=KVConfig(T.F16, T.F16),
        n_ctx=256,
        threads=THREADS_N,
        flash_attn=True,
        chunk=64,
    )
    rows: dict[str, np.ndarray] = {}
    for name, ctx in (("ref", scorer._ctx_reference), ("pri", scorer._ctx_primary)):
        ctx.kv_cache_clear()
        scorer._decode(ctx, toks, 0, with_logits=True)
        rows[name] = scorer._logits(ctx, len(toks)).copy()
    scorer.close()
    llm.close()
    return rows["ref"][:-1], rows["pri"][:-1], toks[1:]


def test_exact_matches_brute_force_on_real_logits(
    real_logits: tuple[np.ndarray, np.ndarray, list[int]],
) -> None:
    ref, pri, toks = real_logits
    got = kld.exact_kld(ref, pri, toks)
    for i in (0, len(toks) // 2, len(toks) - 1):
        assert got.kld[i] == pytest.approx(brute_kl(ref[i], pri[i]), rel=1e-6, abs=ABS)
    assert got.kld.mean() > 0  # q4_0 really differs from f16


def test_coarse_is_a_lower_bound_on_real_logits(
    real_logits: tuple[np.ndarray, np.ndarray, list[int]],
) -> None:
    ref, pri, toks = real_logits
    exact = kld.exact_kld(ref, pri, toks).kld
    lref, lpri = kld.log_softmax(ref), kld.log_softmax(pri)
    previous = np.zeros_like(exact)
    for k in (5, 20, 100, 1000):
        coarse = []
        for i in range(len(toks)):
            ri = np.argsort(-lref[i])[:k]
            qi = np.argsort(-lpri[i])[:k]
            coarse.append(kld.coarse_kld_row(ri, lref[i][ri], qi, lpri[i][qi]))
        c = np.array(coarse)
        assert np.all(c <= exact + ABS)
        assert c.sum() >= previous.sum() - ABS  # more known tokens, tighter bound (in total)
        previous = c
    assert previous.sum() > 0.8 * exact.sum()  # K = 1000 is close on this text


# float32 logits (what llama.cpp produces), so the float64 brute force sees exactly the same values;
# multiples of 1/1024 so that adding the shifts below is exact in float32 (shift invariance is a
# property of the maths, not of rounding)
f32 = st.integers(-30 * 1024, 30 * 1024).map(lambda i: i / 1024)
logit_rows = arrays(np.float32, st.integers(2, 40), elements=f32)


# derandomized: the same 200 cases every run, so CI does not depend on which rounding corner a run
# happens to draw (8 random seeds x 200 cases passed when this was set)
@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data(), p=logit_rows)
def test_properties(data: st.DataObject, p: np.ndarray) -> None:
    q = data.draw(arrays(np.float32, p.shape, elements=f32))
    shift = np.float32(data.draw(st.sampled_from([-512.0, -3.0, 0.5, 64.0, 1024.0])))  # exact in float32
    row = kld.exact_kld(p[None], q[None], [0])
    value = float(row.kld[0])
    assert value >= 0
    assert float(kld.exact_kld(p[None], p[None], [0]).kld[0]) == 0.0
    shifted = float(kld.exact_kld((p + shift)[None], (q - shift)[None], [0]).kld[0])
    assert shifted == pytest.approx(value, rel=1e-5, abs=ABS)
    assert value == pytest.approx(brute_kl(p, q), rel=1e-6, abs=ABS)
    # coarse-graining onto any K tokens of each side plus "rest" never exceeds the exact value (the
    # data-processing inequality), checked in float64: from float32 log-probs the rest bucket's mass,
    # 1 minus the known ones, loses its digits when K covers nearly everything (a rest of 7e-4 from
    # masses rounded to 1e-7 is 1e-4 off in its log), which is conditioning, not the property
    k = data.draw(st.integers(1, p.size))
    lp, lq = log_softmax64(p), log_softmax64(q)
    ri = data.draw(st.permutations(range(p.size)))[:k]
    qi = data.draw(st.permutations(range(p.size)))[:k]
    coarse = kld.coarse_kld_row(ri, lp[ri], qi, lq[qi])
    exact = brute_kl(p, q)
    # float64 still rounds a rest of 1e-10 (1 minus 0.9999999999) to about 1e-6 of itself, an error
    # of that size in its log: allow it, scaled by the smaller rest of the two sides
    rest = min(1 - math.fsum(np.exp(lp[ri])), 1 - math.fsum(np.exp(lq[qi])))
    bound = exact * (1 + 1e-9) + 1e-12 + 1e-15 / max(rest, 1e-12)
    assert 0 <= coarse <= bound


def test_coarse_with_everything_known_is_exact() -> None:
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=50), rng.normal(size=50)
    lp, lq = kld.log_softmax(p), kld.log_softmax(q)
    ids = np.arange(50)
    assert kld.coarse_kld_row(ids, lp, ids[::-1], lq[::-1]) == pytest.approx(brute_kl(p, q), rel=1e-9)


def test_summary_statistics_match_llama_perplexity_rules() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(-3, 1.5, 1001)
    p_ref = rng.uniform(size=1001)
    p_q = np.clip(p_ref + rng.normal(0, 0.05, 1001), 0, 1)
    same = rng.uniform(size=1001) < 0.9
    s = kld.summarize(kld.PositionScores(values, same, p_ref, p_q))
    n = values.size
    assert s.tokens == n
    assert s.mean == pytest.approx(values.mean())
    assert s.mean_error == pytest.approx(math.sqrt(values.var() / (n - 1)))
    srt = np.sort(values)
    assert s.median == srt[500]
    assert s.p99 == pytest.approx(np.percentile(values, 99, method="linear"))
    assert s.p999 == pytest.approx(np.percentile(values, 99.9, method="linear"))
    assert s.max == values.max()
    top = same.mean()
    assert s.same_top == pytest.approx(top)
    assert s.same_top_error == pytest.approx(math.sqrt(top * (1 - top) / (n - 1)))
    assert s.rms_delta_p == pytest.approx(math.sqrt(np.mean((p_q - p_ref) ** 2)))
    even = kld.summarize(kld.PositionScores(values[:4], same[:4], p_ref[:4], p_q[:4]))
    assert even.median == pytest.approx((np.sort(values[:4])[1] + np.sort(values[:4])[2]) / 2)
    assert even.mean_error == 0.0  # llama-perplexity gives no error for ten values or fewer


def test_empty_summary_is_all_nan_not_zero() -> None:
    s = kld.summarize(kld.PositionScores.concat([]))
    assert s.tokens == 0 and math.isnan(s.mean) and math.isnan(s.same_top)
    assert s.as_dict()["mean"] is None

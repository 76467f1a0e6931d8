"""exact_kld's blocked, split and threaded paths: they agree with each other and with float64."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from kvproxy import kld
from tests.test_kld import ABS, brute_kl

GEMMA = (1, 262_144)


def rows(n: int, vocab: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 4, (n, vocab)).astype(np.float32)
    pri = (ref + rng.normal(0, noise, ref.shape)).astype(np.float32)
    return ref, pri, rng.integers(0, vocab, n)


def scores(ref: np.ndarray, pri: np.ndarray, toks: np.ndarray, threads: int) -> kld.PositionScores:
    parts = kld._all_range_sums(ref, pri, threads)
    return kld._scores(ref, pri, toks.astype(np.int64), parts)


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


@pytest.mark.parametrize(
    ("n", "vocab"),
    [(1, 1), (1, 2), (3, 63), (2, 64), (2, 65), (1, 2047), (5, 4099), (1, 100_003), (40, 9_001), GEMMA],
)
def test_every_shape_matches_float64(n: int, vocab: int) -> None:
    ref, pri, toks = rows(n, vocab, 0.3, vocab)
    got = kld.exact_kld(ref, pri, toks)
    for i in range(n):
        assert got.kld[i] == pytest.approx(brute_kl(ref[i], pri[i]), rel=1e-6, abs=ABS)
        assert got.p_ref[i] == pytest.approx(softmax64(ref[i])[toks[i]], rel=1e-7, abs=1e-12)
        assert got.p_primary[i] == pytest.approx(softmax64(pri[i])[toks[i]], rel=1e-7, abs=1e-12)
        assert got.same_top[i] == (ref[i].argmax() == pri[i].argmax())


@pytest.mark.parametrize(("n", "vocab"), [(1, 262_144), (8, 100_003), (3, 5_000)])
def test_threaded_and_single_thread_agree(n: int, vocab: int) -> None:
    """The vocabulary split depends only on the shapes, so the helper changes nothing."""
    ref, pri, toks = rows(n, vocab, 0.2, 7)
    one, two = scores(ref, pri, toks, 1), scores(ref, pri, toks, 2)
    np.testing.assert_array_equal(one.kld, two.kld)
    np.testing.assert_array_equal(one.p_ref, two.p_ref)
    np.testing.assert_array_equal(one.p_primary, two.p_primary)
    np.testing.assert_array_equal(one.same_top, two.same_top)


def test_split_rows_agree_with_one_range() -> None:
    """Two ranges, each shifted by its own maximum and rescaled in float64, give the one-range result
    to 1e-7 whatever side of the split the maxima fall on."""
    vocab = 70_000
    ref, pri, toks = rows(4, vocab, 0.5, 3)
    ref[0, 10] = pri[0, 69_000] = 30  # maxima in different halves
    ref[1, 69_000] = pri[1, 69_000] = 30  # both in the second half
    ref[2, 5] = ref[2, 69_000] = 25  # a tie across halves: the first wins, as np.argmax
    width = kld._block_width(4, vocab)
    assert len(kld._ranges(vocab, width)) == 2
    whole = kld._scores(ref, pri, toks, [kld._range_sums(ref, pri, 0, vocab, width)])
    split = scores(ref, pri, toks, 2)
    np.testing.assert_allclose(split.kld, whole.kld, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(split.p_ref, whole.p_ref, rtol=3e-7)  # float32 partial sums
    np.testing.assert_allclose(split.p_primary, whole.p_primary, rtol=3e-7)
    np.testing.assert_array_equal(split.same_top, whole.same_top)
    assert kld.exact_kld(ref, pri, toks).same_top.tolist() == (ref.argmax(1) == pri.argmax(1)).tolist()
    for i in range(4):
        assert split.kld[i] == pytest.approx(brute_kl(ref[i], pri[i]), rel=1e-6, abs=ABS)


def test_identical_rows_give_exactly_zero_on_every_path() -> None:
    ref, _, toks = rows(3, 262_144, 0.0, 5)
    for threads in (1, 2):
        got = scores(ref, ref.copy(), toks, threads)
        assert got.kld.tolist() == [0.0, 0.0, 0.0]
        np.testing.assert_array_equal(got.p_ref, got.p_primary)


def test_far_apart_distributions_use_the_plain_log_ratio() -> None:
    """q far more peaked than p (Z_q / Z_p tiny): log1p(diff / Z_p) would lose everything there."""
    vocab = 262_144
    ref = np.zeros((1, vocab), dtype=np.float32)  # uniform
    pri = np.full((1, vocab), -40.0, dtype=np.float32)
    pri[0, 3] = 0.0  # one-hot
    got = kld.exact_kld(ref, pri, [3])
    assert got.kld[0] == pytest.approx(brute_kl(ref[0], pri[0]), rel=1e-6)
    assert got.p_primary[0] == pytest.approx(softmax64(pri[0])[3], rel=1e-7)


def test_helper_thread_is_reused_bounded_and_idle_class() -> None:
    ref, pri, toks = rows(2, 262_144, 0.2, 9)
    for _ in range(3):
        kld.exact_kld(ref, pri, toks)
    helpers = [t for t in threading.enumerate() if t.name.startswith("kvproxy-kld")]
    assert len(helpers) <= 1
    if not helpers:  # one CPU: no helper at all
        assert kld.KLD_THREADS == 1
        return
    native = helpers[0].native_id
    assert native is not None
    kld.exact_kld(ref, pri, toks)
    assert [t.native_id for t in threading.enumerate() if t.name.startswith("kvproxy-kld")] == [native]
    if sys.platform == "linux":  # kvproxy.priority: gives way to serving like the shadow worker
        assert os.sched_getscheduler(native) == os.SCHED_IDLE


def test_helper_does_not_hold_up_interpreter_exit() -> None:
    code = (
        "import numpy as np; from kvproxy import kld; kld.KLD_THREADS = 2\n"
        "x = np.random.default_rng(0).normal(size=(2, 262144)).astype(np.float32)\n"
        "print(kld.exact_kld(x, x.copy(), [0, 1]).kld.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[0.0, 0.0]"


def test_small_inputs_stay_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_helper() -> None:
        raise AssertionError("a helper for a small input")

    monkeypatch.setattr(kld, "_helper_pool", no_helper)
    ref, pri, toks = rows(4, 1000, 0.3, 11)
    assert kld.exact_kld(ref, pri, toks).kld.shape == (4,)

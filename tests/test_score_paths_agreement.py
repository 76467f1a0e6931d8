"""kvproxy's exact scoring agrees with the gold standard, ``llama-perplexity --kl-divergence``, and
both scoring paths agree with it run on the same numerics.

llama-perplexity is built from the llama.cpp source the pinned llama-cpp-python vendors
(scripts/build-llama-tools.sh). It saves the f16-KV reference's log-probabilities of a real English
text (``--kl-divergence-base``), then scores a KV config's run against them. One base file per path
and one llama-perplexity run per (path, config) serve every test of the module (module fixtures):
2 chunks of 512 tokens on the prefill path (510 scored positions) and 1 chunk of 256 on the decode
path (127, every one of them a one-token decode, as is every token of its prompt: a decode costs
twice a prefilled position here). The agreement is one of numerics, not of sampling (the same token
ids at the same positions: the gap is llama-perplexity's 16-bit rounding, about 0.1 %), so one short
chunk holds the same bounds as the 3 of 512 these tests used to run: on 2 decode chunks of 512
kvproxy read -0.11 % (q4_0) and +0.16 % (q8_0) from llama-perplexity, on 1 of 256 -0.19 % and
-0.05 %, the same-top rates equal, against bounds of 2 % and 0.01 (docs/kld.md).

llama-perplexity's micro-batch picks the numerics (docs/reference-design.md, "Which numerics served the
tokens"):
``-ub 1`` on both the f16 base run and the config run computes every position as a one-token
decode, the way generation does, and ``-ub 512`` computes each 512-token chunk as one prefill.
Both runs use a batch of one chunk (``-b`` = ``-c``): with the default ``-b 2048`` llama-perplexity
packs four chunks as four sequences of one batch (its n_ctx becomes 2048), so its micro-batches
would mix sequences.

kvproxy scores the very same token ids (read back from llama-perplexity's base file) at the very
same positions, the second half of each chunk, whose first token llama-perplexity replaces by BOS:
the decode path with the prompt prefilled in micro-batches of 1 (``prompt_ubatch=1``), the prefill
path in chunks of 128 positions after the prefix. On the decode path the q4_0, q8_0 and f16 primaries
are scored in one pass against one f16 reference computation, as `kvproxy calibrate` scores its
configs: 8 one-token passes over a chunk instead of 10, and the f16 check covers every position.
The prefill path's q4_0 and q8_0 figures are those of `kvproxy calibrate --score-path prefill`, run
as a user runs it on its default text (the bundled English, the text file llama-perplexity reads)
with five configs sharing one f16 reference pass a chunk: the module's one sweep serves both the
agreement and test_calibrate_on_gemma (it was two sweeps, 63 and 33 CPU-s), and its chunks are
checked to be the base file's tokens, one for one.
llama-perplexity keeps the base's log-probabilities as 16-bit integers, so its figure carries a
small rounding of its own.

Why 128 and not the shadow scorer's default of 8: llama.cpp's CPU flash attention over an f16 (or
f32) cache runs a tiled kernel for calls of 64 query rows or more and a vector kernel below that
(ggml-cpu ops.cpp, GGML_FA_TILE_Q), so the f16 reference of a chunk of 8 is computed like a decode
while its matrix products are computed like a prefill. Chunks of 8 read q8_0 about 11 % above
``-ub 512`` here (not asserted; ``KVPROXY_SMALL_CHUNKS=1`` prints it, at the cost of a third scoring
pass); every call of 64 rows or more agrees.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvproxy.backends.base import KVConfig
from kvproxy.calibrate import text_chunks
from kvproxy.config import KVCacheType as T
from kvproxy.config import ScorePath
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores, summarize
from kvproxy.scoring.embedded import EmbeddedScorer, score_against_one_reference
from tests.llama_tools import llama_bin, read_base_tokens
from tests.test_calibrate import assert_a_deployment_arms_its_drift_detector_from
from tests.test_startup import run_cli
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

# the context (and llama-perplexity batch) per path: a decode chunk of 256 is 127 one-token decodes
# scored, a prefill chunk of 512 is what `kvproxy calibrate` cuts by default
CTX = {"decode": 256, "prefill": 512}
CHUNKS = {"decode": 1, "prefill": 2}

UBATCH = {"decode": "1", "prefill": "512"}
PREFILL_CHUNK = 128  # 255 scored positions: calls of 128 and 127 rows, both on the tiled kernel
F16 = KVConfig(T.F16, T.F16)


def perplexity(path: str, *args: str) -> str:
    result = subprocess.run(
        [str(llama_bin() / "llama-perplexity"), "-c", str(CTX[path]), "-b", str(CTX[path]),
         "--chunks", str(CHUNKS[path]),
         "-t", str(THREADS_N), "-fa", "on", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "text.txt"
    out.write_text(english_text())
    return out


@pytest.fixture(scope="module")
def bases(gemma_path: Path, text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llama-perplexity's f16 base file per path (the same tokens, the reference's own numerics)."""
    tmp = tmp_path_factory.mktemp("kld")
    out = {}
    for path, ub in UBATCH.items():
        out[path] = tmp / f"base-ub{ub}.kld"
        perplexity(
            path, "-m", str(gemma_path), "-f", str(text), "-ub", ub,
            "-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(out[path]),
        )  # fmt: skip
    return out


Gold = Callable[[ScorePath, T], tuple[float, float]]


@pytest.fixture(scope="module")
def gold(gemma_path: Path, bases: dict[str, Path]) -> Gold:
    """llama-perplexity's mean KLD and same-top rate of a config on a path, run once per module."""
    runs: dict[tuple[str, T], tuple[float, float]] = {}

    def get(path: ScorePath, kv: T) -> tuple[float, float]:
        if (path, kv) not in runs:
            out = perplexity(
                path, "-m", str(gemma_path), "-ub", UBATCH[path],
                "-ctk", kv.value, "-ctv", kv.value,
                "--kl-divergence-base", str(bases[path]), "--kl-divergence",
            )  # fmt: skip
            mean = re.search(r"Mean\s+KLD:\s+([0-9.]+)\s+±\s+([0-9.]+)", out)
            same = re.search(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)\s+%", out)
            assert mean and same, out[-2000:]
            runs[path, kv] = float(mean.group(1)), float(same.group(1)) / 100
        return runs[path, kv]

    return get


@pytest.fixture(scope="module")
def llm(gemma_path: Path) -> Iterator[Any]:
    import llama_cpp

    model = llama_cpp.Llama(str(gemma_path), n_ctx=64, verbose=False)
    yield model
    model.close()


def chunks(base: Path, bos: int) -> list[list[int]]:
    n_ctx, n_chunk, tokens = read_base_tokens(base)
    assert n_ctx in CTX.values() and n_chunk in CHUNKS.values()
    out = []
    for c in range(n_chunk):
        seq = [int(t) for t in tokens[c * n_ctx : (c + 1) * n_ctx]]
        seq[0] = bos  # llama-perplexity starts every chunk with BOS
        out.append(seq)
    return out


def scored_positions(path: str, chunks_scored: int | None = None) -> int:
    """The second half of each chunk, less its last token (nothing follows it); all the path's
    chunks unless ``chunks_scored`` says fewer."""
    return (CHUNKS[path] if chunks_scored is None else chunks_scored) * (CTX[path] - 1 - CTX[path] // 2)


def kvproxy_scores(
    llm: Any, primary: KVConfig, path: ScorePath, seqs: list[list[int]], chunk: int = PREFILL_CHUNK
) -> PositionScores:
    scorer = EmbeddedScorer(
        llm._model,
        primary=primary,
        reference=F16,
        n_ctx=CTX[path],
        threads=THREADS_N,
        flash_attn=True,
        path=path,
        chunk=chunk,
        prompt_ubatch=1 if path == "decode" else None,
    )
    first = CTX[path] // 2
    try:
        return PositionScores.concat([scorer.score(s[: first + 1], s[first + 1 :]) for s in seqs])
    finally:
        scorer.close()


@pytest.fixture(scope="module")
def decode_scores(llm: Any, bases: dict[str, Path]) -> dict[T, PositionScores]:
    """The decode path's scores of q4_0, q8_0 and f16 primaries on the decode chunk, their f16 reference
    computed once (kvproxy.scoring.embedded.score_against_one_reference, as `kvproxy calibrate`
    does): each config's figures are exactly its own scorer's (tests/test_calibrate.py)."""
    kvs = (T.Q4_0, T.Q8_0, T.F16)
    scorers = [
        EmbeddedScorer(
            llm._model,
            primary=KVConfig(kv, kv),
            reference=F16,
            n_ctx=CTX["decode"],
            threads=THREADS_N,
            flash_attn=True,
            path=ScorePath.DECODE,
            prompt_ubatch=1,
        )
        for kv in kvs
    ]
    first = CTX["decode"] // 2
    try:
        per_chunk = [
            score_against_one_reference(scorers, s[: first + 1], s[first + 1 :])
            for s in chunks(bases["decode"], llm.token_bos())
        ]
    finally:
        for scorer in scorers:
            scorer.close()
    return {kv: PositionScores.concat([c[k] for c in per_chunk]) for k, kv in enumerate(kvs)}


# a hang guard, not a speed target: the 5-config sweep takes about 60 s on a 2-core machine
SWEEP_TIMEOUT = 600
SWEEP_CONFIGS = "f16,q8_0,q8_0/q4_0,q4_0/q8_0,q4_0"
CalibrateRun = tuple[subprocess.CompletedProcess[str], Path]  # the command's result and its --out


@pytest.fixture(scope="module")
def calibrate_cli(tmp_path_factory: pytest.TempPathFactory) -> CalibrateRun:
    """`kvproxy calibrate --score-path prefill` as a user runs it, on its default text (the bundled
    English, which `text` holds for llama-perplexity): five configs against f16, two chunks of 512.
    test_calibrate_on_gemma checks the command; the prefill agreements read its q4_0 and q8_0 rows
    (one sweep for both: they were two, 63 and 33 CPU-s)."""
    out = tmp_path_factory.mktemp("calibrate") / "calib"
    result = run_cli(
        "calibrate", "--configs", SWEEP_CONFIGS, "--max-chunks", str(CHUNKS["prefill"]), "--out", str(out),
        "--budget", "0.05", "--score-path", "prefill", "--threads", str(THREADS_N),
        timeout=SWEEP_TIMEOUT,
    )  # fmt: skip
    return result, out


@pytest.fixture(scope="module")
def prefill_calibrate(calibrate_cli: CalibrateRun) -> dict[str, dict[str, Any]]:
    """The sweep's rows from calibration.json, by config (test_mean_kld_and_same_top_match_llama_perplexity
    checks that its chunks are llama-perplexity's tokens)."""
    result, out = calibrate_cli
    assert result.returncode == 0, result.stderr
    return {row["config"]: row for row in json.loads((out / "calibration.json").read_text())["results"]}


@pytest.mark.slow
@pytest.mark.parametrize("kv", [T.Q4_0, T.Q8_0])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_mean_kld_matches_llama_perplexity_on_the_same_path(
    request: pytest.FixtureRequest, bases: dict[str, Path], gold: Gold, llm: Any, kv: T, path: ScorePath
) -> None:
    gold_mean, gold_same = gold(path, kv)
    if path == "decode":
        d = summarize(request.getfixturevalue("decode_scores")[kv])
        tokens, mean, error, same_top = d.tokens, d.mean, d.mean_error, d.same_top
    else:
        r = request.getfixturevalue("prefill_calibrate")[kv.value]
        tokens, mean, error, same_top = r["tokens"], r["mean_kld"], r["mean_kld_error"], r["same_top"]
    assert tokens == scored_positions(path)
    print(
        f"\n{kv.value} {path} path: llama-perplexity -ub {UBATCH[path]} mean KLD {gold_mean:.6f}, "
        f"same top {gold_same:.4f}; kvproxy mean KLD {mean:.6f} ± {error:.6f} "
        f"({100 * (mean / gold_mean - 1):+.2f} %), same top {same_top:.4f}"
    )
    if path == "prefill" and os.environ.get("KVPROXY_SMALL_CHUNKS") == "1":
        seqs = chunks(bases[path], llm.token_bos())
        small = summarize(kvproxy_scores(llm, KVConfig(kv, kv), path, seqs, chunk=8)).mean
        print(f"{kv.value} prefill path in chunks of 8: {small:.6f} ({100 * (small / gold_mean - 1):+.2f} %)")
    assert mean == pytest.approx(gold_mean, rel=0.02)
    assert abs(same_top - gold_same) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_an_f16_primary_reads_exactly_zero(
    request: pytest.FixtureRequest, bases: dict[str, Path], llm: Any, path: ScorePath
) -> None:
    if path == "decode":  # every position, from the pass the configs share (the chunk size plays no part)
        scores, chunks_scored = request.getfixturevalue("decode_scores")[T.F16], CHUNKS["decode"]
    else:
        seqs = chunks(bases[path], llm.token_bos())[:1]
        scores, chunks_scored = kvproxy_scores(llm, F16, path, seqs, chunk=8), 1  # the shadow's default
    print(f"\nf16 primary, {path} path: {len(scores)} positions, max KLD {float(scores.kld.max())}")
    assert len(scores) == scored_positions(path, chunks_scored)
    assert np.all(scores.kld == 0.0) and np.all(scores.same_top)


@pytest.mark.slow
def test_mean_kld_and_same_top_match_llama_perplexity(
    gemma_path: Path, bases: dict[str, Path], gold: Gold, llm: Any
) -> None:
    """The shadow scorer's defaults (the prefill path in chunks of 8) against llama-perplexity's q4_0
    run; then `kvproxy calibrate`'s cut of its default text (the bundled English, the text file
    llama-perplexity reads) is llama-perplexity's."""
    import llama_cpp

    gold_mean, gold_same = gold(ScorePath.PREFILL, T.Q4_0)
    scorer = EmbeddedScorer(
        llm._model,
        primary=KVConfig(T.Q4_0, T.Q4_0),
        reference=F16,
        n_ctx=CTX["prefill"],
        threads=THREADS_N,
        flash_attn=True,
    )
    first = CTX["prefill"] // 2
    try:
        seqs = chunks(bases["prefill"], llm.token_bos())
        parts = [scorer.score(s[: first + 1], s[first + 1 :]) for s in seqs]
    finally:
        scorer.close()
    mine = summarize(PositionScores.concat(parts))
    assert mine.tokens == scored_positions(ScorePath.PREFILL)
    print(
        f"\nllama-perplexity: mean KLD {gold_mean:.6f}, same top {gold_same:.4f}; "
        f"kvproxy: mean KLD {mine.mean:.6f} ± {mine.mean_error:.6f}, same top {mine.same_top:.4f}"
    )
    # chunks of 8 mix the decode and prefill attention kernels (module docstring): 5 %, not 2 %
    assert mine.mean == pytest.approx(gold_mean, rel=0.05)
    assert abs(mine.same_top - gold_same) <= 0.015
    # q4_0 K/V on Gemma 3 270M really loses this much (docs/reference-design.md: 0.13)
    assert 0.05 < mine.mean < 0.5

    # `kvproxy calibrate` reads the text file and cuts it the way llama-perplexity does: its chunks
    # are the base file's tokens, one for one (so prefill_calibrate scores the very same positions)
    vocab = llama_cpp.Llama(str(gemma_path), vocab_only=True, verbose=False)
    try:
        tokenize = lambda t: list(vocab.tokenize(t.encode(), add_bos=False, special=False))  # noqa: E731
        # calibrate's default cut
        cut = text_chunks(iter([english_text()]), tokenize, CTX["prefill"], vocab.token_bos())
        cut_chunks = list(islice(cut, CHUNKS["prefill"]))
    finally:
        vocab.close()
    assert cut_chunks == seqs


@pytest.mark.slow
def test_calibrate_on_gemma(calibrate_cli: CalibrateRun) -> None:
    """The sweep on the (cheaper) prefill path; the decode path is
    tests/test_calibrate.py::test_calibrate_on_the_decode_path_by_default. Two chunks of 512 tokens
    (2 x 255 scored): enough 64-token spans for the drift baseline's spread to be bounded from below
    (two chunks of 256 left 2 spans, whose spread read 0.016)."""
    result, out = calibrate_cli
    assert result.returncode == 0, result.stderr
    assert "recommendation for a mean KLD budget of 0.05: q8_0/q4_0" in result.stdout
    rows = {row["config"]: row for row in csv.DictReader((out / "calibration.csv").open())}
    kld = {c: float(row["mean_kld"]) for c, row in rows.items()}
    assert kld["f16"] == 0
    assert kld["q8_0"] < kld["q4_0"] / 5  # q8_0 far below q4_0
    assert kld["q8_0/q4_0"] < kld["q4_0/q8_0"] / 3  # quantizing K costs far more than V
    assert int(rows["q4_0"]["tokens"]) == 2 * 255
    assert float(rows["q4_0"]["bits_per_value"]) == 4.5
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["recommendation"] == "q8_0/q4_0" and "q4_0" in doc["pareto_front"] and not doc["interrupted"]
    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["configs"]["q4_0"]["mean_kld"] == pytest.approx(kld["q4_0"])
    assert baseline["score_path"] == doc["score_path"] == "prefill"
    assert_a_deployment_arms_its_drift_detector_from(out / "baseline.json", kld)
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

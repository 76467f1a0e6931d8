"""`kvproxy calibrate` on the bundled Gemma 3 270M: outputs, ordering, recommendation, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvproxy.calibrate import ConfigResult, pareto_front, parse_config, read_blocks, recommend, text_chunks
from kvproxy.deployments.build import http_deployment
from kvproxy.deployments.spec import ProxyConfig
from kvproxy.deployments.status import deployment_status
from kvproxy.shadow.baseline import read_baseline
from tests.cli_runner import run_cli_in_process
from tests.test_startup import run_cli

# a hang guard, not a speed target: a sweep ran past run_cli's default 60 s once while other work
# shared the cores (the 5-config prefill sweep, test_calibrate_on_gemma, lives in
# tests/test_score_paths_agreement.py, whose llama-perplexity agreement reads its figures)
SWEEP_TIMEOUT = 600


@pytest.mark.fast  # in process, no model
def test_parse_config() -> None:
    assert str(parse_config("q8_0")) == "q8_0" and str(parse_config("q8_0/q4_0")) == "q8_0/q4_0"
    with pytest.raises(ValueError, match="not a KV config"):
        parse_config("q3_k")


@pytest.mark.fast  # in process, no model
def test_chunks_match_llama_perplexity_layout(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("word " * 50_000)
    blocks = list(read_blocks(text, size=1000))
    assert len(blocks) > 200  # read a block at a time, never the whole file
    assert "".join(blocks).split() == text.read_text().split()  # no word cut or lost
    chunks = list(text_chunks(["a b c d e f g"], lambda s: list(range(10, 10 + len(s.split()))), 4, bos=1))
    # one BOS before the whole text, cut every 4 tokens, each chunk's first token replaced by BOS
    assert chunks == [[1, 10, 11, 12], [1, 14, 15, 16]]


@pytest.mark.fast  # in process, no model
def test_log_spread_over_request_sized_spans() -> None:
    """The drift noise scale: the spread of log mean KLD over whole spans of SEGMENT_TOKENS."""
    import math
    import statistics

    import numpy as np

    from kvproxy.calibrate import LogSpread
    from kvproxy.shadow.baseline import SEGMENT_TOKENS

    means = [0.1, 0.2, 0.05]
    kld = np.concatenate([np.full(SEGMENT_TOKENS, m) for m in means] + [np.full(SEGMENT_TOKENS - 1, 9.0)])
    spread = LogSpread()
    spread.add_spans(kld[: 2 * SEGMENT_TOKENS])
    spread.add_spans(kld[2 * SEGMENT_TOKENS :])  # the last, partial span is left out
    assert spread.n == 3
    assert spread.sigma == pytest.approx(statistics.stdev(math.log(m + 1e-6) for m in means))
    one = LogSpread()
    one.add_spans(kld[:SEGMENT_TOKENS])
    assert math.isnan(one.sigma)  # no spread from one span


def r(config: str, kv: int, kld: float) -> ConfigResult:
    return ConfigResult(config, 0, kv, 1, kld, 0, 0, 0, 1, 0, 0, 0, 0)


@pytest.mark.fast  # in process, no model
def test_pareto_and_recommendation() -> None:
    rs = [r("f16", 9, 0.0), r("q8_0", 5, 0.01), r("q5_1", 3, 0.04), r("q4_0", 2, 0.11), r("x", 5, 0.2)]
    assert [p.config for p in pareto_front(rs)] == ["f16", "q8_0", "q5_1", "q4_0"]
    assert recommend(rs, 0.05).config == "q5_1"  # type: ignore[union-attr]
    assert recommend(rs, 0.001).config == "f16"  # type: ignore[union-attr]
    assert recommend(rs, None) is None


@pytest.mark.fast  # in process, no model
def test_calibrate_refuses_bad_input(tmp_path: Path) -> None:
    assert (
        "not a KV config"
        in run_cli_in_process("calibrate", "--configs", "f16,q3_k", "--out", str(tmp_path)).stderr
    )
    assert "does not exist" in run_cli_in_process("calibrate", "--text", str(tmp_path / "none.txt")).stderr
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    result = run_cli_in_process("calibrate", "--text", str(short), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "fewer than 512 tokens" in result.stderr


def test_calibrate_on_the_decode_path_by_default(tmp_path: Path) -> None:
    """Without --score-path: the decode path (generation's numerics), said in the table and files."""
    out = tmp_path / "calib"
    result = run_cli(
        "calibrate",
        "--configs",
        "f16,q4_0",
        "--ctx-size",
        "256",
        "--max-chunks",
        "1",
        "--out",
        str(out),
        timeout=SWEEP_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "decode path" in result.stdout and "CPU" in result.stdout
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["score_path"] == "decode" and doc["device"] == "CPU"
    q4 = next(row for row in doc["results"] if row["config"] == "q4_0")
    assert q4["tokens"] == 256 - 1 - 128 and 0.02 < q4["mean_kld"] < 0.5
    assert json.loads((out / "baseline.json").read_text())["score_path"] == "decode"


def test_ctrl_c_keeps_what_was_scored(tmp_path: Path) -> None:
    """Ctrl-C once the progress bar shows a chunk scored: exit 130, the chunks scored so far written.

    Chunks of 64 tokens keep it short: the interrupt is sent as soon as the bar (rendered into the
    pipe: TTY_COMPATIBLE=1) counts one chunk, so no fixed wait or CPU-seconds guess is involved."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time

    from kvproxy.corpus import english_text

    text = tmp_path / "long.txt"
    text.write_text((english_text() + "\n") * 20)  # hundreds of 64-token chunks: far more than it scores
    out = tmp_path / "calib"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvproxy", "calibrate", "--configs", "f16,q4_0", "--text", str(text),
         "--ctx-size", "64", "--out", str(out), "--score-path", "prefill", "-t", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "120"},
    )  # fmt: skip
    stderr: list[str] = []
    assert proc.stderr is not None
    pipe = proc.stderr
    threading.Thread(target=lambda: stderr.extend(iter(lambda: pipe.read(1), "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 300  # model load and one chunk, on a shared, busy core
        scored = re.compile(r"\b[1-9][0-9]*/[0-9]+\b")  # the bar's "M/N" column with M >= 1
        while not scored.search("".join(stderr)):
            assert proc.poll() is None, "".join(stderr)[-2000:]
            assert time.monotonic() < deadline, "no chunk scored:\n" + "".join(stderr)[-2000:]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # never leave a sweep running past the test
            proc.wait()
    time.sleep(0.2)  # the reader thread drains the pipe's last lines
    assert proc.returncode == 130, "".join(stderr)[-2000:]
    assert "interrupted" in "".join(stderr)
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["interrupted"] is True and 1 <= doc["chunks"] < 300
    q4 = next(row for row in doc["results"] if row["config"] == "q4_0")
    assert q4["tokens"] == doc["chunks"] * (64 - 1 - 32) and q4["mean_kld"] > 0


def test_ctrl_c_during_set_up_stops_cleanly(gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the scoring contexts are created (the model loaded, nothing scored yet) used to
    raise out of the set-up and, in the CLI, die of SIGSEGV at exit; now the sweep stops, closes what
    it opened and reports it was interrupted with nothing scored."""
    import os
    import signal
    import threading

    from kvproxy.calibrate import sweep
    from kvproxy.config import ScorePath
    from kvproxy.corpus import english_text
    from kvproxy.model.gguf_info import read_model_info
    from kvproxy.scoring import embedded

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    create = embedded.EmbeddedScorer.__init__

    def ctrl_c_then_create(self: embedded.EmbeddedScorer, *args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the fault: a Ctrl-C as the first context is made
        create(self, *args, **kwargs)

    monkeypatch.setattr(embedded.EmbeddedScorer, "__init__", ctrl_c_then_create)
    # the test's own handler: a Ctrl-C the sweep does not take must not end the pytest session
    stray: list[int] = []

    def take(signum: int, _: object) -> None:
        stray.append(signum)

    guard = signal.signal(signal.SIGINT, take)
    try:
        result = sweep(
            gemma_path, read_model_info(gemma_path), [parse_config("f16"), parse_config("q4_0")],
            parse_config("f16"), iter([english_text()]), ctx_size=64, threads=1,
            score_path=ScorePath.PREFILL, max_chunks=1,
        )  # fmt: skip
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, guard)
    assert not stray  # the sweep's handler took it
    assert result.interrupted and result.chunks == 0
    assert all(r.tokens == 0 for r in result.results)
    assert restored is take  # the handler in place before the sweep is back


def assert_a_deployment_arms_its_drift_detector_from(baseline: Path, kld: dict[str, float]) -> None:
    """The deployments file names the calibration's baseline.json: the detector starts armed."""
    config = baseline.parent / "deployments.toml"
    config.write_text(
        '[[deployments]]\nmodel = "a"\nreference = { urls = ["http://127.0.0.1:10"] }\n'
        'primary = { urls = ["http://127.0.0.1:9"], cache_type_k = "q8_0", cache_type_v = "q4_0" }\n'
        'drift = { baseline = "baseline.json" }\n'  # relative to the deployments file
    )
    d = http_deployment(ProxyConfig.from_file(config).deployments[0])
    drift = deployment_status(d)["drift"]
    assert drift["state"] == "ok" and drift["baseline_mean_kld"] == pytest.approx(kld["q8_0/q4_0"])
    b = read_baseline(baseline, parse_config("q4_0"), default_log_sigma=9.0)
    # measured, not the default, and the file's figure (test_log_spread_over_request_sized_spans checks
    # the spread's sum itself)
    written = json.loads(baseline.read_text())["configs"]["q4_0"]["log_sigma"]
    assert b.mean_kld == pytest.approx(kld["q4_0"]) and b.log_sigma == pytest.approx(written)
    assert 0.05 < b.log_sigma < 3
    with pytest.raises(ValueError, match=r"no baseline for the KV config q5_1 \(it has: f16, q8_0"):
        read_baseline(baseline, parse_config("q5_1"), default_log_sigma=0.5)
    with pytest.raises(ValueError, match="is the calibration's reference"):
        read_baseline(baseline, parse_config("f16"), default_log_sigma=0.5)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_one_reference_pass_gives_every_config_its_own_figures(gemma_path: Path, path: str) -> None:
    """The sweep computes the f16 reference once a chunk for all configs
    (kvproxy.scoring.embedded.score_against_one_reference); each config's per-position figures are
    exactly those its own scorer computes with a reference of its own."""
    import llama_cpp
    import numpy as np

    from kvproxy.scoring.embedded import EmbeddedScorer, score_against_one_reference

    llm = llama_cpp.Llama(str(gemma_path), n_ctx=64, verbose=False)
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and")
    prompt, completion = toks[:12], toks[12:]
    scorers = [
        EmbeddedScorer(
            llm._model,
            primary=parse_config(c),
            reference=parse_config("f16"),
            n_ctx=64,
            threads=1,
            flash_attn=True,
            path=path,
            chunk=4,  # the completion in several calls
        )
        for c in ("q8_0", "q4_0", "q4_0/q8_0")
    ]
    try:
        shared = score_against_one_reference(scorers, prompt, completion)
        own = [s.score(prompt, completion) for s in scorers]
        scorers[1].n_ctx += 1  # a context of another shape: its reference would not be the same
        with pytest.raises(ValueError, match="share"):
            score_against_one_reference(scorers, prompt, completion)
        scorers[1].n_ctx -= 1
        scorers[1].chunk += 1  # the prefill path's calls; the decode path makes none of that size
        if path == "prefill":
            with pytest.raises(ValueError, match="share"):
                score_against_one_reference(scorers, prompt, completion)
        else:
            assert (
                score_against_one_reference(scorers, prompt, completion)[1].kld.tolist()
                == own[1].kld.tolist()
            )
    finally:
        for s in scorers:
            s.close()
        llm.close()
    assert len(completion) > 8 and [len(s) for s in shared] == [len(completion)] * 3
    for a, b in zip(shared, own, strict=True):
        assert a.first_position == b.first_position == len(prompt)
        for field in ("kld", "same_top", "p_ref", "p_primary"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert shared[1].kld.mean() > shared[0].kld.mean() > 0  # three configs, three different figures

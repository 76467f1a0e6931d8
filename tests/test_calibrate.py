"""`kvproxy calibrate` on the bundled Gemma 3 270M: outputs, ordering, recommendation, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kvproxy.calibrate import ConfigResult, pareto_front, parse_config, read_blocks, recommend, text_chunks
from kvproxy.deployments.build import http_deployment
from kvproxy.deployments.spec import ProxyConfig
from kvproxy.deployments.status import deployment_status
from kvproxy.shadow.baseline import read_baseline
from tests.cli_runner import run_cli_in_process
from tests.test_startup import run_cli

# a hang guard, not a speed target: the 5-config sweep takes about 40 s on a quiet 2-core machine and
# ran past run_cli's default 60 s once while other work shared the cores
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


def r(config: str, kv: int, kld: float) -> ConfigResult:
    return ConfigResult(config, 0, kv, 1, kld, 0, 0, 0, 1, 0, 0, 0, 0)


@pytest.mark.fast  # in process, no model
def test_pareto_and_recommendation() -> None:
    rs = [r("f16", 9, 0.0), r("q8_0", 5, 0.01), r("q5_1", 3, 0.04), r("q4_0", 2, 0.11), r("x", 5, 0.2)]
    assert [p.config for p in pareto_front(rs)] == ["f16", "q8_0", "q5_1", "q4_0"]
    assert recommend(rs, 0.05).config == "q5_1"  # type: ignore[union-attr]
    assert recommend(rs, 0.001).config == "f16"  # type: ignore[union-attr]
    assert recommend(rs, None) is None


def test_calibrate_on_gemma(tmp_path: Path) -> None:
    """The sweep on the (cheaper) prefill path; the decode path is the next test's."""
    out = tmp_path / "calib"
    result = run_cli(
        "calibrate",
        "--configs",
        "f16,q8_0,q8_0/q4_0,q4_0/q8_0,q4_0",
        "--max-chunks",
        "2",
        "--out",
        str(out),
        "--budget",
        "0.05",
        "--score-path",
        "prefill",
        timeout=SWEEP_TIMEOUT,
    )
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_keeps_what_was_scored(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from kvproxy.corpus import english_text

    text = tmp_path / "long.txt"
    text.write_text((english_text() + "\n") * 20)  # about 60 chunks: far more than the test waits for
    out = tmp_path / "calib"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvproxy",
            "calibrate",
            "--configs",
            "f16,q4_0",
            "--text",
            str(text),
            "--out",
            str(out),
            "--score-path",
            "prefill",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # model load and a few chunks: counted in the process's CPU seconds, not wall time, so a busy or
    # pinned core (make test's workers) still lets it get that far before the interrupt
    deadline = time.monotonic() + 180
    while _cpu_seconds(proc.pid) < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["interrupted"] is True and 1 <= doc["chunks"] < 60
    q4 = next(row for row in doc["results"] if row["config"] == "q4_0")
    assert q4["tokens"] == doc["chunks"] * 255 and q4["mean_kld"] > 0


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
    assert b.mean_kld == pytest.approx(kld["q4_0"]) and 0.05 < b.log_sigma < 3  # measured, not the default
    with pytest.raises(ValueError, match=r"no baseline for the KV config q5_1 \(it has: f16, q8_0"):
        read_baseline(baseline, parse_config("q5_1"), default_log_sigma=0.5)
    with pytest.raises(ValueError, match="is the calibration's reference"):
        read_baseline(baseline, parse_config("f16"), default_log_sigma=0.5)

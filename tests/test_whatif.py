"""The live what-if (issue 27 part 3): settings, the frontier, agreement with ``kvproxy calibrate``
on the same text through a real ``kvproxy backend``, and the seed's finding on a real ``kvproxy serve``
(Gemma 3 270M served at q8_0, candidates q4_0, q8_0/q4_0, q4_0/q8_0).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from kvproxy.calibrate import parse_config, sweep, text_chunks
from kvproxy.config import Settings
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores
from kvproxy.model.gguf_info import read_model_info
from kvproxy.shadow.whatif import ConfigCost, Point, WhatIfTracker, cheapest_within, pareto
from kvproxy.shadow.whatif_scorer import WhatIf
from tests.conftest import RunningServer, start_server, stop_server, wait_for
from tests.test_startup import run_cli
from tests.test_ui import ARTIFACTS, browser  # noqa: F401 - the Chromium fixture
from tests.test_ui import wait_for as ui_wait

TYPES = "f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl"
CTX = 128  # calibrate's chunk (half prompt, half scored: 63 positions) and the backend's context


# ---- settings and the frontier ------------------------------------------------------------------


def test_what_if_setting_spells_configs_and_lists_valid_types(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(what_if="q8_0, q5_1,iq4_nl,q8_0/q4_0,Q4_0/q4_0")
    assert s.what_if == ["q8_0", "q5_1", "iq4_nl", "q8_0/q4_0", "q4_0"]
    monkeypatch.setenv("KVPROXY_WHAT_IF", "q4_0/q8_0")
    assert Settings().what_if == ["q4_0/q8_0"]
    for bad in ("q3_k", "q8_0/q4_k", "q8_0/q4_0/f16", "/q4_0"):
        with pytest.raises(ValidationError, match=re.escape(f"each one of {TYPES}")):
            Settings(what_if=bad)
    with pytest.raises(ValidationError, match="needs --score-path decode"):
        Settings(what_if="q4_0", score_path="prefill")
    with pytest.raises(ValidationError, match="q8_0/q4_0 has a quantized V cache"):
        Settings(what_if="q8_0/q4_0", cache_type_v="f16", flash_attn=False)
    assert Settings().what_if_rate == 1.0 and Settings().what_if_kld_budget == 0.05


def test_cli_refuses_an_unknown_what_if_type_before_loading() -> None:
    result = run_cli("serve", "--what-if", "q8_0,q3_k", "--port", "0", "--no-probe")
    assert result.returncode == 2
    assert "'q3_k' is not a KV config" in result.stderr and TYPES in result.stderr
    backend = run_cli("backend", "--what-if", "q2", "--port", "0", "--no-probe")
    assert backend.returncode == 2 and "'q2' is not a KV config" in backend.stderr


def test_frontier_and_budget_pick() -> None:
    pts = [
        Point("f16", 900, 0.0),
        Point("q8_0", 500, 0.01),
        Point("q8_0/q4_0", 400, 0.02),
        Point("q4_0/q8_0", 400, 0.12),  # as small as q8_0/q4_0 and worse: off the frontier
        Point("q4_0", 300, 0.13),
        Point("iq4_nl", 300, math.nan),  # not scored yet: neither on it nor picked
    ]
    assert pareto(pts) == {"f16", "q8_0", "q8_0/q4_0", "q4_0"}
    assert cheapest_within(pts, 0.05) == "q8_0/q4_0"
    assert cheapest_within(pts, 0.005) == "f16"
    assert cheapest_within(pts, 1.0) == "q4_0"
    assert cheapest_within([Point("q4_0", 1, math.nan)], 1.0) is None


# ---- budget rules: shed, failed, not sampled (faults injected; the scored path runs below) ---------


def _tracker(rate: float = 1.0) -> WhatIfTracker:
    def cost(spec: str, role: str, size: int) -> ConfigCost:
        return ConfigCost(parse_config(spec), role, size, size * 100)

    return WhatIfTracker(
        cost("q8_0", "served", 2), [cost("q4_0", "candidate", 1)], cost("f16", "reference", 4),
        budget=0.05, rate=rate, n_ctx=100,
    )  # fmt: skip


class _BrokenReplay:
    """A replay whose llama.cpp call fails (the fault to inject)."""

    def score(self, *_: Any) -> list[PositionScores]:
        raise RuntimeError("llama_decode returned 1")

    def close(self) -> None:
        pass


def _served(n: int = 4) -> PositionScores:
    a = np.full(n, 0.01)
    return PositionScores(a, np.ones(n, dtype=bool), np.full(n, 0.5), np.full(n, 0.49))


def test_what_if_gives_way_to_backlog_and_counts_failures_and_rate() -> None:
    async def run() -> dict[str, int]:
        w = WhatIf(lambda: _BrokenReplay(), _tracker())  # type: ignore[arg-type,return-value]
        try:
            await w.after([1, 2], [3, 4], None, _served(), waiting=1)  # another score request waits
            w.backlog = lambda: 2  # shadow jobs queued
            await w.after([1, 2], [3, 4], None, _served())
            w.backlog = lambda: 0
            await w.after([1, 2], [3, 4], None, _served())  # replayed, and fails: counted, not raised
            w.tracker.rate = 0.0
            await w.after([1, 2], [3, 4], None, _served())
            return dict(w.tracker.counts.by_outcome)
        finally:
            w.close()

    counts = asyncio.run(run())
    assert counts == {"scored": 0, "failed": 1, "shed": 2, "not_sampled": 1}
    t = _tracker(rate=0.5)
    t.add(_served(), [_served()])
    st = t.status()
    assert st["jobs"]["scored"] == 1 and st["scored_tokens"] == 4
    with pytest.raises(ValueError, match="2 candidate results for 1 candidates"):
        t.add(_served(), [_served(), _served()])


# ---- the live what-if against the offline tool --------------------------------------------------


def _chunks(gemma_path: Path, n: int) -> list[list[int]]:
    """calibrate's chunks of the bundled English text (llama-perplexity's layout)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gemma_path), vocab_only=True, verbose=False)
    try:
        tokenize = lambda text: list(llm.tokenize(text.encode(), add_bos=False, special=False))  # noqa: E731
        out = []
        for chunk in text_chunks([english_text()], tokenize, CTX, llm.token_bos()):
            out.append(chunk)
            if len(out) == n:
                return out
    finally:
        llm.close()
    raise AssertionError("the text is too short")


def _what_if(base_url: str) -> dict[str, Any]:
    doc = httpx.get(f"{base_url}/kvproxy/v1/what-if", timeout=30).json()
    out = doc["deployments"][0]["what_if"]
    assert out is not None
    return dict(out)


def _by_config(what_if: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["config"]: row for row in what_if["configs"]}


def test_live_what_if_matches_calibrate_on_the_decode_path(gemma_path: Path) -> None:
    """`kvproxy backend` served at q8_0 with candidates q4_0 and q4_0/q8_0, scoring calibrate's
    chunks through its score route (as a proxy sends them): per config, the live mean KLD and
    same-top rate agree with `kvproxy calibrate --score-path decode` within their confidence
    intervals (on one CPU the replay is calibrate's decode path, so they agree far closer)."""
    n_chunks, threads = 1, 1  # one thread: on a shared, busy CPU two spin on each other
    chunks = _chunks(gemma_path, n_chunks)
    configs = [parse_config(c) for c in ("f16", "q8_0", "q4_0", "q4_0/q8_0")]
    offline = sweep(
        gemma_path,
        read_model_info(gemma_path),
        configs,
        configs[0],
        iter([english_text()]),
        ctx_size=CTX,
        threads=threads,
        max_chunks=n_chunks,
    )
    calib = {r.config: r for r in offline.results}
    srv = start_server(
        "-c", str(CTX), "-t", str(threads), "-ctk", "q8_0", "-ctv", "q8_0",
        "--what-if", "q4_0,q4_0/q8_0",
        command="backend",
    )  # fmt: skip
    try:
        for chunk in chunks:
            first = CTX // 2
            r = httpx.post(
                f"{srv.base_url}/kvproxy/v1/score",
                json={"prompt_tokens": chunk[: first + 1], "token_ids": chunk[first + 1 :]},
                timeout=300,
            )
            assert r.status_code == 200, r.text
        live = _what_if(srv.base_url)
    finally:
        stop_server(srv)
    assert live["jobs"] == {"scored": n_chunks, "failed": 0, "shed": 0, "not_sampled": 0}
    rows = _by_config(live)
    assert [rows[c]["role"] for c in ("q8_0", "q4_0", "q4_0/q8_0", "f16")] == [
        "served", "candidate", "candidate", "reference",
    ]  # fmt: skip
    for config in ("q8_0", "q4_0", "q4_0/q8_0"):
        got, want = rows[config]["kld"], calib[config]
        assert got["tokens"] == want.tokens == n_chunks * (CTX - 1 - CTX // 2)
        ci = 1.96 * math.hypot(got["mean_error"], want.mean_kld_error)
        print(f"{config}: live {got['mean']:.5f} ± {got['mean_error']:.5f}, calibrate {want.mean_kld:.5f}")
        assert abs(got["mean"] - want.mean_kld) <= ci, (config, got["mean"], want.mean_kld)
        assert abs(got["same_top"] - want.same_top) <= 1.96 * math.hypot(
            got["same_top_error"], want.same_top_error
        )
        assert got["mean"] == pytest.approx(want.mean_kld, rel=0.02)  # the same numerics, on one CPU
        assert rows[config]["allocated_bytes"] == want.kv_bytes  # the same context, the same formula


# ---- the seed's finding, live, on the embedded default ------------------------------------------

SEED = ("q4_0", "q8_0/q4_0", "q4_0/q8_0")


@pytest.fixture(scope="module")
def seed_server() -> Iterator[RunningServer]:
    """Gemma 3 270M served at q8_0 in process, every request shadowed and replayed under q4_0,
    q8_0 K + q4_0 V and q4_0 K + q8_0 V."""
    srv = start_server(
        "-c", "1024", "-t", "1", "-ctk", "q8_0", "-ctv", "q8_0",
        "--shadow-rate", "1", "--what-if", ",".join(SEED),
    )  # fmt: skip
    try:
        with httpx.Client(base_url=srv.base_url, timeout=300) as http:
            text = english_text()
            # English prose prompts, sampled answers: the same traffic for every config. 600 characters
            # (about 135 tokens) and 64 tokens a request: every position is replayed under 4 configs
            # (f16 and 3 candidates), and 3 x 64 positions hold the orderings below with margins of 2x
            # and more (docs/what-if.md has the figures)
            for i in range(3):
                r = http.post(
                    "/v1/completions",
                    # forced: on a saturated shared machine the loop watch would shed them (counted)
                    headers={"X-KVProxy-Shadow": "force"},
                    json={
                        "model": srv.model,
                        "prompt": text[3000 * i : 3000 * i + 600],
                        "max_tokens": 64,
                        "temperature": 0.7,
                        "seed": i,
                    },
                )
                assert r.status_code == 200, r.text
                # one at a time: with shadow jobs queued the what-if gives way (shed, counted)
                done = i + 1
                assert wait_for(lambda: _what_if(srv.base_url)["jobs"]["scored"] == done, 600)  # noqa: B023
        yield srv
    finally:
        stop_server(srv)


def test_seed_finding_live_q4_0_far_above_q8_0_and_k_is_the_sensitive_side(
    seed_server: RunningServer,
) -> None:
    w = _what_if(seed_server.base_url)
    rows = _by_config(w)
    mean = {c: rows[c]["kld"]["mean"] for c in ("q8_0", *SEED)}
    err = {c: rows[c]["kld"]["mean_error"] for c in mean}
    print(
        "what-if on the same traffic:", {c: f"{mean[c]:.4f} ± {err[c]:.4f}" for c in mean}, w["scored_tokens"]
    )
    assert rows["q8_0"]["role"] == "served" and w["served"] == "q8_0"
    banner = "  what-if    q4_0, q8_0/q4_0, q4_0/q8_0 replayed on 100% of scored jobs, KLD budget 0.05"
    assert banner in "".join(seed_server.output)
    assert w["jobs"] == {"scored": 3, "failed": 0, "shed": 0, "not_sampled": 0}
    assert all(rows[c]["kld"]["tokens"] == w["scored_tokens"] >= 150 for c in mean)  # the same positions
    # q4_0 far above q8_0 on the same tokens, beyond both errors
    assert mean["q4_0"] > 4 * mean["q8_0"] and mean["q4_0"] - mean["q8_0"] > 3 * math.hypot(
        err["q4_0"], err["q8_0"]
    )
    # K is the sensitive side for Gemma: q4_0 K (with q8_0 V) costs far more than q4_0 V (with q8_0 K)
    assert mean["q4_0/q8_0"] > 3 * mean["q8_0/q4_0"]
    assert mean["q4_0/q8_0"] - mean["q8_0/q4_0"] > 3 * math.hypot(err["q4_0/q8_0"], err["q8_0/q4_0"])
    assert rows["q4_0"]["kld"]["same_top"] < rows["q8_0"]["kld"]["same_top"]
    # KV bytes: the model's shape through kvproxy.model.memory (Gemma 3 270M: 18 layers, 1 KV head of 256)
    assert rows["f16"]["bytes_per_token"] == 18 * 2 * 256 * 2
    assert rows["q8_0"]["bytes_per_token"] == 18 * 2 * 256 * 34 // 32
    assert rows["q4_0"]["bytes_per_token"] == 18 * 2 * 256 * 18 // 32
    assert rows["q8_0/q4_0"]["bytes_per_token"] == 18 * 256 * (34 + 18) // 32
    assert (
        rows["q4_0"]["allocated_bytes"]
        < rows["q8_0/q4_0"]["allocated_bytes"]
        < rows["q8_0"]["allocated_bytes"]
    )
    # the frontier and the budget pick follow from the figures (kvproxy.shadow.whatif)
    points = [Point(r["config"], r["allocated_bytes"], r["kld"]["mean"]) for r in w["configs"]]
    assert {r["config"] for r in w["configs"] if r["pareto"]} == pareto(points)
    assert w["kld_budget"] == 0.05 and w["within_budget"] == cheapest_within(points, 0.05)
    assert w["within_budget"] in ("q8_0/q4_0", "q8_0")  # q4_0 K is over any reasonable budget
    # the status route carries the same object; the rest of its shape is unchanged
    status = httpx.get(f"{seed_server.base_url}/kvproxy/v1/status", timeout=30).json()["deployments"][0]
    assert status["what_if"]["configs"] == w["configs"] and "kld" in status and "shadow" in status


def test_what_if_metrics_carry_a_fixed_candidate_label(seed_server: RunningServer) -> None:
    w = _by_config(_what_if(seed_server.base_url))
    text = httpx.get(f"{seed_server.base_url}/metrics", timeout=30).text
    series = re.findall(r"^kvproxy_whatif_mean_kld\{([^}]*)\} (\S+)$", text, re.M)
    labels = {dict(re.findall(r'(\w+)="([^"]*)"', s))["candidate"]: float(v) for s, v in series}
    assert set(labels) == {"q8_0", "f16", *SEED}  # the operator's configs, nothing else
    for c in SEED:
        assert labels[c] == pytest.approx(w[c]["kld"]["mean"])
    assert re.search(r'kvproxy_whatif_kv_bytes\{[^}]*candidate="q4_0"[^}]*role="candidate"', text)
    assert re.search(r'kvproxy_whatif_jobs\{deployment="[^"]+",outcome="scored"\} 3\.0', text)


def test_the_page_draws_the_what_if_frontier(seed_server: RunningServer, browser: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    w = _what_if(seed_server.base_url)
    browser.get(seed_server.base_url + "/ui")
    chart = ui_wait(lambda: browser.find_elements(By.CSS_SELECTOR, 'svg.whatifchart[data-points="5"]'))[0]
    dots = {c.get_attribute("data-config"): c for c in chart.find_elements(By.CSS_SELECTOR, "circle.wi")}
    assert set(dots) == {r["config"] for r in w["configs"]}
    for row in w["configs"]:
        dot = dots[row["config"]]
        assert dot.get_attribute("data-role") == row["role"]
        assert dot.get_attribute("data-pareto") == str(row["pareto"]).lower()
        assert json.loads(dot.get_attribute("data-mean")) == row["kld"]["mean"]
    assert "served" in dots["q8_0"].get_attribute("class")
    # higher KLD is drawn higher (smaller y): q4_0 above q8_0, q4_0 K above q4_0 V
    y = {c: float(d.get_attribute("cy")) for c, d in dots.items()}
    assert y["q4_0"] < y["q8_0"] and y["q4_0/q8_0"] < y["q8_0/q4_0"]
    frontier = chart.find_element(By.CSS_SELECTOR, "polyline.frontier").get_attribute("points").split()
    assert len(frontier) == sum(r["pareto"] for r in w["configs"])
    pick = browser.find_element(By.CSS_SELECTOR, ".whatifpick")
    assert pick.get_attribute("data-config") == w["within_budget"] and pick.text.startswith(
        w["within_budget"]
    )
    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("document.querySelector('.whatif').scrollIntoView()")
    browser.save_screenshot(str(ARTIFACTS / "ui-what-if.png"))

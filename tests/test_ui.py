"""The live quality page: its server parts (status additions, kept per-token scores, routes) and the
page itself in real headless Chromium against a real ``kvproxy serve`` on the bundled Gemma.

Screenshots go to ``test-artifacts/`` (page after traffic, chat answer).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from kvproxy.api.shadow_ask import parse_token_scores_header
from kvproxy.api.ui import page_html
from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import embedded_deployment
from kvproxy.kld import PositionScores
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.memory import kv_cache_allocated_bytes
from kvproxy.scoring.kept import DROPPED, FAILED, NOT_SAMPLED, PENDING, SCORED, KeptScores
from kvproxy.shadow.ask import ShadowAsk
from kvproxy.shadow.history import KLDHistory
from kvproxy.shadow.pool import ShadowJob, ShadowPool
from kvproxy.shadow.quality import QualityTracker
from kvproxy.shadow.token_scores import TokenScoreStore
from kvproxy.telemetry.gpu import read_gpus
from tests.conftest import RunningServer, serve_in_thread

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FORCE = {"X-KVProxy-Shadow": "force"}


def scores(kld: list[float], first: int = 5) -> PositionScores:
    a = np.asarray(kld, dtype=np.float64)
    return PositionScores(a, a < 0.5, np.full(a.size, 0.5), np.full(a.size, 0.4)).at(first)


# ---- the store of kept per-token scores ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_is_bounded_and_expires() -> None:
    clock = Clock()
    store = TokenScoreStore(capacity=3, ttl=600, clock=clock)
    for i in range(5):
        store.put(f"r{i}", store.new_slot())
        clock.now += 1
    assert len(store) == 3 and store.get("r0") is None and store.get("r1") is None
    assert store.get("r4") is not None
    clock.now += 597  # r2 was created 600 s ago now, r3 599 s ago
    assert store.get("r2") is None and store.get("r3") is not None
    clock.now += 10
    assert len(store) == 0


def test_slot_states() -> None:
    slot = KeptScores()
    assert slot.as_dict() == {"status": PENDING}
    slot.scored(scores([0.01, 2.0]))
    slot.end(FAILED)  # a final state stands
    assert slot.as_dict() == {
        "status": SCORED,
        "positions": 2,
        "first_position": 5,
        "kld": [0.01, 2.0],
        "same_top": [True, False],
    }
    failed = KeptScores()
    failed.end(DROPPED)
    failed.scored(scores([0.1]))
    assert failed.as_dict() == {"status": DROPPED}


def test_header_parsing() -> None:
    assert parse_token_scores_header(None) is False
    assert parse_token_scores_header(" Keep ") is True
    with pytest.raises(ValueError, match="X-KVProxy-Token-Scores"):
        parse_token_scores_header("yes")


class Scorer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def score(self, job: ShadowJob) -> PositionScores:
        if self.fail:
            raise RuntimeError("injected")
        return scores([0.02] * len(job.token_ids))


def test_the_shadow_pool_reports_into_the_claimed_slot_only() -> None:
    async def run(fail: bool) -> tuple[KeptScores, KeptScores, KeptScores]:
        pool = ShadowPool(Scorer(fail), QualityTracker(), queue_size=1)
        slot, dropped = KeptScores(), KeptScores()
        ask = ShadowAsk("force", slot)
        ticket = pool.ticket(ask)
        assert ticket is not None and ticket.keep is slot
        assert ask.claim() is None  # a second ticket (a guard's probe) finds it taken
        other = pool.ticket(ask.forced())
        assert other is not None and other.keep is None
        assert pool.ticket(ShadowAsk("force")).keep is None  # type: ignore[union-attr]  # no slot asked
        ticket.submit(ShadowJob((1, 2), (3, 4, 5)))
        full = pool.ticket(ShadowAsk("force", dropped))
        assert full is not None
        full.submit(ShadowJob((1,), (2,)))  # the queue holds one job: dropped
        abandoned = KeptScores()
        left = pool.ticket(ShadowAsk("force", abandoned))
        assert left is not None
        left.abandon()
        pool.start()
        await pool.drain()
        await pool.stop()
        return slot, dropped, abandoned

    slot, dropped, abandoned = asyncio.run(run(fail=False))
    assert slot.state == SCORED and slot.kld == [0.02] * 3
    assert dropped.state == DROPPED and abandoned.state == DROPPED
    slot, _, _ = asyncio.run(run(fail=True))
    assert slot.state == FAILED and slot.kld == []


# ---- the status additions ---------------------------------------------------------------------


def test_histogram_adds_up_to_the_tokens() -> None:
    t = QualityTracker()
    t.add(scores([0.0, 1e-9, 1e-5, 0.003, 0.02, 0.5, 3.0, 250.0]))
    h = t.histogram()
    assert len(h["edges"]) == 29 and len(h["counts"]) == 28  # type: ignore[arg-type]
    assert h["underflow"] == 2 and h["overflow"] == 1
    assert sum(h["counts"]) + h["underflow"] + h["overflow"] == h["tokens"] == 8  # type: ignore[arg-type,operator]
    edges = h["edges"]
    assert edges[0] == pytest.approx(1e-7) and edges[-1] == pytest.approx(100)  # type: ignore[index]


def test_history_is_bounded_and_coalesces() -> None:
    clock = Clock()
    history = KLDHistory(capacity=5, min_interval=2.0, clock=clock)
    t = QualityTracker()
    for i in range(12):
        t.add(scores([0.01 * (i + 1)]))
        history.record(t)
        clock.now += 1.0
    points = history.as_list()
    assert len(points) == 5  # 12 jobs a second apart: 6 points of 2 s, the oldest gone
    assert [p["time"] for p in points] == [1002.0, 1004.0, 1006.0, 1008.0, 1010.0]
    assert points[-1]["tokens"] == 12 and points[-1]["mean"] == pytest.approx(0.065)


def test_history_computes_the_window_once_per_interval_not_per_job() -> None:
    """The window's p99 costs ~0.35 ms on the event loop: once per interval and per read, not per job."""

    class Counting(QualityTracker):
        calls = 0

        def recent(self) -> Any:
            Counting.calls += 1
            return super().recent()

    clock = Clock()
    history = KLDHistory(capacity=5, min_interval=2.0, clock=clock)
    t = Counting()
    for i in range(100):  # 100 jobs in one second
        t.add(scores([0.01 * (i + 1)]))
        history.record(t)
        clock.now += 0.01
    assert Counting.calls == 1
    points = history.as_list()
    assert Counting.calls == 2 and len(points) == 1
    assert points[0]["tokens"] == 100 and points[0]["mean"] == pytest.approx(0.505)  # brought up to date
    history.as_list()
    assert Counting.calls == 2  # nothing new: nothing recomputed


@pytest.fixture(scope="module")
def unloaded_app(gemma_path: Path) -> Iterator[TestClient]:
    """The app around an embedded deployment that is never loaded (no lifespan): the routes only."""
    settings = Settings(ctx_size=1024)
    app = create_app(embedded_deployment(settings, read_model_info(gemma_path)))
    yield TestClient(app)


def test_root_redirects_and_the_page_is_served(unloaded_app: TestClient) -> None:
    r = unloaded_app.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    page = unloaded_app.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    paths = unloaded_app.get("/openapi.json").json()["paths"]
    assert "/ui" not in paths and "/" not in paths


def test_the_page_is_small_and_fetches_nothing_from_other_hosts() -> None:
    html = page_html().decode()
    assert len(page_html()) < 40_000
    refs = re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)["']""", html)
    assert refs and all(not re.match(r"(?i)([a-z]+:)?//", r) for r in refs), refs
    assert "@import" not in html and "url(" not in html
    # the only absolute URL is SVG's namespace name, which is never fetched
    assert set(re.findall(r"https?://[^\s\"'`]+", html)) == {"http://www.w3.org/2000/svg"}
    fetched = re.findall(r"""(?:fetch|api)\(\s*["'`]([^"'`]+)""", html)
    assert fetched and all(f.startswith("/") for f in fetched), fetched


def test_status_additions_before_traffic(unloaded_app: TestClient, gemma_path: Path) -> None:
    st = unloaded_app.get("/kvproxy/v1/status").json()
    assert st["gpu"] is None  # no NVML on this machine
    d = st["deployments"][0]
    info = read_model_info(gemma_path)
    from kvproxy.config import KVCacheType

    q4, f16 = KVCacheType.Q4_0, KVCacheType.F16
    m = d["memory"]
    assert (m["cache_type_k"], m["cache_type_v"], m["n_ctx"]) == ("q4_0", "q4_0", 1024)
    assert m["allocated_bytes"] == kv_cache_allocated_bytes(info.attention, q4, q4, 1024)
    assert m["f16_allocated_bytes"] == kv_cache_allocated_bytes(info.attention, f16, f16, 1024)
    assert m["saved_fraction"] == pytest.approx(1 - m["allocated_bytes"] / m["f16_allocated_bytes"])
    assert 0.6 < m["saved_fraction"] < 0.8  # q4_0: 4.5 bits a value instead of 16
    assert d["history"] == []
    assert d["histogram"]["tokens"] == 0 and sum(d["histogram"]["counts"]) == 0
    assert d["shadow"]["coverage"] == {"requests": 0, "sampled_fraction": None, "scored_fraction": None}
    capacity = d["shadow"]["capacity"]  # nothing generated or scored yet: no rate to show
    assert capacity["sustainable_rate"] is None and capacity["load_source"] == "none"
    # the served-row capture is on by default (decode path) and holds nothing yet
    assert d["shadow"]["capture"] == {
        "limit_bytes": 1024 << 20,
        "held_bytes": 0,
        "idle_bytes": 0,
        "captured_jobs": 0,
        "fallback_jobs": 0,
        "fresh_blocks": 0,
    }


def test_unknown_scores_are_a_404_in_openai_format(unloaded_app: TestClient) -> None:
    r = unloaded_app.get("/kvproxy/v1/scores/chatcmpl-nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["type"] == "invalid_request_error"
    model = unloaded_app.get("/v1/models").json()["data"][0]["id"]
    bad = unloaded_app.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-KVProxy-Token-Scores": "please"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-KVProxy-Token-Scores"


def kept(http: httpx.Client, response_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        r = http.get(f"/kvproxy/v1/scores/{response_id}")
        assert r.status_code in (200, 202), r.text
        return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]

    return wait_for(check, 60, "the kept scores")  # type: ignore[no-any-return]


def test_kept_scores_over_http(server: RunningServer) -> None:
    """Only opted-in responses are kept; the positions are the logprobs entries, plus the
    end-of-generation token when the answer stopped by itself."""
    keep = {**FORCE, "X-KVProxy-Token-Scores": "keep"}
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
    }
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        r = http.post("/v1/chat/completions", headers=keep, json=body).json()
        got = kept(http, r["id"])
        entries = r["choices"][0]["logprobs"]["content"]
        # an end-of-generation token (finish_reason "stop" without a stop sequence) is scored but
        # has no logprobs entry
        eog = 1 if r["choices"][0]["finish_reason"] == "stop" else 0
        assert got["status"] == "scored" and got["positions"] == len(got["kld"]) == len(entries) + eog
        assert (
            len(got["same_top"]) == len(got["kld"]) and got["first_position"] == r["usage"]["prompt_tokens"]
        )
        assert set(got) == {
            "id",
            "request_id",
            "status",
            "positions",
            "first_position",
            "kld",
            "same_top",
        }  # no text

        with http.stream("POST", "/v1/chat/completions", headers=keep, json={**body, "stream": True}) as s:
            lines = list(s.iter_lines())
        first = next(line for line in lines if line.startswith("data: {"))
        assert kept(http, json.loads(first[6:])["id"])["status"] == "scored"

        skipped = http.post(
            "/v1/chat/completions", headers={**keep, "X-KVProxy-Shadow": "skip"}, json=body
        ).json()
        assert http.get(f"/kvproxy/v1/scores/{skipped['id']}").json()["status"] == NOT_SAMPLED
        plain = http.post("/v1/chat/completions", headers=FORCE, json=body).json()
        assert http.get(f"/kvproxy/v1/scores/{plain['id']}").status_code == 404  # nothing kept


# ---- the page in real headless Chromium against a real kvproxy ---------------------------------


def fmt_kld(x: float) -> str:
    if x == 0:
        return "0"
    d = min(8, max(0, 2 - math.floor(math.log10(abs(x)))))
    return f"{x:.{d}f}"


def fmt_num(x: float) -> str:
    s = repr(math.floor(x * 1000 + 0.5) / 1000)
    return s[:-2] if s.endswith(".0") else s


PCT = {
    "memory.saved_fraction",
    "kld.since_start.same_top",
    "kld.since_start.same_top_error",
    "shadow.coverage.scored_fraction",
    "shadow.capacity.sustainable_rate",
}
MIB = {"memory.allocated_bytes", "memory.f16_allocated_bytes"}
INT = {"memory.n_ctx", "memory.bytes_per_token", "kld.since_start.tokens"}
NUM = {"shadow.last_lag_seconds", "drift.statistic", "shadow.capacity.generated_tokens_per_second"}
MS = {"shadow.capacity.scoring_seconds_per_token"}


def page_format(field: str, v: Any) -> str:
    """How the page formats a status value (mirrors fmt() in kvproxy/static/ui.html)."""
    if field == "guard.serving" and v is None:
        return "no guard"
    if v is None:
        return "\u2013"  # an en dash
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if field in PCT:
        return f"{v * 100:.1f}%"
    if field in MIB:
        return f"{v / 2**20:.1f} MiB"
    if field in MS:
        return f"{v * 1000:.2f} ms"
    if field in INT:
        return f"{round(v):,}"
    if field in NUM:
        return fmt_num(v)
    if field.startswith("kld."):
        return fmt_kld(v)
    return f"{round(v):,}" if float(v).is_integer() else fmt_num(v)


def pick(obj: Any, path: str) -> Any:
    for key in path.split("."):
        if obj is None:
            return None
        obj = obj.get(key)
    return obj


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not Path("/usr/bin/chromium").exists() or not Path("/usr/bin/chromedriver").exists():
        why = "Debian's chromium and chromium-driver are needed (scripts/install-system-deps.sh)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs them: never let the browser tests skip there
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.TemporaryDirectory(prefix="kvproxy-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1366,768",
        f"--user-data-dir={profile.name}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


def wait_for(predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)  # scoring runs at SCHED_IDLE: fast polls slow it (tests/conftest.py wait_for)


def quiet_status(http: httpx.Client) -> dict[str, Any]:
    """The status once every sampled job has ended (nothing queued or in flight)."""

    def check() -> dict[str, Any] | None:
        st: dict[str, Any] = http.get("/kvproxy/v1/status").json()
        s = st["deployments"][0]["shadow"]
        done = s["queued"] == 0 and s["in_flight"] == 0
        return st if done and s["sampled"] == s["scored"] + s["failed"] + s["dropped"] else None

    return wait_for(check, 120, "the shadow queue to drain")  # type: ignore[no-any-return]


def test_the_page_in_chromium(server: RunningServer, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for i, topic in enumerate(("the sea", "a mountain", "bread", "a clock")):
            r = http.post(
                "/v1/chat/completions",
                headers=FORCE,
                json={
                    "model": server.model,
                    "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
                    "max_tokens": 16 + 4 * i,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200
        before = quiet_status(http)
        assert before["deployments"][0]["shadow"]["scored"] >= 4

        assert f"  page       {server.base_url}/ui (live quality)\n" in server.output  # the banner
        browser.get(server.base_url + "/")  # redirected to /ui
        assert browser.current_url.endswith("/ui")
        wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed"))
        st = http.get("/kvproxy/v1/status").json()
        d = st["deployments"][0]
        assert st == before or d["shadow"] == before["deployments"][0]["shadow"]
        section = browser.find_element(By.CSS_SELECTOR, f'section.dep[data-deployment="{d["name"]}"]')
        # a poll after the test's own status read: every number equals the endpoint's
        mark = browser.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed")
        wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed") != mark)
        fields = section.find_elements(By.CSS_SELECTOR, "[data-field]")
        assert len(fields) >= 30
        for el in fields:
            field = el.get_attribute("data-field")
            expected = pick(d, field)
            assert json.loads(el.get_attribute("data-value")) == expected, field
            assert el.text == page_format(field, expected), (field, el.text, expected)
        if read_gpus() is None:  # this host's state, whatever it is, is what the page shows
            assert browser.find_element(By.CSS_SELECTOR, '[data-field="gpu"]').text == "no GPU"

        timechart = section.find_element(By.CSS_SELECTOR, "svg.timechart")
        assert int(timechart.get_attribute("data-points")) == len(d["history"]) > 0
        vertices = [
            len(p.get_attribute("points").split()) for p in timechart.find_elements(By.TAG_NAME, "polyline")
        ]
        assert len(vertices) == 2 and all(v == len(d["history"]) for v in vertices)
        hist = section.find_element(By.CSS_SELECTOR, "svg.histchart")
        bars = hist.find_elements(By.CSS_SELECTOR, "rect.bar")
        h = d["histogram"]
        assert sum(int(b.get_attribute("data-count")) for b in bars) == h["tokens"] > 0
        assert int(hist.get_attribute("data-bars")) == sum(
            1 for c in [h["underflow"], *h["counts"], h["overflow"]] if c
        )
        browser.save_screenshot(str(ARTIFACTS / "ui-after-traffic.png"))

        # the chat box: a coloured answer whose per-token KLD is the scores endpoint's
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Name three colours of the rainbow.")
        maxtok = browser.find_element(By.ID, "maxtok")
        maxtok.clear()
        maxtok.send_keys("24")
        browser.find_element(By.ID, "send").click()
        answer = browser.find_element(By.ID, "answer")
        state = wait_for(
            lambda: (
                answer.get_attribute("data-state") not in ("empty", "waiting", "scoring")
                and answer.get_attribute("data-state")
            ),
            90,
            "the chat answer to be scored",
        )
        assert state == "scored", browser.find_element(By.ID, "chatstatus").text
        kept = http.get(f"/kvproxy/v1/scores/{answer.get_attribute('data-id')}")
        assert kept.status_code == 200 and kept.json()["status"] == "scored"
        kld = kept.json()["kld"]
        spans = answer.find_elements(By.CSS_SELECTOR, "span.tok")
        assert len(spans) == len(kld) >= 1  # the last one is end-of-generation when it stopped
        for span, k in zip(spans, kld, strict=True):
            assert json.loads(span.get_attribute("data-kld")) == k
            assert span.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)")
            assert fmt_kld(k) in span.get_attribute("title")
        text = "".join(s.text for s in spans if "eog" not in (s.get_attribute("class") or ""))
        assert text.strip()
        browser.execute_script("document.getElementById('chat').scrollIntoView()")
        browser.save_screenshot(str(ARTIFACTS / "ui-chat-answer.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # no script error, no blocked (CSP) or failed request


async def no_lifespan(receive: Any, send: Any) -> None:
    """Answer uvicorn's lifespan without starting the app's: the deployment stays unloaded."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def test_a_401_asks_for_tokens_and_sends_them(unloaded_app: TestClient, browser: Any) -> None:
    """The page's side of access control (kvproxy.http.access on main: an API key for /v1/*, the admin
    token for /kvproxy/*): on a 401 it shows the field for that kind, keeps what is typed in
    sessionStorage and sends it as a bearer token on that kind's routes only."""
    from selenium.webdriver.common.by import By

    seen: dict[str, set[str]] = {"/v1/": set(), "/kvproxy/": set()}

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await no_lifespan(receive, send)
            return
        prefix = next((p for p in seen if scope.get("path", "").startswith(p)), None)
        if scope["type"] == "http" and prefix is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            seen[prefix].add(auth)
            if auth != {"/v1/": "Bearer key-1", "/kvproxy/": "Bearer admin-1"}[prefix]:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"{}"})
                return
        await unloaded_app.app(scope, receive, send)  # type: ignore[operator]

    with serve_in_thread(guarded) as url:
        browser.get(url + "/ui")
        bar = browser.find_element(By.ID, "tokenbar")
        admin, key = browser.find_element(By.ID, "admintoken"), browser.find_element(By.ID, "apikey")
        wait_for(lambda: admin.is_displayed() and key.is_displayed(), 20, "both token fields")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "ui-token-prompt.png"))
        admin.send_keys("admin-1")
        key.send_keys("key-1")
        browser.find_element(By.ID, "tokensave").click()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "section.dep"), 20, "the status")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), 20, "the models")
        assert not bar.is_displayed()
        assert seen == {"/v1/": {"", "Bearer key-1"}, "/kvproxy/": {"", "Bearer admin-1"}}
        stored = [f"return sessionStorage.getItem('kvproxy-{k}')" for k in ("admin-token", "api-key")]
        assert [browser.execute_script(s) for s in stored] == ["admin-1", "key-1"]


def test_states_this_machine_cannot_reach(unloaded_app: TestClient, browser: Any) -> None:
    """A GPU, a guard serving the fallback in drift, and a llama-server deployment (no memory
    figures), from a status shaped by the real one: the page shows each of them."""
    from selenium.webdriver.common.by import By

    real = unloaded_app.get("/kvproxy/v1/status").json()
    embedded = real["deployments"][0]
    drifting = {
        **embedded,
        "drift": {**embedded["drift"], "state": "drift", "statistic": 12.5},
        "guard": {"serving": "fallback", "switches": {"to_fallback": 2, "to_primary": 1}},
    }
    relay = {
        **embedded,
        "name": "relayed",
        "memory": {**dict.fromkeys(embedded["memory"]), "cache_type_k": "q8_0", "cache_type_v": "q8_0"},
    }
    gpu = [
        {
            "index": 0,
            "name": "H200",
            "used_bytes": 30 * 2**30,
            "total_bytes": 140 * 2**30,
            "process_bytes": 3 * 2**30,
        }
    ]
    canned = json.dumps({"deployments": [drifting, relay], "gpu": gpu}).encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await no_lifespan(receive, send)
            return
        if scope["path"] == "/kvproxy/v1/status":
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": canned})
            return
        await unloaded_app.app(scope, receive, send)  # type: ignore[operator]

    ARTIFACTS.mkdir(exist_ok=True)
    with serve_in_thread(app) as url:
        browser.get(url + "/ui")
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "section.dep")) == 2, 20, "sections")
        assert (
            browser.find_element(By.CSS_SELECTOR, '[data-field="gpu"]').text
            == "30.0 / 140.0 GiB (kvproxy 3.0)"
        )
        first, second = browser.find_elements(By.CSS_SELECTOR, "section.dep")
        drift = first.find_element(By.CSS_SELECTOR, '[data-field="drift.state"]')
        assert drift.text == "drift" and "state-drift" in drift.get_attribute("class")
        serving = first.find_element(By.CSS_SELECTOR, '[data-field="guard.serving"]')
        assert serving.text == "fallback" and "state-drift" in serving.get_attribute("class")
        assert first.find_element(By.CSS_SELECTOR, '[data-field="guard.switches.to_fallback"]').text == "2"
        assert first.find_element(By.CSS_SELECTOR, ".mem").is_displayed()
        assert not second.find_element(By.CSS_SELECTOR, ".mem").is_displayed()
        assert second.find_element(By.CSS_SELECTOR, '[data-field="memory.cache_type_k"]').text == "q8_0"
        assert first.find_element(By.CSS_SELECTOR, "svg.timechart").get_attribute("data-points") == "0"
        browser.save_screenshot(str(ARTIFACTS / "ui-states.png"))


def test_kept_scores_belong_to_the_key_that_asked() -> None:
    """Issue 20, finding 10: another key could read a kept entry given its id, and 64 cheap keeps
    from another key evicted it. Each owner has its own quota now."""
    store = TokenScoreStore(capacity=3, ttl=600, clock=Clock())
    owner, other = b"a" * 32, b"b" * 32
    mine = store.new_slot()
    store.put("r-mine", mine, owner)
    for i in range(100):
        store.put(f"r{i}", store.new_slot(), other)
    store.put("r-mine", store.new_slot(), other)  # the same id under another key replaces nothing
    assert store.get("r-mine", owner) is mine
    assert store.get("r-mine", other) is not mine and store.get("r-mine") is None
    assert store.get("r99", owner) is None and store.get("r99", other) is not None
    assert len(store) == 1 + 3


def test_a_page_on_another_origin_calls_the_api(browser: Any) -> None:
    """CORS in a real browser (issue 19): a page served from another origin calls kvproxy's serving
    routes with an API key (Chromium sends the preflight), reads an error too, and cannot read the
    admin routes, which CORS never opens."""
    from tests.stub_backend import StubBackend
    from tests.test_api_fast import stub_deployment

    async def page(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await no_lifespan(receive, send)
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]}
        )
        await send(
            {"type": "http.response.body", "body": b"<!doctype html><title>elsewhere</title><p>app</p>"}
        )

    script = """
    const [base, done] = arguments;
    (async () => {
      const key = {"Authorization": "Bearer key-1", "Content-Type": "application/json"};
      const out = {};
      let r = await fetch(base + "/v1/chat/completions", {method: "POST", headers: key,
        body: JSON.stringify({model: "stub", messages: [{role: "user", content: "Hi"}], max_tokens: 2})});
      out.chat = [r.status, (await r.json()).choices[0].message.content];
      r = await fetch(base + "/responses", {method: "POST", headers: key,
        body: JSON.stringify({model: "stub", input: "Hi", stream: true})});
      out.responses = [r.status, (await r.text()).includes("event: response.incomplete")];
      r = await fetch(base + "/v1/models", {headers: {"Authorization": "Bearer wrong"}});
      out.unauthorized = [r.status, (await r.json()).error.code];
      for (const path of ["/kvproxy/v1/status", "/metrics"]) {
        try { await fetch(base + path); out[path] = "readable"; } catch (e) { out[path] = "blocked"; }
      }
      return out;
    })().then(done, (e) => done("failed: " + e));
    """
    with serve_in_thread(page) as page_url:
        app = create_app(stub_deployment(StubBackend()), api_keys=["key-1"], cors_origins=[page_url])
        with serve_in_thread(app) as api_url:
            browser.get(page_url + "/")
            assert browser.title == "elsewhere"
            got = browser.execute_async_script(script, api_url)
    assert got == {
        "chat": [200, "ab"],
        "responses": [200, True],
        "unauthorized": [401, "invalid_api_key"],
        "/kvproxy/v1/status": "blocked",
        "/metrics": "blocked",
    }, got

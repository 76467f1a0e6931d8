"""The proxy shows its scoring server's live what-if (issue 27 part 3, proxy mode).

A proxy in front of a real llama-server primary (q8_0) scores on a real ``kvproxy backend -ctk q8_0
-ctv q8_0 --what-if q4_0``: its own status and what-if routes, and its page, carry the backend's
what-if (with where and when it was read), and its /metrics do not repeat the backend's gauges. A
fake scoring server (tests/fault_servers.py) is a second deployment's reference, only to answer its
what-if with garbage, an oversized body, slowly or with a refusal: the proxy's status keeps working,
with ``what_if`` null and a reason. The reading's validation is checked in process too (fast).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from kvproxy.calibrate import parse_config
from kvproxy.kld import PositionScores
from kvproxy.scoring.whatif_client import MAX_BODY_BYTES, MAX_CONFIGS, TIMEOUT_SECONDS, parse_what_if
from kvproxy.shadow.whatif import ConfigCost, WhatIfTracker
from tests.conftest import RunningServer, start_server, stop_server
from tests.fault_servers import LlamaFake, llama_fake
from tests.llama_servers import start_llama_server
from tests.test_ui import (
    browser,  # noqa: F401 - the Chromium fixture
    wait_for,
)

SHADOW = {"X-KVProxy-Shadow": "force"}
PROMPTS = ("Name three rivers of Europe.", "What is a KV cache?")


# ---- the reading, in process: what passes and what is dropped ----------------------------------


def tracker_status(scored: bool = True) -> dict[str, Any]:
    """A what-if as a real tracker writes it (served q8_0, candidate q4_0, reference f16)."""

    def cost(spec: str, role: str, size: int) -> ConfigCost:
        return ConfigCost(parse_config(spec), role, size, size * 1024)

    t = WhatIfTracker(
        cost("q8_0", "served", 9792), [cost("q4_0", "candidate", 5184)], cost("f16", "reference", 18432),
        budget=0.05, rate=1.0, n_ctx=1024,
    )  # fmt: skip
    if scored:
        n = 6
        rng = np.random.default_rng(0)

        def scores(scale: float) -> PositionScores:
            kld = rng.exponential(scale, n)
            return PositionScores(kld, kld < scale, np.full(n, 0.5), np.full(n, 0.49))

        t.add(scores(0.008), [scores(0.1)])
    status: dict[str, Any] = orjson.loads(orjson.dumps(t.status()))  # as the route sends it
    return status


def answer(status: dict[str, Any] | None, name: str = "m") -> bytes:
    return orjson.dumps({"deployments": [{"name": name, "what_if": status}]})


@pytest.mark.fast
def test_a_trackers_what_if_reads_back_unchanged_with_its_source() -> None:
    for scored in (True, False):  # before the first job, means are null
        status = tracker_status(scored)
        reading = parse_what_if(answer(status), "m", "http://scorer:8090", 1700000000.5)
        assert reading.reason is None
        assert reading.what_if == {**status, "source": {"url": "http://scorer:8090", "read_at": 1700000000.5}}
    # the server's own name for its deployment picks among several; one deployment answers for any
    two = orjson.dumps(
        {"deployments": [{"name": "a", "what_if": None}, {"name": "b", "what_if": tracker_status()}]}
    )
    assert parse_what_if(two, "b", "u", 0).what_if is not None
    assert "runs no what-if" in str(parse_what_if(two, "a", "u", 0).reason)
    assert "has no deployment 'c'" in str(parse_what_if(two, "c", "u", 0).reason)
    assert parse_what_if(answer(tracker_status(), "other"), "m", "u", 0).what_if is not None
    # a newer server's extra fields are left out, the rest passes
    newer = {**tracker_status(), "future_field": [1, 2]}
    assert "future_field" not in (parse_what_if(answer(newer), "m", "u", 0).what_if or {})


def _broken(change: Any) -> bytes:
    status = tracker_status()
    change(status)
    return answer(status)


def _setitem(path: tuple[Any, ...], value: Any) -> Any:
    def change(obj: Any) -> None:
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return change


UNTRUSTED = {
    "not json": b"this is { not json",
    "not an object": b"[1, 2, 3]",
    "not utf-8": b'{"deployments": "\xff\xfe"}',
    "markup for a label": _broken(_setitem(("configs", 1, "config"), "<img src=x onerror=alert(1)>")),
    "a label that is another config": _broken(_setitem(("configs", 1, "config"), "q8_0")),
    "an unknown cache type": _broken(_setitem(("configs", 1, "cache_type_k"), "q3_k")),
    "a served config not listed": _broken(_setitem(("served",), "q5_1")),
    "a budget pick not listed": _broken(_setitem(("within_budget",), "iq4_nl")),
    "two served configs": _broken(_setitem(("configs", 1, "role"), "served")),
    "a negative count": _broken(_setitem(("jobs", "scored"), -1)),
    "a rate over 1": _broken(_setitem(("rate",), 7)),
    "a string for a figure": _broken(_setitem(("configs", 0, "kld", "mean"), "low")),
    "too many configs": _broken(
        lambda s: s["configs"].extend(dict(s["configs"][1]) for _ in range(MAX_CONFIGS))
    ),
    "NaN for a figure": answer(tracker_status()).replace(b'"mean":0.0,', b'"mean":NaN,', 1),
}


@pytest.mark.fast
@pytest.mark.parametrize("case", list(UNTRUSTED))
def test_an_untrusted_what_if_is_dropped_with_a_reason(case: str) -> None:
    reading = parse_what_if(UNTRUSTED[case], "m", "http://scorer:8090", 0)
    assert reading.what_if is None
    assert reading.reason is not None and reading.reason.startswith(
        "the scoring server http://scorer:8090 answered a what-if that is not valid"
    ), reading.reason
    assert "onerror" not in reading.reason  # where and what was wrong, never the value


# ---- a real proxy, a real scoring server, and a faulty one ----------------------------------------


@dataclass
class Stack:
    proxy: RunningServer
    backend: RunningServer
    fake: LlamaFake


@pytest.fixture(scope="module")
def stack(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("whatif-proxy")
    with contextlib.ExitStack() as stop:
        primary = start_llama_server(gemma_path, tmp, "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")
        stop.callback(primary.kill)
        backend = start_server(
            *("-ctk", "q8_0", "-ctv", "q8_0", "--ctx-size", "1024", "-t", "1", "--what-if", "q4_0"),
            command="backend",
        )
        stop.callback(stop_server, backend)
        fake = stop.enter_context(llama_fake(score_route=True, delay=30))  # slow: past the 2 s timeout
        kv = 'cache_type_k = "q8_0", cache_type_v = "q8_0"'
        config = tmp / "deployments.toml"
        config.write_text(f"""
[[deployments]]
model = "live"
shadow_rate = 0
health_interval = 0.5
primary = {{ urls = ["{primary.url}"], {kv} }}
reference = {{ urls = ["{backend.base_url}"] }}

[[deployments]]
model = "faulty"
shadow_rate = 0
health_interval = 0.3
primary = {{ urls = ["{primary.url}"], {kv} }}
reference = {{ urls = ["{fake.url}"] }}

[[deployments]]
model = "plain"
shadow_rate = 0
primary = {{ urls = ["{primary.url}"], {kv} }}
reference = {{ urls = ["{primary.url}"] }}
""")
        proxy = start_server("--config", str(config))
        stop.callback(stop_server, proxy)
        yield Stack(proxy, backend, fake)


def statuses(base_url: str) -> dict[str, dict[str, Any]]:
    doc = httpx.get(f"{base_url}/kvproxy/v1/status", timeout=30).json()
    return {d["name"]: d for d in doc["deployments"]}


@pytest.fixture(scope="module")
def scored(stack: Stack) -> dict[str, Any]:
    """Two chats through the proxy, shadowed (forced) and so scored and replayed by the backend; the
    proxy's what-if once it shows both jobs."""
    with httpx.Client(base_url=stack.proxy.base_url, timeout=300, headers=SHADOW) as http:
        for i, prompt in enumerate(PROMPTS):
            body = {"model": "live", "messages": [{"role": "user", "content": prompt}]}
            r = http.post("/v1/chat/completions", json={**body, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            done = i + 1  # one at a time: with a score request waiting the what-if gives way (shed)

            def shown() -> dict[str, Any] | None:
                w = statuses(stack.proxy.base_url)["live"]["what_if"]
                return w if w is not None and w["jobs"]["scored"] == done else None  # noqa: B023

            w: dict[str, Any] = wait_for(shown, 300, "the proxy's what-if to count the job")
    return w


def test_the_proxy_shows_its_scoring_servers_what_if(stack: Stack, scored: dict[str, Any]) -> None:
    proxy, backend, w = stack.proxy, stack.backend, scored
    live = statuses(proxy.base_url)["live"]
    assert live["what_if_reason"] is None and live["estimator"] == "exact"
    assert live["shadow"]["scored"] == 2
    rows = {row["config"]: row for row in w["configs"]}
    print(  # exact, full-vocabulary KLD on the decode path (the scoring server's replay)
        "proxy's what-if:",
        {c: f"{r['kld']['mean']:.4f} ± {r['kld']['mean_error']:.4f}" for c, r in rows.items()},
        f"{w['scored_tokens']} tokens, within budget: {w['within_budget']}",
    )
    assert {c: r["role"] for c, r in rows.items()} == {
        "q8_0": "served",
        "q4_0": "candidate",
        "f16": "reference",
    }
    assert w["served"] == "q8_0" and w["reference"] == "f16"
    assert w["scored_tokens"] > 0 and w["jobs"] == {"scored": 2, "failed": 0, "shed": 0, "not_sampled": 0}
    assert all(rows[c]["kld"]["tokens"] == w["scored_tokens"] for c in ("q8_0", "q4_0"))
    assert rows["q8_0"]["kld"]["mean"] is not None and w["within_budget"] in rows
    assert w["source"]["url"] == backend.base_url
    read_at = live["what_if"]["source"]["read_at"]  # read again every health interval (0.5 s)
    assert time.time() - 10 <= read_at <= time.time()
    # the scoring server's own what-if, field for field, and the proxy's what-if route carries it too
    own = httpx.get(f"{backend.base_url}/kvproxy/v1/what-if", timeout=30).json()["deployments"][0]
    assert {k: v for k, v in w.items() if k != "source"} == own["what_if"]
    routes = httpx.get(f"{proxy.base_url}/kvproxy/v1/what-if", timeout=30).json()["deployments"]
    by_name = {d["name"]: d for d in routes}
    assert by_name["live"]["what_if"]["configs"] == w["configs"]
    assert by_name["live"]["what_if_reason"] is None
    assert by_name["plain"]["what_if"] is None and "plain llama-server" in by_name["plain"]["what_if_reason"]
    # the gauges are the scoring server's: the proxy does not export them again (double counting)
    assert "kvproxy_whatif_" in httpx.get(f"{backend.base_url}/metrics", timeout=30).text
    assert "kvproxy_whatif_" not in httpx.get(f"{proxy.base_url}/metrics", timeout=30).text


def test_the_page_draws_the_proxys_what_if(stack: Stack, scored: dict[str, Any], browser: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    base = stack.proxy.base_url
    w = statuses(base)["live"]["what_if"]
    browser.get(base + "/ui")
    live = 'section.dep[data-deployment="live"]'
    chart = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'{live} svg.whatifchart[data-points="3"]'),
        60,
        "the chart",
    )[0]
    dots = {c.get_attribute("data-config"): c for c in chart.find_elements(By.CSS_SELECTOR, "circle.wi")}
    assert set(dots) == {"q8_0", "q4_0", "f16"}
    assert "served" in str(dots["q8_0"].get_attribute("class"))
    for row in w["configs"]:
        assert dots[row["config"]].get_attribute("data-role") == row["role"]
        assert dots[row["config"]].get_attribute("data-pareto") == str(row["pareto"]).lower()
    pick = browser.find_element(By.CSS_SELECTOR, f"{live} .whatifpick")
    assert pick.get_attribute("data-config") == w["within_budget"]
    plain = browser.find_element(By.CSS_SELECTOR, 'section.dep[data-deployment="plain"] .whatif')
    assert not plain.is_displayed()  # no what-if there: no chart


def test_a_faulty_what_if_leaves_the_status_working_with_a_reason(stack: Stack) -> None:
    proxy, fake = stack.proxy, stack.fake

    def faulty() -> tuple[dict[str, Any] | None, str | None]:
        d = statuses(proxy.base_url)["faulty"]
        return d["what_if"], d["what_if_reason"]

    fake.what_if_fault, fake.what_if_body = None, answer(tracker_status())
    w = wait_for(lambda: faulty()[0], 30, "the fake's valid what-if")
    assert w["source"]["url"] == fake.url and w["served"] == "q8_0"

    def expect(reason: str) -> None:
        wait_for(lambda: reason in str(faulty()[1]), 30, reason)
        assert faulty()[0] is None

    fake.what_if_body = b"this is { not json"
    expect(f"the scoring server {fake.url} answered a what-if that is not valid")
    fake.what_if_body = _broken(_setitem(("configs", 1, "config"), "<script>x</script>"))
    expect("not valid (deployments.0.what_if.configs.1")
    fake.what_if_body = answer(None)
    expect("runs no what-if (start it with --what-if CONFIGS")
    fake.what_if_fault, fake.huge_sent, gets = "huge", 0, fake.what_if_gets
    expect(f"answered a what-if larger than {MAX_BODY_BYTES:,} bytes")
    per_get = fake.huge_sent / max(1, fake.what_if_gets - gets)
    assert per_get < 16 << 20, per_get  # of the 64 MiB offered: the cap, plus what the sockets hold
    fake.what_if_fault = "error401"
    expect("refused the proxy's key on its admin route /kvproxy/v1/what-if (HTTP 401)")
    fake.what_if_fault = "slow"
    expect(f"did not answer its what-if within {TIMEOUT_SECONDS:g} s")
    # the status route reads the last reading: it never waits for a slow scoring server
    for _ in range(3):
        t0 = time.monotonic()
        d = statuses(proxy.base_url)
        assert time.monotonic() - t0 < TIMEOUT_SECONDS
        assert d["faulty"]["what_if"] is None and d["faulty"]["ready"]
    routes = httpx.get(f"{proxy.base_url}/kvproxy/v1/what-if", timeout=30)
    assert routes.status_code == 200
    faulty_route = {x["name"]: x for x in routes.json()["deployments"]}["faulty"]
    assert faulty_route["what_if"] is None and "did not answer" in faulty_route["what_if_reason"]
    fake.what_if_fault = None  # it comes back once the scoring server answers again
    fake.what_if_body = answer(tracker_status())
    assert wait_for(lambda: faulty()[0], 30, "the what-if back")["source"]["url"] == fake.url

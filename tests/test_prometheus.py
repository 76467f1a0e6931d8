"""A real Prometheus server (Debian's package) scrapes a running kvproxy under shadowed traffic; the
expected series are then read back with PromQL through Prometheus's HTTP API."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvproxy.telemetry.gpu import read_gpus
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import free_port

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus")


@pytest.fixture(scope="module")
def kvproxy_server() -> Iterator[RunningServer]:
    # one what-if candidate, so the what-if panels have data (docs/what-if.md)
    srv = start_server("--ctx-size", "1024", "--shadow-rate", "1", "--what-if", "q8_0")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def prometheus(kvproxy_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prometheus")
    target = kvproxy_server.base_url.removeprefix("http://")
    config = tmp / "prometheus.yml"
    rules = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{rules}']\n"
        f"scrape_configs:\n  - job_name: kvproxy\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    data = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def scalar(prometheus: str, promql: str, until: Any = None, timeout: float = 90) -> float:
    """The query's single value, waiting until it is defined and, given ``until``, until it holds
    (a rate needs two scrapes after the change)."""
    deadline = time.monotonic() + timeout
    value = math.nan
    while True:
        result = query(prometheus, promql)
        if result:
            value = float(result[0]["value"][1])
            if not math.isnan(value) and (until is None or until(value)):
                return value
        assert time.monotonic() < deadline, f"{promql} stayed at {value}"
        time.sleep(0.5)


def test_promql_over_real_scrapes(kvproxy_server: RunningServer, prometheus: str) -> None:
    # Prometheus must have scraped the counters at 0 before the traffic, or their first sample is
    # already the final value and every rate() over them reads 0.
    assert scalar(prometheus, 'up{job="kvproxy"}', until=lambda v: v == 1) == 1
    assert scalar(prometheus, "sum(kvproxy_scored_tokens_total)") == 0
    with httpx.Client(base_url=kvproxy_server.base_url, timeout=120) as http:
        for i in range(6):
            r = http.post(
                "/v1/completions",
                json={
                    "model": kvproxy_server.model,
                    "max_tokens": 16,
                    "prompt": f"Chapter {i}. The history of the Roman Empire",
                },
            )
            assert r.status_code == 200
            time.sleep(0.5)
    assert scalar(prometheus, "sum(rate(kvproxy_scored_tokens_total[30s]))", until=lambda v: v > 0) > 0
    p90 = scalar(
        prometheus,
        "histogram_quantile(0.9, sum by (le) (rate(kvproxy_token_kld_bucket[30s])))",
        until=lambda v: v > 0,
    )
    assert 0 < p90 < 10
    same_top = scalar(prometheus, "sum(kvproxy_same_top_tokens_total) / sum(kvproxy_scored_tokens_total)")
    assert 0.5 < same_top <= 1
    ratio = scalar(prometheus, 'kvproxy_kv_cache_saving_ratio{role="primary"}')
    assert ratio == pytest.approx(3.5, rel=0.05)  # q4_0 K and V against f16: 18432 / 5184 bytes a token
    assert (
        scalar(
            prometheus,
            'sum(kvproxy_requests_total{route="/v1/completions",status="200"})',
            until=lambda v: v >= 6,
        )
        == 6
    )
    # what this host has: without a GPU said as 0, not as zero readings
    assert scalar(prometheus, "kvproxy_gpu_present") == (1 if read_gpus() else 0)
    assert scalar(prometheus, "process_resident_memory_bytes") > 100 * 2**20


def test_every_dashboard_query_and_the_recording_rules(
    kvproxy_server: RunningServer, prometheus: str
) -> None:
    """Runs after the traffic above: each panel's PromQL (template variables at "All") evaluates
    without error, and the quality and serving panels return data."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "grafana"))
    import dashboard

    board = dashboard.build()
    rows = {p["title"]: p for p in board["panels"] if p["type"] == "row"}
    assert len(rows) == 6
    # no GPU on this machine, and no guarded deployment in this test: no readings, by design
    empty_allowed = {"VRAM used / total", "Guard: on the fallback (1) and route switches"}
    for title, expr in dashboard.queries(board):
        promql = expr.replace("$deployment", ".*").replace("$model", ".*").replace("$__rate_interval", "1m")
        result = query(prometheus, promql)
        if title not in empty_allowed:
            assert result, f"panel {title!r} returned no data: {promql}"
    mean = scalar(prometheus, "kvproxy:token_kld_mean:rate10m", until=lambda v: v > 0)
    assert 0 < mean < 1
    assert scalar(prometheus, "kvproxy:kld_alert_threshold") == 0.05  # the default (not gemma-q4)
    # the what-if's served q4_0 and its q8_0 candidate, on the same jobs: q8_0 far below
    served = scalar(prometheus, 'kvproxy_whatif_mean_kld{role="served"}', until=lambda v: v > 0)
    q8 = scalar(prometheus, 'kvproxy_whatif_mean_kld{candidate="q8_0"}', until=lambda v: v > 0)
    assert q8 < served / 3
    assert scalar(prometheus, 'kvproxy_whatif_kv_bytes{candidate="q8_0"}') > scalar(
        prometheus, 'kvproxy_whatif_kv_bytes{role="served"}'
    )
    assert query(prometheus, 'ALERTS{alertname="KVProxyBackendDown"}') == []

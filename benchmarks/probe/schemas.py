"""Untrusted response-format schemas (issue 25), with a valid key: every adversarial schema of
tests/schema_cases.py, through chat completions and the Responses API, gets a 400 in OpenAI's shape
whose ``param`` names the schema, within 100 ms; ``/health`` (a fresh connection every 20 ms)
answers within 100 ms throughout; the server's RSS grows by less than 50 MiB; the process lives;
what it logs holds no schema content. The schemas OpenAI supports in strict mode, and those that
used to hang the converter, are served."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from benchmarks.probe.common import MARKER, Tally, Target, health_latency, openai_shaped, rss_mib
from tests.schema_cases import REFUSED, SERVED, SUPPORTED

CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"
PARAMS = {CHAT: "response_format.json_schema.schema", RESPONSES: "text.format.schema"}
FAST = 0.1
RSS_GROWTH_MIB = 50

# a grammar llama.cpp cannot parse (\d copied into GBNF), 300 rules long, the marker in every rule:
# llama.cpp wrote it to the log whole
UNPARSABLE = {
    "type": "object",
    "properties": {f"{MARKER}-{i}": {"type": "string", "pattern": "^\\d+$"} for i in range(300)},
    "required": [f"{MARKER}-{i}" for i in range(300)],
}


def _body(t: Target, path: str, schema: dict[str, Any], max_tokens: int = 4) -> dict[str, Any]:
    if path == CHAT:
        return {
            "model": t.model,
            "messages": [{"role": "user", "content": f"JSON please {MARKER}"}],
            "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}},
        }
    return {
        "model": t.model,
        "input": f"JSON please {MARKER}",
        "max_output_tokens": max_tokens,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": schema}},
    }


@contextlib.contextmanager
def _health(t: Target) -> Iterator[list[float]]:
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            status, seconds = health_latency(t.port, timeout=60)
            latencies.append(seconds if status == 200 else float("inf"))
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=70)


def _alive(t: Target) -> bool:
    return t.server is None or t.server.process.poll() is None


def run(t: Target, tally: Tally) -> None:
    tally.part = "schemas"
    headers = {"Authorization": f"Bearer {t.keys[0]}", "X-KVProxy-Shadow": "skip"}
    log_start = len(t.server.output) if t.server is not None else 0
    rss_before = rss_mib(t.pid) if t.pid is not None else 0.0
    cases = [(name, schema, bound) for name, schema, bound in REFUSED]
    cases.append(("a grammar llama.cpp cannot parse", UNPARSABLE, "llama.cpp"))
    with httpx.Client(base_url=t.base_url, timeout=30, headers=headers) as http, _health(t) as latencies:
        for name, schema, bound in cases:
            for path in (CHAT, RESPONSES):
                start = time.monotonic()
                try:
                    resp: httpx.Response | None = http.post(path, json=_body(t, path, schema))
                except httpx.HTTPError as exc:
                    resp, seen = None, f"no answer ({type(exc).__name__}); alive: {_alive(t)}"
                took = time.monotonic() - start
                if resp is not None:
                    err = resp.json().get("error", {}) if openai_shaped(resp) else {}
                    seen = f"{resp.status_code} in {took * 1000:.0f} ms {resp.text[:160]}"
                    ok = (
                        resp.status_code == 400
                        and err.get("param") == PARAMS[path]
                        and bound in str(err.get("message"))
                        and took < FAST
                    )
                else:
                    ok = False
                tally.check(f"{name} ({'chat' if path == CHAT else 'responses'})", ok, seen)
    worst = max(latencies, default=float("inf"))
    tally.check("/health within 100 ms throughout", worst < FAST, f"at most {worst * 1000:.0f} ms")
    seen = [f"{2 * len(cases)} refusals; /health at most {worst * 1000:.0f} ms over {len(latencies)} probes"]
    if t.pid is not None and _alive(t):
        growth = rss_mib(t.pid) - rss_before
        tally.check("RSS within 50 MiB", growth < RSS_GROWTH_MIB, f"{rss_before:.0f} MiB + {growth:.0f}")
        seen.append(f"RSS {rss_before:.0f} -> {rss_before + growth:.0f} MiB")
    if t.server is not None:
        time.sleep(0.5)
        logged = t.server.output[log_start:]
        leaked = [line for line in logged if MARKER in line]
        tally.check(
            "the log holds no schema",
            not leaked and len(logged) <= 2 * len(cases),
            f"{len(logged)} lines, {len(leaked)} with the marker",
        )
        seen.append(f"{len(logged)} log lines, {len(leaked)} with the marker")
    print(f"  schemas: {'; '.join(seen)}")
    with httpx.Client(base_url=t.base_url, timeout=120, headers=headers) as http:
        for name, schema in SUPPORTED + SERVED:
            try:
                resp = http.post(CHAT, json=_body(t, CHAT, schema, max_tokens=24))
                seen = f"{resp.status_code} {resp.text[:160]}"
                ok = resp.status_code == 200
            except httpx.HTTPError as exc:
                ok, seen = False, f"no answer ({type(exc).__name__})"
            tally.check(f"served: {name}", ok, seen)
    tally.check("the process lives", _alive(t), "exited" if not _alive(t) else "")

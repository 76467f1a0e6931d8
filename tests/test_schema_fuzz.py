"""Schemathesis against the proxy's own OpenAPI schema: at least 1,000 generated requests, no 5xx.

The server is the embedded default (q4_0 KV, shadow scoring on) serving tests/tiny_gemma3.py: the
bundled Gemma 3 270M's own tokenizer and chat template, so every generated body is tokenized and
rendered exactly as the real model's would be, with small random weights (what is fuzzed is the
request handling, not the model; the real weights cost 100-150 s of this run's 1,250 prefills and
decodes, the tiny ones a few). Generated
bodies are fuzzed everywhere except two places, so the run stays minutes, not hours: a valid
``max_tokens`` (or ``max_completion_tokens``) is capped at 1 and one is added where none was
generated (an invalid value is left as generated, to be refused), and nine requests in ten name
the served model (the tenth keeps its random name and must get a 404, not a 5xx). ``/v1/responses``
is fuzzed the same way, its limit being ``max_output_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import RunningServer, start_server, stop_server

MIN_CASES = 1000


@pytest.fixture(scope="module")
def fuzz_server(tiny_gemma_path: Path) -> Iterator[RunningServer]:
    srv = start_server("--model", str(tiny_gemma_path), "--ctx-size", "256", "--shadow-rate", "0.2")
    yield srv
    stop_server(srv)


# Upper bounds for hypothesis, which reaches nearly all of them (550/550/150 gave 1,254 cases in all):
# issue 9's 1,000 cases at least, most on the two richest bodies (chat and responses), in about
# two thirds of the time the former 550/550/450/150 took.
EXAMPLES = {
    "/v1/chat/completions": 470,
    "/v1/completions": 220,
    "/v1/responses": 360,
    "/kvproxy/v1/score": 100,
}
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _bounded(body: dict[str, Any], model: str, serial: int, path: str) -> None:
    keys = ("max_output_tokens",) if path == "/v1/responses" else ("max_tokens", "max_completion_tokens")
    limits = [k for k in keys if k in body]
    for key in limits:
        value = body[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            body[key] = 1
    if not limits:
        body[keys[0]] = 1
    if serial % 10:
        body["model"] = model


def test_no_generated_request_is_a_server_error(fuzz_server: RunningServer) -> None:
    api = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    cases: dict[str, int] = {}
    statuses: dict[int, int] = {}

    def check(case: Any) -> None:
        key = f"{case.method} {case.path}"
        cases[key] = cases.get(key, 0) + 1
        if isinstance(case.body, dict) and case.path in GENERATION:
            _bounded(case.body, fuzz_server.model, cases[key], case.path)
        response = case.call(timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400:  # every refusal in OpenAI's shape
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text

    for result in api.get_all_operations():
        operation = result.ok()
        run = settings(
            max_examples=EXAMPLES.get(operation.path, 20),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )(given(case=operation.as_strategy())(check))
        run()
    total = sum(cases.values())
    print(f"schemathesis: {total} cases, by operation {cases}, by status {dict(sorted(statuses.items()))}")
    assert total >= MIN_CASES, cases
    assert cases.get("POST /v1/chat/completions", 0) >= 400
    assert cases.get("POST /v1/responses", 0) >= 300
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # both accepted and refused bodies
    assert httpx.get(f"{fuzz_server.base_url}/health", timeout=10).status_code == 200  # still serving

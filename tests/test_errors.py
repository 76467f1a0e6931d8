"""Every refusal has OpenAI's error shape and the right status, from a real running server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer
from tests.error_cases import (
    MSG,
    SCHEMA_VIOLATIONS,
    UNHONOURED,
)


def assert_openai_error(
    resp: httpx.Response,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    contains: str = "",
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else err["type"])
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert contains in err["message"]
    return err


def chat(http: httpx.Client, server: RunningServer, **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, **body})


def test_unknown_model_is_404(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={"model": "gpt-5", "messages": MSG})
    assert_openai_error(resp, 404, param="model", code="model_not_found", contains="gpt-5")
    resp = http.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"})
    assert_openai_error(resp, 404, param="model", code="model_not_found")


def test_invalid_json_is_400(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(resp, 400, code="invalid_json", contains="JSON")
    resp = http.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert resp.status_code == 400


@pytest.mark.parametrize(("body", "param", "contains"), SCHEMA_VIOLATIONS)
def test_schema_violations_are_400(
    http: httpx.Client, server: RunningServer, body: dict[str, Any], param: str, contains: str
) -> None:
    # None marks a field left out of the request
    body = {k: v for k, v in {"model": server.model, **body}.items() if v is not None}
    resp = http.post("/v1/chat/completions", json=body)
    assert_openai_error(resp, 400, param=param, contains=contains)


@pytest.mark.parametrize(("extra", "param", "contains"), UNHONOURED)
def test_parameters_that_cannot_be_honoured_are_400(
    http: httpx.Client, server: RunningServer, extra: dict[str, Any], param: str | None, contains: str
) -> None:
    assert_openai_error(chat(http, server, **extra), 400, param=param, contains=contains)


def test_completion_parameters_that_cannot_be_honoured(http: httpx.Client, server: RunningServer) -> None:
    for extra, param in (
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"n": 3}, "n"),
    ):
        resp = http.post("/v1/completions", json={"model": server.model, "prompt": "x", **extra})
        assert_openai_error(resp, 400, param=param, contains="not supported")


def test_roles_that_do_not_alternate_are_400(http: httpx.Client, server: RunningServer) -> None:
    resp = chat(http, server, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert_openai_error(resp, 400, param="messages", contains="alternate")


def test_context_overflow_is_400_with_the_limits(http: httpx.Client, server: RunningServer) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    err = assert_openai_error(chat(http, server, messages=long), 400, code="context_length_exceeded")
    assert "2048" in err["message"] and "3" in err["message"]
    err = assert_openai_error(
        chat(http, server, max_tokens=4000),
        400,
        param="max_tokens",
        code="context_length_exceeded",
        contains="2048",
    )
    assert "4000 for the completion" in err["message"]
    # streaming requests are refused before any byte of a stream is sent
    resp = chat(http, server, messages=long, stream=True)
    assert_openai_error(resp, 400, code="context_length_exceeded")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_official_client_raises_typed_errors(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=MSG)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=server.model, messages=MSG, n=2)  # type: ignore[arg-type]
    assert bad.value.param == "n"


def test_health_is_200_when_ready(http: httpx.Client) -> None:
    resp = http.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def _raw_chat(
    http: httpx.Client, content_json: bytes, model: str, path: str = "/v1/chat/completions"
) -> httpx.Response:
    """A body written byte by byte, so it can carry what a JSON encoder would never produce."""
    if path == "/v1/chat/completions":
        body = b'{"model": "%s", "max_tokens": 4, "messages": [{"role": "user", "content": %s}]}'
    else:
        body = b'{"model": "%s", "max_tokens": 4, "prompt": %s}'
    return http.post(
        path, content=body % (model.encode(), content_json), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_pathological_prompts(http: httpx.Client, server: RunningServer, path: str) -> None:
    """Empty, control characters, NUL, emoji: answered; invalid UTF-8 and lone surrogates: 400."""
    for served in (
        b'""',
        b'"a\\u0000b\\u0007\\u001b[31m\\r\\n\\t end"',
        b'"\\ud83d\\ude00 \xe2\x80\xae rtl"',
    ):
        resp = _raw_chat(http, served, server.model, path)
        assert resp.status_code == 200, (served, resp.text)
        assert resp.json()["usage"]["completion_tokens"] <= 4
    for refused in (b'"\xff\xfe bad bytes"', b'"a lone \\ud800 surrogate"', b'"\\udfff"'):
        assert_openai_error(_raw_chat(http, refused, server.model, path), 400, code="invalid_json")
    # huge: far past the context (the body limit is 4 MiB by default)
    huge = b'"' + b"word " * 100_000 + b'"'
    assert_openai_error(_raw_chat(http, huge, server.model, path), 400, code="context_length_exceeded")
    # the server still serves normally afterwards
    assert chat(http, server, max_tokens=2).status_code == 200


def test_prompt_token_ids_outside_the_vocabulary_are_400(http: httpx.Client, server: RunningServer) -> None:
    """Found by the schemathesis run: llama_decode failed on them (a 500)."""
    for ids in ([-1], [10**7], [2, 262_144]):
        resp = http.post("/v1/completions", json={"model": server.model, "prompt": ids, "max_tokens": 1})
        assert_openai_error(resp, 400, param="prompt")
    ok = http.post("/v1/completions", json={"model": server.model, "prompt": [2, 1000], "max_tokens": 1})
    assert ok.status_code == 200


def test_score_route_refuses_ids_outside_the_vocabulary(http: httpx.Client) -> None:
    """Issue 20, finding 3: ``check_ids`` at or past the vocabulary gave a 500 (an IndexError)."""
    n_vocab = 262_144
    good = {"prompt_tokens": [2, 651], "token_ids": [1000, 1001]}
    for field, body in [
        ("check_ids", {**good, "check_ids": [[5, n_vocab], [7]]}),
        ("check_ids", {**good, "check_ids": [[10**12]]}),
        ("prompt_tokens", {**good, "prompt_tokens": [2, n_vocab]}),
        ("token_ids", {**good, "token_ids": [1000, n_vocab + 5]}),
    ]:
        resp = http.post("/kvproxy/v1/score", json=body)
        assert_openai_error(resp, 400, param=field, contains="outside the vocabulary")
    ok = http.post("/kvproxy/v1/score", json={**good, "check_ids": [[5, n_vocab - 1], [7]]})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["check_logprobs"]) == 2


def test_score_route_takes_user_starts_inside_the_prompt_only(http: httpx.Client) -> None:
    """Issue 27: the prompt fill carries where the primary saw user messages start."""
    good = {"prompt_tokens": [2, 651, 700], "token_ids": [1000, 1001]}
    resp = http.post("/kvproxy/v1/score", json={**good, "prompt_fill": {"user_starts": [1, 3]}})
    assert_openai_error(resp, 400, param="prompt_fill.user_starts", contains="outside the prompt")
    fill = {"batch": 2048, "ubatch": 512, "user_starts": [2, 1], "checkpoint_min_step": 0}
    ok = http.post("/kvproxy/v1/score", json={**good, "prompt_fill": fill})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["kld"]) == 2


def test_score_route_takes_calls_that_cover_the_prompt_in_order(http: httpx.Client) -> None:
    """A prompt that started from a cached prefix comes with the primary's calls
    (kvproxy.scoring.cached_prefix): they must cover the prompt from 0, in order."""
    good = {"prompt_tokens": [2, 651, 700], "token_ids": [1000, 1001]}
    for calls in ([[0, 1], [1, 2]], [[0, 2], [1, 3]], [[0, 0], [0, 3]], [], [[1, 3]]):
        resp = http.post("/kvproxy/v1/score", json={**good, "prompt_fill": {"calls": calls}})
        assert_openai_error(resp, 400, param="prompt_fill.calls", contains="do not cover")
    given = http.post("/kvproxy/v1/score", json={**good, "prompt_fill": {"calls": [[0, 1], [1, 3]]}})
    derived = http.post("/kvproxy/v1/score", json={**good, "prompt_fill": {"user_starts": [1]}})
    assert given.status_code == derived.status_code == 200, given.text
    assert given.json()["kld"] == derived.json()["kld"]  # the same calls: (0, 1), (1, 3)
    assert http.get("/kvproxy/v1/info").json()["memory"] == "swa"  # Gemma 3: sliding-window layers


def test_health_answers_within_a_second_while_huge_prompts_arrive(server: RunningServer) -> None:
    """Issue 20, finding 2: one 3.9 MiB prompt kept /health waiting 7.7 to 10 s, five in a row made
    48 s of near-outage. Templates and tokenization now run off the loop, behind a length check.
    Eight such prompts at once (chat and completions), and eight that pass the length check but
    still overflow once tokenized: /health, asked every 50 ms, answers within a second."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    words = "the quick brown fox jumps over the lazy dog "
    huge = (words * (int(3.9 * 2**20) // len(words))).encode()  # 3.9 MiB
    tokenized = (words * 4000).encode()  # 176 kB: within the length bound, about 36k tokens
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as h:
            while not stop.is_set():
                t0 = time.monotonic()
                assert h.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)

    def send(i: int) -> httpx.Response:
        text = huge if i < 8 else tokenized
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        with httpx.Client(base_url=server.base_url, timeout=120) as h:
            return _raw_chat(h, b'"' + text + b'"', server.model, path)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(send, range(16)))
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join()
    for resp in responses:
        assert_openai_error(resp, 400, code="context_length_exceeded")
    print(
        f"\n16 huge prompts (8 x 3.9 MiB, 8 x 176 kB) refused in {elapsed:.2f} s; /health max "
        f"{max(latencies) * 1000:.0f} ms, p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms "
        f"over {len(latencies)} probes"
    )
    assert max(latencies) < 1.0

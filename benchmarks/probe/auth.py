"""The auth matrix: every route with every kind of credential, header tricks, path tricks, methods
and WebSocket upgrades. A serving route opens only to an API key, an admin route only to the admin
token, a public route to anyone; a refusal is a 401 in OpenAI's shape with ``WWW-Authenticate``;
nothing is ever a 5xx, and no trick returns protected content."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from benchmarks.probe.common import Tally, Target, openai_shaped, raw_exchange

SERVING, ADMIN, PUBLIC = "serving", "admin", "public"


def _routes(t: Target) -> list[tuple[str, str, str, dict[str, Any] | None]]:
    chat = t.chat_body()
    return [
        (SERVING, "GET", "/v1/models", None),
        (SERVING, "POST", "/v1/chat/completions", chat),
        (SERVING, "POST", "/v1/completions", {"model": t.model, "prompt": "Hi", "max_tokens": 1}),
        (SERVING, "POST", "/kvproxy/v1/score", {"prompt_tokens": [2, 651], "token_ids": [1000]}),
        (SERVING, "GET", "/kvproxy/v1/info", None),
        (SERVING, "GET", "/kvproxy/v1/scores/chatcmpl-none", None),
        (ADMIN, "GET", "/kvproxy/v1/status", None),
        (ADMIN, "GET", "/metrics", None),
        (PUBLIC, "GET", "/health", None),
        (PUBLIC, "GET", "/ui", None),
        (PUBLIC, "GET", "/openapi.json", None),
    ]


def _credentials(t: Target) -> list[tuple[str, dict[str, str], str | None]]:
    """(name, headers, what they open: SERVING, ADMIN or None)."""
    k1, k2 = t.keys
    basic = base64.b64encode(f"user:{k1}".encode()).decode()
    return [
        ("none", {}, None),
        ("wrong key", {"Authorization": "Bearer not-a-key"}, None),
        ("key 1", {"Authorization": f"Bearer {k1}"}, SERVING),
        ("key 2", {"Authorization": f"Bearer {k2}"}, SERVING),
        ("admin token", {"Authorization": f"Bearer {t.admin}"}, ADMIN),
        ("lower-case scheme", {"Authorization": f"bearer {k1}"}, SERVING),
        ("padded key", {"Authorization": f"Bearer   {k1}"}, SERVING),
        ("key with a suffix", {"Authorization": f"Bearer {k1}x"}, None),
        ("key prefix", {"Authorization": f"Bearer {k1[:-1]}"}, None),
        ("scheme only", {"Authorization": "Bearer"}, None),
        ("basic auth with the key", {"Authorization": f"Basic {basic}"}, None),
        ("key as the scheme", {"Authorization": k1}, None),
        ("x-api-key header", {"X-API-Key": k1}, None),
        ("api-key header", {"api-key": k1}, None),
        ("admin token in x-api-key", {"X-API-Key": t.admin}, None),
        ("both keys joined", {"Authorization": f"Bearer {k1},{k2}"}, None),
    ]


def run(t: Target, tally: Tally) -> None:
    tally.part = "auth"
    creds = _credentials(t)
    with httpx.Client(base_url=t.base_url, timeout=120) as http:
        for kind, method, path, body in _routes(t):
            for name, headers, opens in creds:
                headers = {**headers, "X-KVProxy-Shadow": "skip"}
                try:
                    resp = http.request(method, path, headers=headers, json=body)
                except (httpx.HTTPError, UnicodeError) as exc:
                    tally.check(f"{method} {path} with {name}", False, repr(exc))
                    continue
                allowed = kind == PUBLIC or opens == kind
                if allowed:
                    ok = resp.status_code != 401 and resp.status_code < 500
                else:
                    ok = (
                        resp.status_code == 401
                        and openai_shaped(resp)
                        and resp.headers.get("www-authenticate") == "Bearer"
                    )
                tally.check(f"{method} {path} with {name}", ok, f"{resp.status_code} {resp.text[:120]}")
        _header_tricks(t, http, tally)
        _path_tricks(t, http, tally)
    _raw_tricks(t, tally)


def _header_tricks(t: Target, http: httpx.Client, tally: Tally) -> None:
    k1 = t.keys[0]
    # two Authorization headers: the first decides, a wrong first one is refused
    for first, second, expect in (
        ("Bearer wrong", f"Bearer {k1}", 401),
        (f"Bearer {k1}", "Bearer wrong", 200),
    ):
        resp = http.request(
            "GET", "/v1/models", headers=[("Authorization", first), ("Authorization", second)]
        )
        tally.check(
            f"two Authorization headers ({first[:12]}...)", resp.status_code == expect, resp.status_code
        )
    # a key in the query string opens nothing
    resp = http.get(f"/v1/models?api_key={k1}")
    tally.check("key in the query string", resp.status_code == 401, resp.status_code)
    # an API key never opens admin routes, the admin token never buys completions
    resp = http.get("/metrics", headers={"Authorization": f"Bearer {k1}"})
    tally.check("API key on /metrics", resp.status_code == 401, resp.status_code)
    resp = http.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {t.admin}"}, json=t.chat_body()
    )
    tally.check("admin token on completions", resp.status_code == 401, resp.status_code)
    # refusals do not echo what was sent
    resp = http.get("/v1/models", headers={"Authorization": "Bearer leak-me-if-you-can"})
    tally.check("a refusal does not echo the key", "leak-me" not in resp.text, resp.text[:200])


PROTECTED = ["/kvproxy/v1/status", "/metrics", "/v1/models", "/kvproxy/v1/info"]


def _variants(path: str) -> list[str]:
    inner = path[1:]
    return [
        "/" + path,
        path + "/",
        path.upper(),
        path + "?x=1",
        path + "%00",
        path + ";x",
        path + "/.",
        path + "/..",
        "/./" + inner,
        "/x/../" + inner,
        "/%2e%2e/" + inner,
        "/" + inner.replace("/", "%2F"),
        "/" + inner.replace("v", "%76", 1) if "v" in inner else path + "%20",
        "/" + inner.replace("m", "%6d", 1) if "m" in inner else path + "%09",
        "/health/../" + inner,
        "/ui/../" + inner,
        path + "%2f",
        path + "\\",
    ]


def _path_tricks(t: Target, http: httpx.Client, tally: Tally) -> None:
    """No spelling of a protected path opens it without credentials."""
    for path in PROTECTED:
        for variant in _variants(path):
            try:
                resp = http.get(
                    httpx.URL(t.base_url + variant) if "\\" not in variant else t.base_url + variant
                )
                status, text = resp.status_code, resp.text
            except httpx.HTTPError as exc:
                status, text = -1, str(exc)
            ok = status in (-1, 400, 401, 404, 405, 307, 308) or (
                status == 200
                and "kvproxy_" not in text
                and "deployments" not in text
                and '"data"' not in text
            )
            tally.check(f"path trick {variant!r}", ok and status < 500, f"{status} {text[:100]}")


def _raw_tricks(t: Target, tally: Tally) -> None:
    """What httpx will not send: absolute-form targets, odd methods, WebSocket upgrades."""
    port, k1 = t.port, t.keys[0]
    cases: list[tuple[str, bytes, tuple[bytes, ...]]] = [
        (
            "absolute-form target",
            b"GET http://evil/kvproxy/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
            (b" 401 ", b" 404 "),
        ),
        (
            "asterisk target",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            (b" 404 ", b" 400 ", b" 405 ", b" 401 "),
        ),
        ("HEAD on an admin route", b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", (b" 401 ",)),
        ("OPTIONS on an admin route", b"OPTIONS /kvproxy/v1/status HTTP/1.1\r\nHost: x\r\n\r\n", (b" 401 ",)),
        ("PROPFIND on a serving route", b"PROPFIND /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", (b" 401 ",)),
        ("HTTP/1.0 without Host", b"GET /kvproxy/v1/status HTTP/1.0\r\n\r\n", (b" 401 ",)),
        (
            "WebSocket upgrade, no key",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            (b" 403 ", b" 401 ", b" 404 "),
        ),
        (
            "WebSocket upgrade to an admin route",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            (b" 403 ", b" 401 ", b" 404 "),
        ),
        (
            "WebSocket upgrade with a key",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Authorization: Bearer " + k1.encode() + b"\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            (b" 403 ", b" 404 "),
        ),
        (
            "h2c upgrade",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            (b" 401 ",),
        ),
        (
            "obs-fold header",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n "
            + t.admin.encode()
            + b"\r\n\r\n",
            (b" 400 ", b" 401 "),
        ),
    ]
    for name, request, expect in cases:
        try:
            answer = raw_exchange(port, request, timeout=5, head_only=True)
        except OSError as exc:
            answer = f"error {exc}".encode()
        head = answer.split(b"\r\n", 1)[0]
        tally.check(name, any(e in head + b" " for e in expect) and b" 101 " not in head, head[:80])

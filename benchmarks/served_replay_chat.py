"""Served vs replay through the production path, chat with Jinja on, one stream (issue 27 part 1).

    python3 benchmarks/served_replay_chat.py [--n-gpu-layers 99] [--slots 4] [--configs f16,q4_0]
        [--tokens 16] [--threads N] [--quick]

The production path as deployed: per primary KV config a llama-server on its defaults (Jinja on; the
bundled Gemma 3 270M has no template, so ChatML) with ``-np SLOTS -fa on``, a ``kvproxy backend
--score-path decode`` holding the primary's config on the same weights and layers, and one kvproxy
proxy in front of all of them (top-20 asked of the primary: ``primary_logprobs``). Chats go through
the proxy with the official openai client, one at a time, every one shadow-scored (``X-KVProxy-Shadow:
force``); the served divergence is the coarse KL between the primary's served top-20 and the scoring
server's replay of the same config (``replica_consistency`` in ``/kvproxy/v1/status``), per token.

Cases, in this order, per config (each primary is fresh, so ``short``, ``long`` and ``turn 1`` land in
empty slots of the four: llama-server gives a prompt the slot whose cache is most like it, else an
unused one):

* ``short``: system, user, assistant, user (~200 tokens; tests/test_served_replay_jinja.py's SHORT);
* ``long``: three user turns, ~1,100 tokens (its LONG: the 4 + n_ubatch cut inside the first user);
* ``turn 1``: system, user (a new conversation); ``turn 2, cached``: the same plus turn 1's answer
  and a second user message, ``cache_prompt`` on (the chat route's default): llama-server reuses the
  slot's cache of turn 1 (prompt and generated tokens), ``cache_n`` tokens, and computes only the rest;
* ``turn 2, no cache``: the same prompt with ``cache_prompt: false``: computed from nothing (the
  slot's checkpoints go too: every one lies past position 0).

The replay cuts each prompt as llama-server did: for an empty slot (``kvproxy.scoring.prompt_fill
.PromptFill``), and for ``turn 2, cached`` (llama-server reports ``timings.cache_n`` > 0) turn 1's
calls up to ``cache_n``, then llama-server's from there (``kvproxy.scoring.cached_prefix``); a cached
prefix that no earlier turn explains is counted ``unreplayable`` and not scored (a row's column).
Prints one JSON line per case and a markdown table; writes served_replay_chat.json to $OUT when set.
Figures: docs/production.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import openai

from kvproxy.backends.embedded import bundled_model_path
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import llama_servers
from tests.test_served_replay_jinja import LONG, SHORT, chat, words

FORCE = {"X-KVProxy-Shadow": "force"}
# its own system message: a prompt sharing a long prefix with a cached one would get that slot
TURN1 = chat("Explain the text below to a new developer.", words(2000, 60))
FOLLOW_UP = "Now say the same in fewer words, then list two risks: " + words(2100, 20)


def status_of(proxy: RunningServer, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    data = httpx.get(f"{proxy.base_url}/kvproxy/v1/status", timeout=30).json()
    d = next(d for d in data["deployments"] if d["name"] == model)
    return d["shadow"], d["replica_consistency"]


def settled(shadow: dict[str, Any]) -> bool:
    done = shadow["scored"] + shadow["failed"] + shadow["dropped"]
    return bool(shadow["in_flight"] == 0 and shadow["queued"] == 0 and shadow["sampled"] == done)


def one_chat(
    proxy: RunningServer, model: str, messages: list[dict[str, str]], tokens: int, extra: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """One shadowed chat: its served-vs-replay mean over the tokens compared, and the answer's text."""
    shadow0, before = status_of(proxy, model)
    client = openai.OpenAI(base_url=proxy.v1, api_key="unused", max_retries=0, timeout=600)
    start = time.monotonic()
    out = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=tokens,
        temperature=0,
        extra_headers=FORCE,
        extra_body=extra,
    )
    seconds = time.monotonic() - start
    deadline = time.monotonic() + 600
    while True:
        shadow, after = status_of(proxy, model)
        if settled(shadow):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"shadow scoring did not settle: {shadow}")
        time.sleep(0.1)
    n = after["compared_positions"] - before["compared_positions"]
    total = (
        after["mean_divergence"] * after["compared_positions"]
        - (before["mean_divergence"] or 0) * (before["compared_positions"])
    )
    timings = (out.model_extra or {}).get("timings") or {}
    usage = out.usage
    row = {
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "compared": n,
        "served_vs_replay": float(total / n) if n else None,
        "cache_n": timings.get("cache_n"),
        "prompt_n": timings.get("prompt_n"),
        "seconds": round(seconds, 3),
        "failed": shadow["failed"] - shadow0["failed"],  # shadow jobs of this chat
        "dropped": shadow["dropped"] - shadow0["dropped"],
        "unreplayable": shadow["skipped"].get("unreplayable", 0) - shadow0["skipped"].get("unreplayable", 0),
    }
    return row, out.choices[0].message.content or ""


def run_config(proxy: RunningServer, kv: str, tokens: int, long: bool) -> list[dict[str, Any]]:
    rows = []

    def case(name: str, messages: list[dict[str, str]], **extra: Any) -> str:
        row, text = one_chat(proxy, kv, messages, tokens, extra)
        row = {"config": kv, "case": name, **row}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return text

    case("short", SHORT)
    if long:
        case("long", LONG)
    answer = case("turn 1", TURN1)
    turn2 = [*TURN1, {"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    case("turn 2, cached", turn2)
    # nothing reused: with n_past 0 llama-server also drops the slot's checkpoints (all past position 0)
    case("turn 2, no cache", turn2, cache_prompt=False)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--slots", type=int, default=4, help="the primary llama-server's -np")
    ap.add_argument("--ctx-per-slot", type=int, default=4096)
    ap.add_argument("--configs", default="f16,q4_0")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens of each chat (greedy)")
    ap.add_argument("--threads", type=int, default=None, help="-t of the primaries and scoring servers")
    ap.add_argument("--no-long", action="store_true", help="leave out the 1,100-token chat (a dry run)")
    args = ap.parse_args()
    model = args.model or bundled_model_path()
    threads = str(args.threads or min(8, os.cpu_count() or 1))
    ngl = str(args.n_gpu_layers)
    logs = Path(tempfile.mkdtemp(prefix="served-replay-chat-"))
    configs = args.configs.split(",")
    primary_args = [
        (
            *("-np", str(args.slots), "-c", str(args.slots * args.ctx_per_slot), "-fa", "on"),
            *("-ctk", kv, "-ctv", kv, "-ngl", ngl, "-t", threads),
        )
        for kv in configs
    ]
    backends: list[RunningServer] = []
    rows: list[dict[str, Any]] = []
    try:
        for kv in configs:
            backends.append(
                start_server(
                    *("--model", str(model), "--score-path", "decode", "--ctx-size", "2048"),
                    *("-ctk", kv, "-ctv", kv, "--reference-cache-type", "f16"),
                    *("--n-gpu-layers", ngl, "--threads", threads),
                    command="backend",
                    timeout=300,
                )
            )
        with llama_servers(model, logs, *primary_args, jinja=True) as primaries:
            config = logs / "deployments.toml"
            config.write_text(
                "".join(
                    f"""
[[deployments]]
model = "{kv}"
shadow_rate = 0
primary_logprobs = true
primary = {{ urls = ["{p.url}"], cache_type_k = "{kv}", cache_type_v = "{kv}" }}
reference = {{ urls = ["{b.base_url}"] }}
"""
                    for kv, p, b in zip(configs, primaries, backends, strict=True)
                )
            )
            proxy = start_server("--config", str(config))
            try:
                for kv in configs:
                    rows += run_config(proxy, kv, args.tokens, not args.no_long)
            finally:
                stop_server(proxy)
                (logs / "proxy.log").write_text("".join(proxy.output))
                if any(r["failed"] or r["dropped"] for r in rows):
                    notes = [line for line in proxy.output if "WARNING" in line or "ERROR" in line]
                    print("scoring jobs failed or dropped; the proxy said:\n" + "".join(notes[-20:]))
    finally:
        for b in backends:
            stop_server(b)
    for b in backends:
        (logs / f"backend-{b.base_url.rsplit(':', 1)[-1]}.log").write_text("".join(b.output))
    print(f"logs: {logs}")
    print(
        f"\nGemma 3 270M, llama-server on its defaults (Jinja on) -np {args.slots} -fa on -ngl {ngl}, "
        f"kvproxy backend --score-path decode -ngl {ngl}, one stream, greedy, max_tokens {args.tokens}"
    )
    print(
        "| primary KV | chat | prompt tokens | cached (cache_n) | compared tokens | served vs replay "
        "| unreplayable |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        svr = f"{r['served_vs_replay']:.1e}" if r["served_vs_replay"] is not None else "-"
        print(
            f"| {r['config']} | {r['case']} | {r['prompt_tokens']} | {r['cache_n']} | "
            f"{r['compared']} of {r['completion_tokens']} | {svr} | {r['unreplayable']} |"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "served_replay_chat.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""The kvproxy Grafana dashboard, as reviewable code. Writes grafana/dashboards/kvproxy.json.

    .venv/bin/python grafana/dashboard.py          # regenerate (tests fail if the JSON is stale)

Every query uses the template variables ``$deployment`` and ``$model``; tests evaluate each one
through a real Prometheus that scraped a running kvproxy (tests/test_prometheus.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "kvproxy.json"
SEL = 'deployment=~"$deployment",model=~"$model"'
DEP = 'deployment=~"$deployment"'
RI = "$__rate_interval"
CONFIG = "deployment, cache_type_k, cache_type_v, estimator, score_path"


def quantile(q: float, metric: str, by: str, sel: str = DEP) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def p50_p99(metric: str, by: str, sel: str = DEP) -> list[tuple[str, str]]:
    """The median and 99th-percentile targets of one histogram, a series per ``by`` value."""
    return [(f"p{int(q * 100)} {{{{{by}}}}}", quantile(q, metric, by, sel)) for q in (0.5, 0.99)]


def mean_kld(by: str = CONFIG) -> str:
    return (
        f"sum by ({by}) (rate(kvproxy_token_kld_sum{{{SEL}}}[{RI}]))\n"
        f"  / sum by ({by}) (rate(kvproxy_token_kld_count{{{SEL}}}[{RI}]))"
    )


# (title, kind, unit, [(legend, expr)]), grouped in rows
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    (
        "Quality: what the KV quantization costs",
        [
            (
                "Mean KLD per token",
                "timeseries",
                "none",
                [
                    (
                        "{{deployment}} K={{cache_type_k}} V={{cache_type_v}} ({{estimator}}, {{score_path}})",
                        mean_kld(),
                    )
                ],
            ),
            (
                "KLD p50 and p99",
                "timeseries",
                "none",
                [
                    (
                        "p50 {{deployment}} ({{estimator}}, {{score_path}})",
                        quantile(0.5, "kvproxy_token_kld", "deployment, estimator, score_path", SEL),
                    ),
                    (
                        "p99 {{deployment}} ({{estimator}}, {{score_path}})",
                        quantile(0.99, "kvproxy_token_kld", "deployment, estimator, score_path", SEL),
                    ),
                ],
            ),
            (
                "Same top token",
                "timeseries",
                "percentunit",
                [
                    (
                        "{{deployment}}",
                        f"sum by (deployment) (rate(kvproxy_same_top_tokens_total{{{SEL}}}[{RI}]))\n"
                        f"  / sum by (deployment) (rate(kvproxy_scored_tokens_total{{{SEL}}}[{RI}]))",
                    )
                ],
            ),
            (
                "RMS Δp",
                "timeseries",
                "percentunit",
                [
                    (
                        "{{deployment}}",
                        f"sqrt(sum by (deployment) (rate(kvproxy_token_delta_p_squared_total{{{SEL}}}[{RI}]))\n"
                        f"  / sum by (deployment) (rate(kvproxy_scored_tokens_total{{{SEL}}}[{RI}])))",
                    )
                ],
            ),
            (
                "Mean KLD per token by turn (text, tool_call)",
                "timeseries",
                "none",
                [
                    (
                        "{{deployment}} {{turn}}",
                        f"sum by (deployment, turn) (rate(kvproxy_turn_token_kld_sum{{{SEL}}}[{RI}]))\n"
                        f"  / sum by (deployment, turn) (rate(kvproxy_turn_token_kld_count{{{SEL}}}[{RI}]))",
                    )
                ],
            ),
            (
                "Median KLD by context position",
                "timeseries",
                "none",
                [("{{context}}", quantile(0.5, "kvproxy_token_kld", "context", SEL))],
            ),
            (
                "Configs side by side: KLD against KV memory saved",
                "table",
                "none",
                [
                    ("mean KLD", mean_kld("deployment, cache_type_k, cache_type_v")),
                    (
                        "f16 / this config (KV bytes)",
                        f'max by (deployment, cache_type_k, cache_type_v) (kvproxy_kv_cache_saving_ratio{{{DEP},role="primary"}})',
                    ),
                ],
            ),
        ],
    ),
    (
        "Shadow scoring",
        [
            (
                "Shadow coverage (scored / all completion requests)",
                "timeseries",
                "percentunit",
                [
                    (
                        "{{deployment}}",
                        f'sum by (deployment) (rate(kvproxy_shadow_requests_total{{{DEP},outcome="scored"}}[{RI}]))\n'
                        f'  / on () group_left () sum(rate(kvproxy_requests_total{{route=~"/v1/.*completions",status="200"}}[{RI}]))',
                    )
                ],
            ),
            (
                "Shadow outcomes",
                "timeseries",
                "reqps",
                [
                    (
                        "{{deployment}} {{outcome}}",
                        f"sum by (deployment, outcome) (rate(kvproxy_shadow_requests_total{{{DEP}}}[{RI}]))",
                    )
                ],
            ),
            (
                "Queue depth",
                "timeseries",
                "none",
                [("{{deployment}}", f"kvproxy_shadow_queue_depth{{{DEP}}}")],
            ),
            (
                "Shadow lag p50 / p99",
                "timeseries",
                "s",
                p50_p99("kvproxy_shadow_lag_seconds", "deployment"),
            ),
        ],
    ),
    (
        "Drift and guard",
        [
            (
                "Drift state (-1 warm-up, 0 ok, 1 warning, 2 drift) and CUSUM statistic",
                "timeseries",
                "none",
                [
                    ("state {{deployment}}", f"kvproxy_drift_state{{{DEP}}}"),
                    ("statistic {{deployment}}", f"kvproxy_drift_statistic{{{DEP}}}"),
                ],
            ),
            (
                "Guard: on the fallback (1) and route switches",
                "timeseries",
                "none",
                [
                    ("{{deployment}} -> {{fallback}}", f"kvproxy_guard_active{{{DEP}}}"),
                    (
                        "switches to {{to}} {{deployment}}",
                        f"sum by (deployment, to) (increase(kvproxy_guard_switches_total{{{DEP}}}[{RI}]))",
                    ),
                ],
            ),
        ],
    ),
    (
        "Serving",
        [
            (
                "Requests by route and status",
                "timeseries",
                "reqps",
                [("{{route}} {{status}}", f"sum by (route, status) (rate(kvproxy_requests_total[{RI}]))")],
            ),
            (
                "Request latency p50 / p99",
                "timeseries",
                "s",
                p50_p99("kvproxy_request_duration_seconds", "route", 'route=~"/v1/.*"'),
            ),
            (
                "Time to first token p50 / p99",
                "timeseries",
                "s",
                p50_p99("kvproxy_time_to_first_token_seconds", "deployment"),
            ),
            (
                "Inter-token latency p50 / p99",
                "timeseries",
                "s",
                p50_p99("kvproxy_inter_token_latency_seconds", "deployment"),
            ),
            (
                "Tokens",
                "timeseries",
                "short",
                [
                    (
                        "prompt {{deployment}}",
                        f"sum by (deployment) (rate(kvproxy_prompt_tokens_total{{{DEP}}}[{RI}]))",
                    ),
                    (
                        "completion {{deployment}}",
                        f"sum by (deployment) (rate(kvproxy_completion_tokens_total{{{DEP}}}[{RI}]))",
                    ),
                ],
            ),
            (
                "Backends up",
                "timeseries",
                "none",
                [("{{deployment}} {{role}} {{replica}}", f"kvproxy_backend_up{{{DEP}}}")],
            ),
        ],
    ),
    (
        "What-if: candidate KV configs on the same traffic (--what-if)",
        [
            (
                "What-if frontier: KV bytes and mean KLD per config",
                "table",
                "none",
                [
                    (
                        metric,
                        f"max by (deployment, candidate, role, score_path) ({metric}{{{DEP}}})",
                    )
                    for metric in (
                        "kvproxy_whatif_kv_bytes",
                        "kvproxy_whatif_mean_kld",
                        "kvproxy_whatif_mean_kld_error",
                        "kvproxy_whatif_same_top_ratio",
                        "kvproxy_whatif_pareto",
                        "kvproxy_whatif_within_budget",
                    )
                ],
            ),
            (
                "What-if: mean KLD per config (since start)",
                "timeseries",
                "none",
                [
                    (
                        "{{deployment}} {{candidate}} ({{role}}, {{score_path}})",
                        f"kvproxy_whatif_mean_kld{{{DEP}}}",
                    ),
                    ("budget {{deployment}}", f"kvproxy_whatif_kld_budget{{{DEP}}}"),
                ],
            ),
        ],
    ),
    (
        "Memory",
        [
            (
                "KV cache at the configured context",
                "timeseries",
                "bytes",
                [
                    (
                        "{{deployment}} {{role}} K={{cache_type_k}} V={{cache_type_v}}",
                        f"kvproxy_kv_cache_bytes{{{DEP}}}",
                    ),
                    ("f16 {{deployment}} {{role}}", f"kvproxy_kv_cache_f16_bytes{{{DEP}}}"),
                ],
            ),
            (
                "VRAM used / total",
                "timeseries",
                "bytes",
                [
                    ("used GPU {{gpu}}", "kvproxy_gpu_memory_used_bytes"),
                    ("total GPU {{gpu}}", "kvproxy_gpu_memory_total_bytes"),
                ],
            ),
            (
                "kvproxy resident memory",
                "timeseries",
                "bytes",
                [("{{instance}}", 'process_resident_memory_bytes{job=~"kvproxy.*"}')],
            ),
        ],
    ),
]


def panel(
    pid: int, title: str, kind: str, unit: str, targets: list[tuple[str, str]], x: int, y: int
) -> dict[str, Any]:
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                **({"instant": True, "format": "table"} if kind == "table" else {}),
            }
            for i, (legend, expr) in enumerate(targets)
        ],
        **({"transformations": [{"id": "merge", "options": {}}]} if kind == "table" else {}),
    }


def variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "query": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(row):
            panels.append(panel(pid, *spec, x=12 * (i % 2), y=y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "kvproxy",
        "title": "kvproxy: KV-cache quantization quality",
        "tags": ["kvproxy", "llama.cpp"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                variable("deployment", "label_values(kvproxy_scored_tokens_total, deployment)"),
                variable("model", "label_values(kvproxy_scored_tokens_total, model)"),
            ]
        },
        "panels": panels,
    }


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")

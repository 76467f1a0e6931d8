"""Deployment files: alert rules (promtool), the dashboard, and the consistency of the compose file
and the Kubernetes manifests (every referenced file exists, names and ports agree, scrape targets
are the services). No Docker engine or cluster runs here; these checks are what can be proven."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kvproxy.chat_template import GEMMA_TEMPLATE
from kvproxy.deployments.spec import ProxyConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool comes with Debian's prometheus package (scripts/install-system-deps.sh)"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=DEPLOY / "prometheus", timeout=60)


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_unit_tests_make_every_alert_fire_and_not_fire() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    fired = {a["alertname"] for t in tested["tests"] for a in t.get("alert_rule_test", []) if a["exp_alerts"]}
    silent = {
        a["alertname"] for t in tested["tests"] for a in t.get("alert_rule_test", []) if not a["exp_alerts"]
    }
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert fired == alerts == silent  # each alert both fires and stays silent in some test
    for g in rules["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert {"summary", "description", "runbook_url"} <= set(r["annotations"])
                anchor = r["annotations"]["runbook_url"].split("#")[1]
                assert f"### {r['alert']}" in (ROOT / "docs" / "deploy.md").read_text()
                assert anchor == r["alert"].lower()  # the anchor GitHub gives the heading


def test_the_committed_dashboard_is_what_the_code_generates() -> None:
    sys.path.insert(0, str(ROOT / "grafana"))
    import dashboard

    committed = (ROOT / "grafana" / "dashboards" / "kvproxy.json").read_text()
    assert committed == dashboard.render(), "run: .venv/bin/python grafana/dashboard.py"
    board = json.loads(committed)
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "deployment", "model"}
    for title, expr in dashboard.queries(board):
        if "kvproxy_" in expr and "gpu" not in expr and "kv_cache" not in expr:
            assert "$deployment" in expr or "route" in expr, title


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/kvproxy.yml").read_text())
    assert boards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def command_port(args: list[str]) -> int:
    return int(args[args.index("--port") + 1])


def backend_addresses(config_file: Path) -> list[tuple[str, int | None]]:
    """(host, port) of every primary and reference URL of a deployments file."""
    out = []
    for spec in ProxyConfig.from_file(config_file).deployments:
        for backend in (spec.primary, spec.reference):
            assert backend is not None and backend.urls
            out += [(str(urlsplit(u).hostname), urlsplit(u).port) for u in backend.urls]
    return out


def test_compose_files_and_names_agree() -> None:
    doc = compose()
    services = doc["services"]
    assert {"model", "primary", "reference", "kvproxy", "prometheus", "alertmanager", "grafana"} <= set(
        services
    )
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in doc["volumes"], (name, source)
    assert (ROOT / services["model"]["build"]["context"].replace("..", ".") / "Dockerfile").exists()
    # the llama-servers serve the model the kvproxy image puts in the shared volume
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "/opt/models/gemma-3-270m-q4_k_m.gguf" in dockerfile
    for role in ("primary", "reference"):
        args = services[role]["command"]
        assert args[args.index("-m") + 1] == "/models/gemma-3-270m-q4_k_m.gguf"
    assert "-ctk" in services["primary"]["command"] and "-ctk" not in services["reference"]["command"]
    assert (DEPLOY / "llama" / "gemma.jinja").read_text() == GEMMA_TEMPLATE


def test_compose_kvproxy_config_and_scrape_targets_match_the_services() -> None:
    services = compose()["services"]
    for host, port in backend_addresses(DEPLOY / "kvproxy.toml"):
        assert host in services
        assert port == command_port(services[host]["command"])
    kv = services["kvproxy"]
    port = int(kv["environment"]["KVPROXY_PORT"])
    assert f"{port}:{port}" in kv["ports"]
    assert (
        kv["volumes"][0].endswith(":/etc/kvproxy/kvproxy.toml:ro")
        and "/etc/kvproxy/kvproxy.toml" in kv["command"]
    )
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert f"kvproxy:{port}" in targets
    for role in ("primary", "reference"):
        assert f"{role}:{command_port(services[role]['command'])}" in targets
        assert "--metrics" in services[role]["command"]
    am = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
    assert (
        am.split(":")[0] in services
        and f"{am.split(':')[1]}:{am.split(':')[1]}" in services["alertmanager"]["ports"]
    )
    assert any(v.endswith("/etc/prometheus/rules.yml:ro") for v in services["prometheus"]["volumes"])


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / resource).read_text()) if d)
    for gen in kustomization["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S / f).exists(), f
    return docs


def test_k8s_services_select_their_deployments_and_ports_agree() -> None:
    docs = k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(deployments) == set(services) == {"kvproxy", "llama-primary", "llama-reference"}
    for name, svc in services.items():
        pod = deployments[name]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert deployments["kvproxy"]["spec"]["replicas"] > 1
    for host, port in backend_addresses(K8S / "kvproxy.toml"):
        assert host in services
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= services["kvproxy"]["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {
        p["name"] for p in services["kvproxy"]["spec"]["ports"]
    }
    assert (K8S / "gemma.jinja").read_text() == GEMMA_TEMPLATE


def test_k8s_prometheus_rule_is_the_rules_file() -> None:
    rule = next(d for d in k8s_docs() if d["kind"] == "PrometheusRule")
    assert (
        rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on this machine")
def test_kustomize_builds() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout) if d]
    assert kinds.count("Deployment") == 3 and kinds.count("ConfigMap") == 2

"""Deployment files: alert rules (promtool), the dashboard, and the consistency of the compose file
and the Kubernetes manifests (every referenced file exists, names and ports agree, scrape targets
are the services), for CPU and for the GPU variants (docker-compose.gpu.yml merged over the base as
Compose merges it, the deploy/k8s-gpu overlay, Dockerfile.cuda, `make serve CUDA=1` and the CUDA
mode of scripts/ensure-llama-wheel.sh). No Docker engine, cluster or GPU runs here; these checks are
what can be proven."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kvproxy.deployments.spec import ProxyConfig
from kvproxy.model.chat_template import GEMMA_TEMPLATE

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


def backend_addresses(config_file: Path, unscored: tuple[str, ...] = ()) -> list[tuple[str, int | None]]:
    """(host, port) of every primary and reference URL of a deployments file; every deployment has a
    reference but those named in ``unscored``."""
    out = []
    for spec in ProxyConfig.from_file(config_file).deployments:
        assert (spec.reference is None) == (spec.model in unscored), spec.model
        for backend in (spec.primary, spec.reference):
            if backend is None:
                continue
            assert backend.urls
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


# --- the GPU variants: make CUDA=1, Dockerfile.cuda, docker-compose.gpu.yml, deploy/k8s-gpu ---------

K8S_GPU = DEPLOY / "k8s-gpu"
SCRIPTS = ROOT / "scripts"
LLAMA_VERSION = re.findall(r'"llama-cpp-python==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[0]


def merge_compose(base: Any, override: Any, key: str = "") -> Any:
    """What ``docker compose -f base -f override config`` does with the keys these files use: mappings
    merge key by key, ``volumes`` of a service merge by their path in the container, ``ports`` add up,
    any other value (``command``, ``image``, a list such as ``healthcheck.test``) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge_compose(base[k], v, k) if k in base else v
        return out
    if key == "volumes" and isinstance(base, list):
        by_target = {v.split(":")[1]: v for v in base}
        by_target.update({v.split(":")[1]: v for v in override})
        return list(by_target.values())
    if key == "ports" and isinstance(base, list):
        return base + [p for p in override if p not in base]
    return override


def gpu_compose() -> dict[str, Any]:
    override = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    return dict(merge_compose(compose(), override))


def mount_source(service: dict[str, Any], target: str) -> str:
    sources = [v.split(":")[0] for v in service.get("volumes", []) if v.split(":")[1] == target]
    assert len(sources) == 1, (target, service.get("volumes"))
    return sources[0]


def option(args: list[str], *names: str) -> str:
    found = [args[i + 1] for i, a in enumerate(args) if a in names]
    assert len(found) == 1, (names, args)
    return found[0]


def gpu_reserved(service: dict[str, Any]) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_merge_compose_follows_compose_rules() -> None:
    base = {"services": {"a": {"image": "x", "command": ["1", "2"], "volumes": ["./a:/etc/a:ro", "v:/d"]}}}
    override = {"services": {"a": {"command": ["3"], "volumes": ["./b:/etc/a:ro"]}, "b": {"image": "y"}}}
    merged = merge_compose(base, override)
    assert merged["services"]["a"] == {"image": "x", "command": ["3"], "volumes": ["./b:/etc/a:ro", "v:/d"]}
    assert merged["services"]["b"] == {"image": "y"}


def test_gpu_compose_scores_against_the_scorer_on_the_gpu() -> None:
    doc = gpu_compose()
    services = doc["services"]
    assert set(services) == set(compose()["services"]) | {"scorer"}
    for role in ("primary", "reference"):
        svc = services[role]
        assert svc["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda" and gpu_reserved(svc)
        assert option(svc["command"], "-ngl") == "99"
        assert "healthcheck" in svc  # kvproxy waits for it
    scorer = services["scorer"]
    assert (ROOT / scorer["build"]["context"].replace("..", ".") / scorer["build"]["dockerfile"]).exists()
    assert scorer["build"]["dockerfile"] == "Dockerfile.cuda" and gpu_reserved(scorer)
    args = scorer["command"]
    assert args[0] == "backend"  # the image's entrypoint is `kvproxy`
    assert option(args, "--score-path") == "decode" and option(args, "-ngl", "--n-gpu-layers") == "99"
    port = command_port(args)
    assert option(args, "--host") == "0.0.0.0"
    assert f"http://127.0.0.1:{port}/health" in " ".join(scorer["healthcheck"]["test"])
    # it replays the primary's KV config beside the f16 reference, and on the same context
    primary = services["primary"]["command"]
    assert option(args, "-ctk") == option(primary, "-ctk") and option(args, "-ctv") == option(primary, "-ctv")
    assert option(args, "-c") == option(primary, "-c")
    assert option(args, "--reference-cache-type") == "f16"

    kv = services["kvproxy"]
    assert kv["image"] == "kvproxy:local"  # the proxy itself needs no GPU
    assert {d: c["condition"] for d, c in kv["depends_on"].items()} == {
        "primary": "service_healthy",
        "reference": "service_healthy",
        "scorer": "service_healthy",
    }
    config = mount_source(kv, "/etc/kvproxy/kvproxy.toml")
    assert config == "./kvproxy.gpu.toml" and "/etc/kvproxy/kvproxy.toml" in kv["command"]
    spec = ProxyConfig.from_file(DEPLOY / config)
    for host, port in backend_addresses(DEPLOY / config, unscored=("gemma-f16",)):
        assert host in services
        assert port == command_port(services[host]["command"])
    deployments = {d.model: d for d in spec.deployments}
    q4 = deployments["gemma-q4"]
    assert q4.reference is not None and [urlsplit(u).hostname for u in q4.reference.urls] == ["scorer"]
    assert (q4.primary.cache_type_k, q4.primary.cache_type_v) == (option(args, "-ctk"), option(args, "-ctv"))
    # the f16 llama-server is still used: it serves gemma-f16
    assert [urlsplit(u).hostname for u in deployments["gemma-f16"].primary.urls] == ["reference"]


def test_gpu_compose_prometheus_also_scrapes_the_scorer() -> None:
    services = gpu_compose()["services"]
    source = mount_source(services["prometheus"], "/etc/prometheus/prometheus.yml")
    assert source == "./prometheus/prometheus.gpu.yml"
    gpu = yaml.safe_load((DEPLOY / source).read_text())
    cpu = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # the same file plus one job
    assert {k: v for k, v in gpu.items() if k != "scrape_configs"} == {
        k: v for k, v in cpu.items() if k != "scrape_configs"
    }
    jobs = {j["job_name"]: j for j in gpu["scrape_configs"]}
    assert [j for j in gpu["scrape_configs"] if j["job_name"] != "kvproxy-scorer"] == cpu["scrape_configs"]
    targets = jobs["kvproxy-scorer"]["static_configs"][0]["targets"]
    assert targets == [f"scorer:{command_port(services['scorer']['command'])}"]
    for job in gpu["scrape_configs"]:
        for t in job["static_configs"][0]["targets"]:
            assert t.split(":")[0] in services


def dockerfile_cuda() -> str:
    return (ROOT / "Dockerfile.cuda").read_text()


def test_cuda_dockerfile_matches_the_cpu_one_where_it_should() -> None:
    text = dockerfile_cuda()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    # builder and runtime on the same CUDA release, named once
    assert froms[0] == "nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04"
    assert froms[1] == "nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04"
    assert re.search(r"^ARG CUDA_VERSION=1[23]\.\d+\.\d+$", text, re.M)
    # the wheel is built by the script `make serve CUDA=1` runs, into a cache mount of its own
    assert "scripts/ensure-llama-wheel.sh --cuda" in text and "--mount=type=cache,id=" in text
    assert "libggml-cuda.so" in text  # the installed llama-cpp-python is the CUDA build
    # the model where the CPU image has it, and where KVPROXY_MODEL says
    model = "/opt/models/gemma-3-270m-q4_k_m.gguf"
    assert f"assemble('{model}')" in text and f"KVPROXY_MODEL={model}" in text
    assert f"assemble('{model}')" in (ROOT / "Dockerfile").read_text()
    assert re.search(r"KVPROXY_N_GPU_LAYERS=-1\b", text)
    assert re.search(r"^USER kvproxy$", text, re.M) and "--uid 10001" in text  # the k8s runAsUser
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert 'ENTRYPOINT ["kvproxy"]' in text and 'CMD ["serve"]' in text
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / source).exists() and source.split("/")[0] not in ignored, source


def test_the_cuda_builds_compile_the_same_flash_attention_pairs() -> None:
    def fa_default(script: str) -> str:
        [pairs] = re.findall(r'FA_QUANTS:-"([^"]+)"', (SCRIPTS / script).read_text())
        return str(pairs)

    pairs = fa_default("ensure-llama-wheel.sh")
    assert pairs == fa_default("build-llama-cuda.sh")
    # every K and V type kvproxy offers that has a CUDA FlashAttention kernel, symmetric, plus the two
    # asymmetric pairs kvproxy measures
    assert {"f16-f16", "q8_0-q8_0", "q4_0-q4_0", "q8_0-q4_0", "q4_0-q8_0"} <= set(pairs.split(";"))


FAKE_PYTHON = """#!/usr/bin/env bash
# `python -m pip wheel ... -w DIR REQ`: record the call, write a wheel (with the CUDA backend unless
# FAKE_NO_CUDA is set); other pip calls (installing the wheel into the environment) are recorded in
# FAKE_LOG.install; sys.prefix is FAKE_PREFIX; anything else goes to the real interpreter
if [ "$1" = -c ] && [ "$2" = 'import sys; print(sys.prefix)' ]; then
    echo "$FAKE_PREFIX"
    exit 0
fi
if [ "$1 $2" = "-m pip" ] && [ "$3" != wheel ]; then
    echo "$*" >> "$FAKE_LOG.install"
    [ "$3" = show ] && exit 1   # nothing installed yet
    exit 0
fi
if [ "$1" = -m ]; then
    echo "CMAKE_ARGS=$CMAKE_ARGS ARGS=$*" >> "$FAKE_LOG"
    while [ $# -gt 0 ]; do [ "$1" = -w ] && dir=$2; shift; done
    lib=llama_cpp/lib/libggml-cuda.so
    [ -n "${FAKE_NO_CUDA:-}" ] && lib=llama_cpp/lib/libggml-cpu.so
    wheel="$dir/llama_cpp_python-$FAKE_VERSION-py3-none-linux_x86_64.whl"
    exec "$REAL_PYTHON" -c "$WRITE_WHEEL" "$wheel" "$lib"
fi
exec "$REAL_PYTHON" "$@"
"""


def run_ensure(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / "ensure-llama-wheel.sh"), *args, str(tmp / "python")],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": f"{tmp / 'bin'}:/usr/bin:/bin",
            "HOME": str(tmp),
            "KVPROXY_CACHE": str(tmp / "cache"),
            "FAKE_LOG": str(tmp / "pip.log"),
            "FAKE_PREFIX": str(tmp / "env"),
            "FAKE_VERSION": LLAMA_VERSION,
            "REAL_PYTHON": sys.executable,
            "WRITE_WHEEL": 'import sys, zipfile; zipfile.ZipFile(sys.argv[1], "w").writestr(sys.argv[2], "")',
            **env,
        },
    )


def test_ensure_llama_wheel_cuda_mode_builds_once_per_set_of_arguments(tmp_path: Path) -> None:
    """scripts/ensure-llama-wheel.sh --cuda with a fake pip, nvcc and nvidia-smi: what it asks CMake
    for, where the wheel goes, when it reuses it, and that the CPU cache is never touched."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "env").mkdir()  # the environment the wheel is installed into (FAKE_PREFIX)
    fakes = {
        "python": FAKE_PYTHON,
        "bin/nvcc": "#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n",
        "bin/nvidia-smi": "#!/bin/sh\nprintf '9.0\\n9.0\\n'\n",  # two H200s
    }
    for name, text in fakes.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    cpu_wheels, cuda_wheels = tmp_path / "cache" / "wheels", tmp_path / "cache" / "wheels-cuda"

    def pip_calls() -> list[str]:
        log = tmp_path / "pip.log"
        return log.read_text().splitlines() if log.exists() else []

    first = run_ensure(tmp_path, "--cuda")
    assert first.returncode == 0, first.stdout + first.stderr
    [call] = pip_calls()
    assert "-DGGML_CUDA=on" in call and "-DCMAKE_CUDA_ARCHITECTURES=90 " in call
    assert "-DGGML_CUDA_NCCL=OFF" in call
    assert "-DGGML_CUDA_FA_QUANTS=f16-f16;bf16-bf16;q8_0-q8_0;q4_0-q4_0;q8_0-q4_0;q4_0-q8_0;" in call
    assert (
        "--no-cache-dir" in call
        and f"-w {cuda_wheels} " in call
        and f"llama-cpp-python=={LLAMA_VERSION}" in call
    )
    assert [p.name for p in cuda_wheels.glob("*.whl")] == [
        f"llama_cpp_python-{LLAMA_VERSION}-py3-none-linux_x86_64.whl"
    ]
    assert not cpu_wheels.exists()
    # installed into the environment, with what it was built for beside it
    installs = (tmp_path / "pip.log.install").read_text().splitlines()
    assert any("install" in line and "--force-reinstall" in line for line in installs), installs
    record = (tmp_path / "env" / "kvproxy-llama-build.txt").read_text()
    assert record.startswith("flavour: cuda\ncmake: -DGGML_CUDA=on") and "-DGGML_AMX_INT8=OFF" in record
    assert "cflags: -mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in record

    again = run_ensure(tmp_path, "--cuda")
    assert again.returncode == 0 and "cached wheel" in again.stdout and len(pip_calls()) == 1

    # other architectures (or FlashAttention pairs, or CMAKE_ARGS): a new build, not the cached wheel
    portable = run_ensure(tmp_path, "--cuda", CUDA_ARCHS="portable", CMAKE_ARGS="-DGGML_NATIVE=OFF")
    assert portable.returncode == 0 and "rebuilding" in portable.stdout
    assert "-DCMAKE_CUDA_ARCHITECTURES=75-real;80-real;86-real;89-real;90 " in pip_calls()[1]
    # the caller's CMAKE_ARGS come after the script's own (AMX off among them)
    amx_off = "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    assert pip_calls()[1].split(" ARGS=")[0].endswith(f"-DGGML_CUDA_NCCL=OFF {amx_off} -DGGML_NATIVE=OFF")

    # a build that came out without the CUDA backend is refused and not cached
    broken = run_ensure(tmp_path, "--cuda", CUDA_ARCHS="86", FAKE_NO_CUDA="1")
    assert broken.returncode != 0 and "libggml-cuda.so" in broken.stderr
    assert not list(cuda_wheels.glob("*.whl"))

    # no nvcc: a clear failure before any build
    (tmp_path / "bin" / "nvcc").unlink()
    no_nvcc = run_ensure(tmp_path, "--cuda", CUDA_ARCHS="90", CUDA_HOME=str(tmp_path / "no-toolkit"))
    assert no_nvcc.returncode != 0 and "no nvcc" in no_nvcc.stderr and len(pip_calls()) == 3

    # the CPU mode is what it was: the cached CPU wheel is enough, whatever the CUDA folder holds
    cpu_wheels.mkdir(parents=True, exist_ok=True)
    (cpu_wheels / f"llama_cpp_python-{LLAMA_VERSION}-py3-none-linux_x86_64.whl").write_text("")
    record_cpu = '. scripts/llama-cpu.sh; llama_build_record "$LLAMA_NO_AMX_CMAKE" "$(llama_no_amx_flags)"'
    recorded = subprocess.run(
        ["bash", "-c", record_cpu], cwd=ROOT, capture_output=True, text=True, check=True
    )
    (cpu_wheels / f"llama_cpp_python-{LLAMA_VERSION}.build").write_text(recorded.stdout)  # as built here
    cpu = run_ensure(tmp_path)
    assert cpu.returncode == 0 and f"cached wheel in {cpu_wheels}" in cpu.stdout and len(pip_calls()) == 3

    # a CPU cache recorded on a CPU with an instruction set this one lacks: built again, AMX off
    (cpu_wheels / f"llama_cpp_python-{LLAMA_VERSION}.build").write_text(
        recorded.stdout.replace("isa: ", "isa: __AMX_TILE__ ", 1)
    )
    rebuilt = run_ensure(tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "which this CPU lacks; rebuilding" in rebuilt.stdout and len(pip_calls()) == 4
    assert "--no-cache-dir" in pip_calls()[3] and f"-w {cpu_wheels} " in pip_calls()[3]
    assert pip_calls()[3].startswith(
        "CMAKE_ARGS=-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
    )
    assert "__AMX_TILE__" not in (cpu_wheels / f"llama_cpp_python-{LLAMA_VERSION}.build").read_text()


def make_dry_run(tmp: Path, *args: str) -> list[str]:
    """The commands `make -n ARGS` would run for a fresh venv (nothing is run)."""
    # under `make test` the inherited MAKELEVEL makes a nested make print "Entering directory"; a
    # TEST_WORKERS given to that run is not the default this test reads
    env = {
        k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "TEST_WORKERS")
    }
    result = subprocess.run(
        [
            "make",
            "-n",
            "--no-print-directory",
            f"VENV={tmp / 'venv'}",
            f"KVPROXY_CACHE={tmp / 'cache'}",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.replace("\\\n\t", "").splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not on this machine")
def test_make_cuda_installs_the_cuda_wheel_and_leaves_the_cpu_path_alone(tmp_path: Path) -> None:
    venv, cache = tmp_path / "venv", tmp_path / "cache"
    pip = f"{venv}/bin/uv pip install --quiet --python {venv}/bin/python"  # uv, pinned in the venv
    cuda = make_dry_run(tmp_path, "serve", "CUDA=1")
    steps = cuda[cuda.index(f"touch {venv}/.venv-ok") + 1 :]
    assert steps == [
        f"scripts/ensure-llama-wheel.sh --cuda {venv}/bin/python",  # installs the CUDA wheel too
        f"{pip} --find-links {cache}/wheels-cuda --compile-bytecode -e .",
        f"touch {venv}/.installed-cuda {venv}/.installed",
        f"scripts/ensure-llama-wheel.sh --installed {venv}/bin/python",  # fits this CPU, every run
        f"{venv}/bin/kvproxy serve",
    ]
    assert make_dry_run(tmp_path, "install", "CUDA=1") == cuda[:-2]
    # without CUDA=1 (or with CUDA=0) nothing of it: the README's commands, CI's `make test`
    for target in ("serve", "install", "test"):
        cpu = make_dry_run(tmp_path, target)
        assert cpu == make_dry_run(tmp_path, target, "CUDA=0")
        assert not any(w in line for line in cpu for w in ("--cuda", "wheels-cuda", ".installed-cuda")), cpu
        assert f"scripts/ensure-llama-wheel.sh {venv}/bin/python" in cpu
        assert f"{pip} --find-links {cache}/wheels --compile-bytecode -e ." in cpu
        # uv is pinned and installed into the venv by its own pip, which uv then upgrades
        assert any(
            re.fullmatch(rf"{re.escape(str(venv))}/bin/python -m pip install --quiet 'uv==[0-9.]+'", line)
            for line in cpu
        )
        assert f"{pip} --upgrade pip" in cpu
    # mypy's cache is kept beside the other caches: a fresh clone does not check everything again
    test = make_dry_run(tmp_path, "test")
    assert f"{venv}/bin/mypy --cache-dir {cache}/mypy" in test
    # byte code kept even where PYTHONDONTWRITEBYTECODE is set: kvproxy's own, before the tests
    assert f"{venv}/bin/python -m compileall -q kvproxy >/dev/null" in test
    assert make_dry_run(tmp_path, "serve")[-1] == f"{venv}/bin/kvproxy serve"
    cores = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    assert make_dry_run(tmp_path, "test")[-1] == (  # one pytest-xdist worker a core, a module on one
        f"KVPROXY_LLAMA_BIN=$(scripts/build-llama-tools.sh {venv}/bin/python) "
        f"{venv}/bin/pytest -n {cores} --dist loadfile --no-loadscope-reorder"
    )
    assert make_dry_run(tmp_path, "test", "TEST_WORKERS=0")[-1].endswith(
        "/bin/pytest -n 0 --dist loadfile --no-loadscope-reorder"
    )


def k8s_gpu_files() -> list[dict[str, Any]]:
    """The overlay's own objects and patches (no kustomize needed)."""
    kustomization = yaml.safe_load((K8S_GPU / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = K8S_GPU / entry
        if path.is_dir():
            assert path.resolve() == K8S, entry  # the base
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kustomization["patches"]:
        text = (K8S_GPU / patch["path"]).read_text() if "path" in patch else patch["patch"]
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    for gen in kustomization["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S_GPU / f).exists(), f
    return docs


def gpu_limit(container: dict[str, Any]) -> str | None:
    resources = container.get("resources", {})
    limit = resources.get("limits", {}).get("nvidia.com/gpu")
    # GPUs are limits; a request, if given, must equal the limit
    assert resources.get("requests", {}).get("nvidia.com/gpu", limit) == limit
    return str(limit) if limit is not None else None


def test_k8s_gpu_overlay_files_agree_with_the_compose_variant() -> None:
    docs = k8s_gpu_files()
    patched = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment" and "$patch" not in d}
    base = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "Deployment"}
    deleted = {(d["kind"], d["metadata"]["name"]) for d in docs if d.get("$patch") == "delete"}
    assert deleted == {("Deployment", "llama-reference"), ("Service", "llama-reference")}
    assert "llama-primary" in base and "kvproxy-scorer" not in base
    services = gpu_compose()["services"]
    primary = patched["llama-primary"]["spec"]["template"]["spec"]["containers"][0]
    assert (
        primary["image"] == services["primary"]["image"] and primary["args"] == services["primary"]["command"]
    )
    assert gpu_limit(primary) == "1"
    scorer = patched["kvproxy-scorer"]["spec"]["template"]["spec"]["containers"][0]
    assert scorer["image"] == services["scorer"]["image"] == "kvproxy:cuda"
    assert scorer["args"] == services["scorer"]["command"]
    assert gpu_limit(scorer) == "1"
    assert patched["kvproxy-scorer"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on this machine")
def test_k8s_gpu_overlay_builds_and_points_the_reference_at_the_scorer(tmp_path: Path) -> None:
    docs = kustomize_build(K8S_GPU)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(deployments) == set(services) == {"kvproxy", "llama-primary", "kvproxy-scorer"}
    assert all(d["metadata"].get("namespace") == "kvproxy" for d in docs if d["kind"] != "Namespace")
    for name, svc in services.items():
        pod = deployments[name]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    # the GPU goes to llama.cpp and the scorer, not to the proxy
    on_gpu = {
        n
        for n, d in deployments.items()
        if any(gpu_limit(c) for c in d["spec"]["template"]["spec"]["containers"])
    }
    assert on_gpu == {"llama-primary", "kvproxy-scorer"}
    for name in on_gpu:
        [container] = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert option(container["args"], "-ngl") == "99"
    scorer = deployments["kvproxy-scorer"]["spec"]["template"]["spec"]["containers"][0]
    assert option(scorer["args"], "--score-path") == "decode"
    assert command_port(scorer["args"]) == services["kvproxy-scorer"]["spec"]["ports"][0]["port"]
    # kvproxy reads the overlay's deployments file, whose reference is the scorer's Service
    [config] = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kvproxy-config")
    ]
    volumes = deployments["kvproxy"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in volumes
    assert config["data"] == {"kvproxy.toml": (K8S_GPU / "kvproxy.toml").read_text()}
    (tmp_path / "kvproxy.toml").write_text(config["data"]["kvproxy.toml"])
    for host, port in backend_addresses(tmp_path / "kvproxy.toml"):
        assert host in services and port in {p["port"] for p in services[host]["spec"]["ports"]}
    [spec] = ProxyConfig.from_file(tmp_path / "kvproxy.toml").deployments
    assert spec.reference is not None and [urlsplit(u).hostname for u in spec.reference.urls] == [
        "kvproxy-scorer"
    ]
    assert (spec.primary.cache_type_k, spec.primary.cache_type_v) == (
        option(scorer["args"], "-ctk"),
        option(scorer["args"], "-ctv"),
    )
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for name in ("kvproxy", "kvproxy-scorer"):
        assert any(
            m["spec"]["selector"]["matchLabels"].items() <= services[name]["metadata"]["labels"].items()
            for m in monitors
        ), name

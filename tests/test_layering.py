"""kvproxy's import graph, read from the source (ast): layers depend downwards only (issue 26).

Every ``import`` and ``from ... import`` of a kvproxy module counts, at any depth (a function-level
import is still an arrow). A unit is a subpackage (``kvproxy.scoring``) or a module at the root
(``kvproxy.kld``); :data:`LAYERS` ranks them and an arrow between two units must go to a lower
rank (units of one rank are independent of each other). docs/design.md draws the same map.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvproxy"

# higher imports lower, never the other way; equal ranks do not import each other
LAYERS: dict[str, int] = {
    "__main__": 110,
    "cli": 100,
    "app": 90,
    "api": 80,
    "serving": 70,
    "deployments": 60,
    "telemetry": 50,
    "calibrate": 50,
    "shadow": 40,
    "http": 35,
    "scoring": 30,
    "errors": 25,
    "backends": 20,
    "upstream": 20,
    "model": 10,
    "observers": 10,
    "protocol_responses": 10,
    "kld": 5,
    "protocol": 2,  # the OpenAI wire models (their tool fields are tool_calls' types)
    # leaves: import nothing of kvproxy
    "__init__": 0,
    "config": 0,
    "corpus": 0,
    "priority": 0,
    "tool_calls": 0,
    "schema_limits": 0,
    "sse": 0,
    "tasks": 0,
    "textstream": 0,
    "static": 0,
}

HTTP_MODULES = ("fastapi", "starlette", "aiohttp", "httpx", "requests", "urllib", "http", "kvproxy.http")
PROMETHEUS_ALLOWED = ("kvproxy.telemetry", "kvproxy.api.admin")  # the metrics route


Imports = dict[str, frozenset[str]]  # module -> every module it imports


def module_name(relative: Path) -> str:
    parts = ("kvproxy", *relative.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imports_of(module: str, is_pkg: bool, source: str) -> frozenset[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved)."""
    here = module.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from kvproxy import sse` imports the module kvproxy.sse
            found.update(f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*")
    return frozenset(found)


def read_package(package: Path = PACKAGE, added: dict[str, str] | None = None) -> Imports:
    """The imports of every module of ``package``; ``added`` appends source lines to some files
    (relative paths), as someone editing them would."""
    added = added or {}
    out: Imports = {}
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        source = path.read_text() + added.get(str(relative), "")
        out[module_name(relative)] = imports_of(module_name(relative), path.name == "__init__.py", source)
    return out


def unit(module: str) -> str | None:
    """``kvproxy.scoring.embedded`` -> ``scoring``; ``kvproxy.kld`` -> ``kld``; ``kvproxy`` ->
    ``__init__``; None outside kvproxy."""
    parts = module.split(".")
    if parts[0] != "kvproxy":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def kvproxy_arrows(graph: Imports) -> Iterator[tuple[str, str, str, str]]:
    """(module, its unit, imported kvproxy module, its unit) for arrows between two units (the
    package's ``__version__`` aside)."""
    for src, targets in graph.items():
        src_unit = unit(src)
        assert src_unit is not None
        for target in sorted(targets):
            target_unit = unit(target)
            if target_unit is None or target_unit == src_unit or target in ("kvproxy", "kvproxy.__version__"):
                continue
            yield src, src_unit, target, target_unit


def layer_violations(graph: Imports) -> list[str]:
    found = []
    for src, src_unit, target, target_unit in kvproxy_arrows(graph):
        if target_unit not in LAYERS or src_unit not in LAYERS:
            found.append(f"{src} -> {target}: give {src_unit} and {target_unit} a rank in LAYERS")
        elif LAYERS[src_unit] <= LAYERS[target_unit]:
            found.append(f"{src} ({src_unit}, {LAYERS[src_unit]}) -> {target} ({LAYERS[target_unit]})")
    return sorted(found)


def unit_cycles(graph: Imports) -> list[list[str]]:
    edges: dict[str, set[str]] = {}
    for _, src_unit, _, target_unit in kvproxy_arrows(graph):
        edges.setdefault(src_unit, set()).add(target_unit)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def http_under_shadow(graph: Imports) -> list[str]:
    return sorted(
        f"{src} imports {t}"
        for src, targets in graph.items()
        if src == "kvproxy.shadow" or src.startswith("kvproxy.shadow.")
        for t in targets
        if any(t == m or t.startswith(m + ".") for m in HTTP_MODULES) or "header" in t.lower()
    )


def prometheus_outside_telemetry(graph: Imports) -> list[str]:
    return sorted(
        f"{src} imports {t}"
        for src, targets in graph.items()
        if not any(src == a or src.startswith(a + ".") for a in PROMETHEUS_ALLOWED)
        for t in targets
        if t == "prometheus_client" or t.startswith("prometheus_client.")
    )


@pytest.fixture(scope="module")
def graph() -> Imports:
    return read_package()


def test_every_unit_has_a_layer(graph: Imports) -> None:
    units = {unit(m) for m in graph} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    units -= {"__pycache__"}
    assert units <= set(LAYERS), f"give these a rank in LAYERS: {sorted(units - set(LAYERS))}"


def test_no_arrow_goes_up_a_layer(graph: Imports) -> None:
    assert layer_violations(graph) == []


def test_no_import_cycle_between_packages(graph: Imports) -> None:
    assert unit_cycles(graph) == []


def test_shadow_does_no_http(graph: Imports) -> None:
    assert http_under_shadow(graph) == []


def test_prometheus_client_only_in_telemetry_and_the_metrics_route(graph: Imports) -> None:
    assert prometheus_outside_telemetry(graph) == []


def test_kvproxy_init_imports_nothing_heavy(graph: Imports) -> None:
    """``import kvproxy`` (every CLI call, every test worker) must not load llama.cpp."""
    assert not {t for t in graph["kvproxy"] if t.split(".")[0] in ("llama_cpp", "numpy")}


@pytest.mark.parametrize(
    ("where", "line", "caught"),
    [
        # an upward arrow; where the lower unit already imports the higher one, also a cycle
        ("model/gguf_info.py", "from kvproxy.scoring import job", {"layers", "cycle"}),
        ("scoring/job.py", "from kvproxy.shadow.pool import ShadowPool", {"layers", "cycle"}),
        ("backends/base.py", "from ..scoring import kept", {"layers", "cycle"}),  # relative counts
        ("upstream/replicas.py", "from kvproxy.deployments import base", {"layers", "cycle"}),
        ("corpus.py", "from kvproxy.kld import median", {"layers"}),  # no way back: no cycle
        ("backends/base.py", "from kvproxy.upstream import replicas", {"layers"}),  # one rank: independent
        ("kld.py", "import kvproxy.kld", set()),  # within a unit: fine
        ("shadow/ask.py", "from fastapi import Request", {"http"}),
        ("shadow/pool.py", "from kvproxy.http.request_id import current", {"http"}),
        ("shadow/path.py", "    import aiohttp", {"http"}),  # inside a function too
        ("shadow/pool.py", "from starlette.datastructures import Headers", {"http"}),
        ("serving/relay.py", "from prometheus_client import Counter", {"prometheus"}),
        ("telemetry/metrics.py", "from prometheus_client import Counter", set()),
    ],
)
def test_the_checks_fail_on_a_bad_import(where: str, line: str, caught: set[str]) -> None:
    """Each check catches what it is for, once one import is added to one file."""
    wrapper = "def _added() -> None:\n" if line.startswith("    ") else ""
    edited = read_package(added={where: f"\n{wrapper}{line}\n"})
    results = {
        "layers": layer_violations(edited),
        "cycle": unit_cycles(edited),
        "http": http_under_shadow(edited),
        "prometheus": prometheus_outside_telemetry(edited),
    }
    assert {name for name, found in results.items() if found} == caught, results


def test_importing_the_cli_loads_neither_llama_cpp_nor_numpy() -> None:
    """``python -X importtime -c 'import kvproxy.cli'`` lists neither: llama.cpp loads in the
    commands that load a model (kvproxy.backends.native), before numpy."""
    code = "import sys, kvproxy.cli; print(sorted({'llama_cpp', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

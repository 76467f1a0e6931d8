#!/usr/bin/env bash
# One CUDA build of the llama.cpp that the pinned llama-cpp-python vendors, with shared libraries,
# serving both the tools (llama-server, llama-perplexity, test-llama-archs) and the Python bindings
# (the sdist's pure-Python llama_cpp package loads BUILD_DIR/bin/libllama.so through
# LLAMA_CPP_LIB_PATH; libllama.so finds libggml*.so beside it through its RUNPATH).
# Meant for the GPU device machine (benchmarks/gpu/README.md), where it runs detached:
#   setsid nohup scripts/build-llama-cuda.sh SRC_DIR BUILD_DIR >/dev/null 2>&1 < /dev/null &
# Everything goes to BUILD_DIR/build.log; at the end it writes BUILD_DIR/DONE (with the elapsed
# seconds) or BUILD_DIR/FAILED (with the failing step). Re-running reuses the build tree.
# Environment:
#   JOBS        parallel compile jobs (default: nproc)
#   CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200 only)
#   FA_QUANTS   GGML_CUDA_FA_QUANTS, the K-V type pairs that get their own FlashAttention vector
#               kernel; other pairs are converted to f16 on the GPU first (slower, other numerics).
#               "all" compiles all 49 pairs (45 more .cu files than the default 4).
#   GGML_CUDA   ON (default) or OFF: OFF builds the same targets for the CPU only (local checks)
#   TARGETS     the build targets (default below)
#   CUDA_SEARCH more folders to look for cuBLAS/cudart/libcuda in, when CMake alone finds none
#   CONFIGURE_ONLY=1  stop after CMake's configure step (a check)
#   LLAMA_AMX   OFF (default): ggml's AMX matmul is compiled out (scripts/llama-cpu.sh: it dies of
#               SIGILL on CPUs with AMX); ON leaves it in, only to measure what it was worth
# Usage: scripts/build-llama-cuda.sh SRC_DIR BUILD_DIR
set -uo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SRC_DIR BUILD_DIR" >&2
    exit 2
fi
src=$(cd "$1" && pwd) || exit 2
mkdir -p "$2" || exit 2
build=$(cd "$2" && pwd)
log="$build/build.log"
rm -f "$build/DONE" "$build/FAILED"
exec >>"$log" 2>&1 </dev/null

jobs=${JOBS:-$(nproc)}
cuda=${GGML_CUDA:-ON}
archs=${CUDA_ARCHS:-90}
# f16/bf16 and the symmetric q8_0/q4_0 are llama.cpp's default set; the two asymmetric pairs are the
# ones kvproxy measures (q8_0 K + q4_0 V, q4_0 K + q8_0 V); the other symmetric types kvproxy offers
# (q5_1, q5_0, q4_1) cost one .cu file each. iq4_nl has no CUDA FlashAttention kernel at all.
fa_quants=${FA_QUANTS:-"f16-f16;bf16-bf16;q8_0-q8_0;q4_0-q4_0;q8_0-q4_0;q4_0-q8_0;q5_1-q5_1;q5_0-q5_0;q4_1-q4_1"}
targets=${TARGETS:-"llama llama-server llama-perplexity test-llama-archs"}
. "$(dirname "$0")/llama-cpu.sh"
amx_flags=("-DCMAKE_C_FLAGS=$(llama_no_amx_flags)" "-DCMAKE_CXX_FLAGS=$(llama_no_amx_flags)" $LLAMA_NO_AMX_CMAKE)
[ "${LLAMA_AMX:-OFF}" = ON ] && amx_flags=()
start=$(date +%s)

fail() {
    echo "FAILED: $1 after $(( $(date +%s) - start )) s"
    echo "$1" > "$build/FAILED"
    exit 1
}

echo "== $(date -u +%FT%TZ) build-llama-cuda.sh $src -> $build (GGML_CUDA=$cuda archs=$archs jobs=$jobs)"
echo "== FA_QUANTS=$fa_quants"
echo "== targets: $targets"
echo "== AMX: ${LLAMA_AMX:-OFF} ${amx_flags[*]}"
cat "$src/KVPROXY-SOURCE.txt" 2>/dev/null
if [ "$cuda" = ON ]; then
    command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
    nvcc --version | tail -2 || fail "no nvcc"
fi
# cmake and ninja may be Python packages whose scripts sit beside the interpreter (a venv's bin/)
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    pybin=$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)
    [ -n "$pybin" ] && export PATH="$PATH:$pybin"
fi
cmake --version | head -1 || fail "no cmake"

generator=()
if command -v ninja >/dev/null; then
    generator=(-G Ninja)
fi
if [ -f "$build/CMakeCache.txt" ]; then
    generator=()   # keep the generator the tree was made with
fi

cuda_flags=()
if [ "$cuda" = ON ]; then
    # NCCL off: one GPU, and a libnccl found in some Python package's folder must not get linked in.
    cuda_flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$archs" "-DGGML_CUDA_FA_QUANTS=$fa_quants"
                -DGGML_CUDA_NCCL=OFF)
else
    cuda_flags=(-DGGML_CUDA=OFF)
fi

# No network on the device: no prebuilt web UI download, no HTTPS client (mirrors
# scripts/build-llama-tools.sh, plus shared libraries and the tests folder for test-llama-archs).
# GGML_NATIVE stays at its default (ON: the CPU backend is tuned for the machine that builds it).
configure() {
    cmake -S "$src" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON \
        "${cuda_flags[@]}" "${amx_flags[@]}" \
        -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF \
        "$@"
}

# Where a CUDA toolkit is assembled from pip wheels (nvcc from cuda-toolkit, cuBLAS from the
# nvidia-cublas wheel that PyTorch uses), CMake's FindCUDAToolkit misses libraries that exist only as
# lib*.so.13, or live in another folder, and the driver's libcuda.so.1 when there are no stubs. Then
# name them explicitly: the shortest-named match in the toolkit, Python's site-packages, the driver's
# folders and ldconfig's cache. $CUDA_SEARCH adds folders to look in.
search_roots() {
    local tk
    tk=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    printf '%s\n' "$tk" /usr/local/cuda /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 ${CUDA_SEARCH:-}
    sed -n 's/^CUDAToolkit_BIN_DIR:[A-Z]*=\(.*\)/\1\/../p' "$build/CMakeCache.txt" 2>/dev/null
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null
    ldconfig -p 2>/dev/null | awk '/libcuda\.so|libcublas|libcudart/ {print $NF}' | xargs -r -n1 dirname
}
find_shortest() {  # find_shortest ROOTS_FILE NAME-PATTERN...
    local roots=$1; shift
    local expr=() n
    for n in "$@"; do expr+=(-o -name "$n"); done
    sort -u "$roots" | while read -r d; do [ -d "$d" ] && echo "$d"; done \
        | xargs -r -I{} find -L {} -maxdepth 8 \( -false "${expr[@]}" \) \( -type f -o -type l \) -printf '%f %p\n' 2>/dev/null \
        | awk '{print length($1), $2}' | sort -n -k1,1 -s | head -1 | cut -d' ' -f2-
}

if ! configure; then
    [ "$cuda" = ON ] || fail "cmake configure"
    echo "== configure failed: looking for the CUDA libraries FindCUDAToolkit did not find"
    roots=$(mktemp)
    search_roots > "$roots"
    hints=()
    for lib in cudart cublas cublasLt cuda_driver; do
        grep -q "^CUDA_${lib}_LIBRARY:FILEPATH=.*NOTFOUND" "$build/CMakeCache.txt" || continue
        name=$lib
        [ "$lib" = cuda_driver ] && name=cuda
        path=$(find_shortest "$roots" "lib$name.so" "lib$name.so.[0-9]*")
        echo "== CUDA_${lib}_LIBRARY: ${path:-not found}"
        [ -n "$path" ] && hints+=("-DCUDA_${lib}_LIBRARY=$path")
    done
    tk_inc=$(sed -n 's/^CUDAToolkit_BIN_DIR:[A-Z]*=//p' "$build/CMakeCache.txt")/../include
    if [ ! -f "$tk_inc/cublas_v2.h" ] && [ ! -f "$tk_inc/../targets/x86_64-linux/include/cublas_v2.h" ]; then
        hdr=$(find_shortest "$roots" cublas_v2.h)
        echo "== cublas_v2.h: ${hdr:-not found} (toolkit include: $tk_inc)"
        [ -n "$hdr" ] && hints+=("-DCMAKE_CUDA_FLAGS=-I$(dirname "$hdr")")
    fi
    rm -f "$roots"
    [ ${#hints[@]} -gt 0 ] || fail "cmake configure"
    echo "== reconfiguring with: ${hints[*]}"
    configure "${hints[@]}" || fail "cmake configure"
fi
echo "== configured after $(( $(date +%s) - start )) s"
if [ "${CONFIGURE_ONLY:-0}" = 1 ]; then
    echo "0" > "$build/DONE"
    exit 0
fi

# shellcheck disable=SC2086  # targets is a word list
cmake --build "$build" --config Release -j "$jobs" --target $targets || fail "cmake --build"

for t in $targets; do
    case "$t" in
        llama) f=libllama.so ;;
        llama-*|test-*) f=$t ;;
        *) continue ;;
    esac
    [ -e "$build/bin/$f" ] || fail "missing bin/$f"
done
for f in libggml.so libggml-base.so libggml-cpu.so; do
    [ -e "$build/bin/$f" ] || fail "missing bin/$f"
done
if [ "$cuda" = ON ]; then
    [ -e "$build/bin/libggml-cuda.so" ] || fail "missing bin/libggml-cuda.so"
fi
ls -l "$build/bin"
elapsed=$(( $(date +%s) - start ))
echo "== DONE in $elapsed s"
echo "$elapsed" > "$build/DONE"

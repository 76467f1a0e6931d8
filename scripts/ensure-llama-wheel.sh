#!/usr/bin/env bash
# Build the pinned llama-cpp-python wheel once (about 5 minutes on 2 cores) into a cache outside the
# repository, reuse it on every later install, and install it into PYTHON's environment.
# Usage: scripts/ensure-llama-wheel.sh PYTHON              the CPU build, into "$cache/wheels"
#        scripts/ensure-llama-wheel.sh --cuda PYTHON       the CUDA build, into "$cache/wheels-cuda"
#        scripts/ensure-llama-wheel.sh --installed PYTHON  only check that the build PYTHON's
#            environment holds still fits this CPU (a copied venv, a moved disk); a CPU one that
#            does not is rebuilt and reinstalled (`make serve` and `make test` call this each time)
#        scripts/ensure-llama-wheel.sh --check PYTHON      say whether the cached CPU wheel can be
#            reused here (exit 0) or would be rebuilt, and why (exit 1); builds nothing
#
# Every build keeps AMX off and records what it was built for (scripts/llama-cpu.sh): the CMake
# arguments and the instruction sets `-march=native` enabled. A cached wheel is reused only with the
# same arguments on a CPU that has every one of those instruction sets; otherwise it is rebuilt.
# The environment's copy is reinstalled whenever it is not the cached build (a record in sys.prefix).
#
# --cuda (`make serve CUDA=1`, Dockerfile.cuda) builds the same pinned version with
# CMAKE_ARGS="-DGGML_CUDA=on ..." into its own folder: CPU and CUDA wheels have the same file name,
# so they must never share one. Environment, CUDA mode only:
#   CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES. Unset: the compute capabilities of the GPUs nvidia-smi sees
#               here (what CMake's "native" would pick, but written down, so the cached wheel says
#               which GPUs it is for), or the portable list below when it sees none. "portable": that
#               list. Anything else is passed through ("native", "90", "86-real;89-real", ...).
#   FA_QUANTS   GGML_CUDA_FA_QUANTS (default: the list scripts/build-llama-cuda.sh compiles)
#   CUDA_HOME   where the toolkit is when nvcc is not on PATH (default /usr/local/cuda)
# Both modes: CMAKE_ARGS, more CMake arguments after ours (Dockerfile.cuda adds -DGGML_NATIVE=OFF).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/llama-cpu.sh"

mode=cpu
case "${1:-}" in
    --cuda | --installed | --check) mode=${1#--}; shift ;;
esac
python=${1:-python3}
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$here/../pyproject.toml")
cache=${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}
cflags=$(llama_no_amx_flags)
prefix=$("$python" -c 'import sys; print(sys.prefix)')
installed_record="$prefix/kvproxy-llama-build.txt"

# Install the cached wheel into PYTHON's environment unless it holds that very build already.
install_into_env() {  # wheels-folder record-file flavour
    local wheel
    wheel=$(ls "$1"/llama_cpp_python-"$version"-*.whl)
    if [ -f "$installed_record" ] && [ "$(tail -n +2 "$installed_record")" = "$(cat "$2")" ] \
        && "$python" -m pip show --quiet llama-cpp-python >/dev/null 2>&1; then
        return 0
    fi
    echo "llama-cpp-python $version ($3): installing $(basename "$wheel") into $prefix"
    "$python" -m pip install --quiet --no-index --no-deps --force-reinstall "$wheel"
    { echo "flavour: $3"; cat "$2"; } > "$installed_record"
}

# pip builds the pinned version from source into a wheels folder. --no-cache-dir: pip's own wheel
# cache is keyed by the sdist alone and would hand back a wheel built earlier with other arguments or
# on another CPU (--no-binary no longer bypasses it since pip 23.1). CFLAGS, not CMAKE_ARGS, carry
# the compiler flags: scikit-build-core splits CMAKE_ARGS at every " -".
build_wheel() {  # wheels-folder cmake-args
    CMAKE_ARGS="$2" CFLAGS="$cflags${CFLAGS:+ $CFLAGS}" CXXFLAGS="$cflags${CXXFLAGS:+ $CXXFLAGS}" \
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$python" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$1" \
        "llama-cpp-python==$version"
}

if [ "$mode" = installed ]; then
    [ -f "$installed_record" ] || exit 0   # nothing installed by this script yet: the install does it
    flavour=$(sed -n 's/^flavour: //p' "$installed_record")
    recorded=$(mktemp)
    tail -n +2 "$installed_record" > "$recorded"
    why=$(llama_build_stale "$recorded" \
        "$(sed -n 's/^cmake: //p' "$installed_record")" "$(sed -n 's/^cflags: //p' "$installed_record")")
    rm -f "$recorded"
    [ -z "$why" ] && exit 0
    echo "llama-cpp-python in $prefix was $why"
    if [ "$flavour" = cuda ]; then
        echo "  rebuild it for this machine: make clean && make serve CUDA=1" >&2
        exit 1
    fi
    mode=cpu   # rebuild (the cache is keyed alike) and reinstall below
fi

if [ "$mode" = cpu ] || [ "$mode" = check ]; then
    wheels="$cache/wheels"
    mkdir -p "$wheels"
    cmake_args="$LLAMA_NO_AMX_CMAKE${CMAKE_ARGS:+ $CMAKE_ARGS}"
    record="$wheels/llama_cpp_python-$version.build"
    why="no cached wheel"
    if ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
        why=$(llama_build_stale "$record" "$cmake_args" "$cflags")
    fi
    if [ "$mode" = check ]; then
        [ -z "$why" ] && { echo "reuse: the cached wheel in $wheels fits this CPU"; exit 0; }
        echo "rebuild: $why"
        exit 1
    fi
    if [ -n "$why" ]; then
        [ "$why" != "no cached wheel" ] && echo "llama-cpp-python $version: the cached wheel was $why; rebuilding"
        rm -f "$wheels"/llama_cpp_python-"$version"-*.whl "$record"
        echo "llama-cpp-python $version: building the wheel from source into $wheels (about 5 minutes on 2 cores)..."
        echo "  CMAKE_ARGS=$cmake_args CFLAGS=CXXFLAGS=$cflags"
        start=$(date +%s)
        build_wheel "$wheels" "$cmake_args"
        llama_build_record "$cmake_args" "$cflags" > "$record"
        echo "llama-cpp-python $version: built in $(( $(date +%s) - start )) s"
    else
        echo "llama-cpp-python $version: cached wheel in $wheels"
    fi
    install_into_env "$wheels" "$record" cpu
    exit 0
fi

wheels="$cache/wheels-cuda"
mkdir -p "$wheels"

# Real code for T4 (7.5), A100/A30 (8.0), A10/A40/RTX 30 (8.6), L4/L40S/RTX 40 (8.9) and H100/H200
# (9.0), plus compute_90 PTX that the driver compiles on first use for anything newer (Blackwell);
# valid for CUDA 12 and 13 alike (13 dropped everything before 7.5). Each architecture is one more
# pass over every kernel: one alone builds in about a fifth of the time of this list.
portable="75-real;80-real;86-real;89-real;90"
archs=${CUDA_ARCHS:-}
if [ -z "$archs" ]; then
    # "9.0" -> "90"; several GPUs of one kind give one entry
    archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
        | tr -d ' .' | grep -E '^[0-9]+$' | sort -un | paste -sd';' || true)
    if [ -n "$archs" ]; then
        echo "llama-cpp-python $version (CUDA): compiling for the GPUs of this machine: $archs (CUDA_ARCHS to change)"
    else
        archs=$portable
        echo "llama-cpp-python $version (CUDA): no GPU visible here; compiling for $archs (CUDA_ARCHS to change)"
    fi
elif [ "$archs" = portable ]; then
    archs=$portable
fi
# f16/bf16 and the symmetric q8_0/q4_0 are llama.cpp's default set; the two asymmetric pairs are the
# ones kvproxy measures; the other symmetric types kvproxy offers cost one .cu file each. Same list
# as scripts/build-llama-cuda.sh (tests/test_deploy.py keeps them equal). Pairs not compiled run
# converted to f16 on the GPU first (slower, other numerics); iq4_nl has no CUDA FlashAttention
# kernel at all, so that op runs on the CPU.
fa_quants=${FA_QUANTS:-"f16-f16;bf16-bf16;q8_0-q8_0;q4_0-q4_0;q8_0-q4_0;q4_0-q8_0;q5_1-q5_1;q5_0-q5_0;q4_1-q4_1"}
# NCCL off: kvproxy runs each context on one GPU, and a libnccl found on the build machine (a
# PyTorch install's, say) must not get linked into a wheel that then fails to load elsewhere.
cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$archs -DGGML_CUDA_FA_QUANTS=$fa_quants -DGGML_CUDA_NCCL=OFF"
cmake_args="$cmake_args $LLAMA_NO_AMX_CMAKE${CMAKE_ARGS:+ $CMAKE_ARGS}"
record="$wheels/llama_cpp_python-$version.build"

if ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    why=$(llama_build_stale "$record" "$cmake_args" "$cflags")
    if [ -z "$why" ]; then
        echo "llama-cpp-python $version (CUDA): cached wheel in $wheels"
        install_into_env "$wheels" "$record" cuda
        exit 0
    fi
    echo "llama-cpp-python $version (CUDA): the cached wheel was $why; rebuilding"
    rm -f "$wheels"/llama_cpp_python-"$version"-*.whl "$record"
fi

cuda_home=${CUDA_HOME:-/usr/local/cuda}
command -v nvcc >/dev/null || export PATH="$PATH:$cuda_home/bin"
if ! command -v nvcc >/dev/null; then
    echo "llama-cpp-python $version (CUDA): no nvcc on PATH or in $cuda_home/bin: install the CUDA" \
        "toolkit (12.x or 13.x), or set CUDA_HOME to it" >&2
    exit 1
fi
echo "llama-cpp-python $version (CUDA): building the wheel from source into $wheels with $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/CUDA \1/p')"
echo "  CMAKE_ARGS=$cmake_args CFLAGS=CXXFLAGS=$cflags"
echo "  (one architecture: about 10 minutes on 16 cores; each more adds about as much)..."
start=$(date +%s)
build_wheel "$wheels" "$cmake_args"
# a wheel without the CUDA backend means CMAKE_ARGS never reached CMake: never cache that one
wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl)
if ! "$python" -c 'import sys, zipfile; sys.exit("llama_cpp/lib/libggml-cuda.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$wheel"; then
    rm -f "$wheel"
    echo "llama-cpp-python $version (CUDA): the wheel has no llama_cpp/lib/libggml-cuda.so; removed it" >&2
    exit 1
fi
llama_build_record "$cmake_args" "$cflags" > "$record"
echo "llama-cpp-python $version (CUDA): built in $(( $(date +%s) - start )) s"
install_into_env "$wheels" "$record" cuda

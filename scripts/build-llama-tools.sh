#!/usr/bin/env bash
# Build llama-server, llama-perplexity and test-llama-archs (which writes tiny random-weight models
# of any architecture the pinned llama.cpp knows) from the llama.cpp source vendored in the pinned
# llama-cpp-python sdist (the same llama.cpp the embedded backend runs), into a cache outside the
# repository; reuse them when present, and build only what is missing (an older cache without
# test-llama-archs gets just that target, linked against the libraries already built).
# AMX is off and the cache is keyed by what the tools were built for, as for the wheel
# (scripts/llama-cpu.sh): a cache built with other arguments, or on a CPU with instruction sets this
# one lacks, is rebuilt. Prints the bin directory on its last line.
# Usage: scripts/build-llama-tools.sh [PYTHON]      (about 8 minutes on 2 cores the first time)
#        scripts/build-llama-tools.sh --check         whether the cached tools would be reused here
#                                                     (exit 0) or rebuilt, and why (exit 1)
set -euo pipefail

check=0
if [ "${1:-}" = --check ]; then
    check=1
    shift
fi
python=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/llama-cpu.sh"
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
cache=${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}
bin="$cache/llama.cpp-$version/bin"
build="$cache/llama.cpp-$version/build"
cflags=$(llama_no_amx_flags)
# No network at build time: no prebuilt web UI download, no HTTPS client. Tests are configured (only
# test-llama-archs is built) so the one build tree serves every tool.
cmake_args="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF"
cmake_args="$cmake_args -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
cmake_args="$cmake_args -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF $LLAMA_NO_AMX_CMAKE"
record="$bin/BUILD-FOR.txt"
if [ "$check" = 1 ]; then
    why="no cached tools"
    [ -d "$bin" ] && why=$(llama_build_stale "$record" "$cmake_args" "$cflags")
    [ -z "$why" ] && { echo "reuse: the tools in $bin fit this CPU"; exit 0; }
    echo "rebuild: $why"
    exit 1
fi
if [ -d "$bin" ]; then
    why=$(llama_build_stale "$record" "$cmake_args" "$cflags")
    if [ -n "$why" ]; then
        echo "llama.cpp tools in $bin were $why; rebuilding" >&2
        rm -rf "$bin" "$build"
    fi
fi

tools=(llama-server llama-perplexity test-llama-archs)
missing=()
for tool in "${tools[@]}"; do
    [ -x "$bin/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "llama.cpp tools for llama-cpp-python $version: cached" >&2
    echo "$bin"
    exit 0
fi

sdist_dir="$cache/sdist"
sdist="$sdist_dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$sdist_dir" "llama-cpp-python==$version" >&2
fi
src="$cache/llama.cpp-$version/src"
if [ ! -f "$src/CMakeLists.txt" ]; then
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=3 "llama_cpp_python-$version/vendor/llama.cpp"
fi

echo "building ${missing[*]} from llama-cpp-python $version's llama.cpp (about 8 minutes on 2 cores for all)..." >&2
start=$(date +%s)
# shellcheck disable=SC2086
CFLAGS="$cflags${CFLAGS:+ $CFLAGS}" CXXFLAGS="$cflags${CXXFLAGS:+ $CXXFLAGS}" \
    cmake -S "$src" -B "$build" $cmake_args >&2
cmake --build "$build" --config Release -j "$(nproc)" --target "${missing[@]}" >&2
mkdir -p "$bin"
for tool in "${missing[@]}"; do
    cp "$build/bin/$tool" "$bin/"
done
llama_build_record "$cmake_args" "$cflags" > "$record"
echo "built in $(( $(date +%s) - start )) s" >&2
echo "$bin"

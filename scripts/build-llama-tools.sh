#!/usr/bin/env bash
# Build llama-server, llama-perplexity and test-llama-archs (which writes tiny random-weight models
# of any architecture the pinned llama.cpp knows) from the llama.cpp source vendored in the pinned
# llama-cpp-python sdist (the same llama.cpp the embedded backend runs), into a cache outside the
# repository; reuse them when present, and build only what is missing (an older cache without
# test-llama-archs gets just that target, linked against the libraries already built).
# Prints the bin directory on its last line.
# Usage: scripts/build-llama-tools.sh [PYTHON]      (about 8 minutes on 2 cores the first time)
set -euo pipefail

python=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
cache=${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}
bin="$cache/llama.cpp-$version/bin"

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
build="$cache/llama.cpp-$version/build"
# No network at build time: no prebuilt web UI download, no HTTPS client. Tests are configured (only
# test-llama-archs is built) so the one build tree serves every tool.
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF >&2
cmake --build "$build" --config Release -j "$(nproc)" --target "${missing[@]}" >&2
mkdir -p "$bin"
for tool in "${missing[@]}"; do
    cp "$build/bin/$tool" "$bin/"
done
echo "built in $(( $(date +%s) - start )) s" >&2
echo "$bin"

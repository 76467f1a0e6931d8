#!/usr/bin/env bash
# Build the pinned llama-cpp-python wheel once (about 5 minutes on 2 cores) into a cache outside the
# repository, and reuse it on every later install: `pip install --find-links "$cache/wheels" ...`.
# Usage: scripts/ensure-llama-wheel.sh PYTHON        (prints nothing but progress; exits non-zero on failure)
set -euo pipefail

python=${1:-python3}
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
cache=${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}
wheels="$cache/wheels"
mkdir -p "$wheels"

if ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    echo "llama-cpp-python $version: cached wheel in $wheels"
    exit 0
fi

echo "llama-cpp-python $version: building the wheel from source into $wheels (about 5 minutes on 2 cores)..."
start=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$python" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$wheels" "llama-cpp-python==$version"
echo "llama-cpp-python $version: built in $(( $(date +%s) - start )) s"

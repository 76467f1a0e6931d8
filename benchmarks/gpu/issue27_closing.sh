#!/usr/bin/env bash
# Issue 27's remaining GPU figures in one device call of under 9 minutes, after
# `. benchmarks/gpu/device_setup.sh` (benchmarks/gpu/README.md); each table is teed into $OUT/NAME.log:
#   1. scoring_cost: the capture's cost on the client's step (pre-faulted blocks) and decode-path
#      scoring against generation and the f16-decode floor, with the per-phase breakdown
#      (benchmarks/scoring_cost.py --ngl 99: Gemma 3 270M and random weights in Qwen3 1.7B's shapes)
#   2. whatif_live: the live what-if on the H100 (kvproxy serve -ngl 99 -ctk q8_0 -ctv q8_0
#      --what-if q4_0,q8_0/q4_0,q4_0/q8_0), the seed's finding on the GPU
#   3. served_replay_chat: the production path (llama-server -np 4 on its defaults, Jinja on) with a
#      chat's second turn on the cached prefix, replayed with the cached-prefix calls
# Each step runs under its own deadline and never stops the sequence.
#   STEPS="whatif_live served_replay_chat": only these steps (a call of 10 minutes at most each)
#   QUICK=1: small settings, every layer on the CPU (-ngl 0): the dry run here.
set -uo pipefail
. "$(dirname "$0")/steps.sh"
if [ "$quick" = 1 ]; then ngl=0; else ngl=${NGL:-99}; fi

# llama.cpp's libraries before numpy (a SIGSEGV on the H100 host otherwise: docs/deploy.md)
runpy_first="import llama_cpp, sys, runpy; sys.argv=sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"

{
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
echo "issue27_closing.sh: QUICK=$quick -ngl $ngl, $(nproc) cores, $($py --version 2>&1), $(git rev-parse --short HEAD 2>/dev/null)"
if [ "$quick" = 1 ]; then
    step scoring_cost 900 "$py" -c "$runpy_first" benchmarks/scoring_cost.py --tokens 20 --jobs 2 --prompt-words 30 \
        --repeats 1 --big-layers 2 --big-jobs 1 --big-tokens 6
    step whatif_live 600 "$py" -c "$runpy_first" benchmarks/whatif_live.py --requests 1 --tokens 16 --ctx 1024 --threads 1
    step served_replay_chat 900 "$py" -c "$runpy_first" benchmarks/served_replay_chat.py --n-gpu-layers 0 --tokens 4 \
        --threads 2 --no-long
else
    step scoring_cost 240 "$py" -c "$runpy_first" benchmarks/scoring_cost.py --ngl "$ngl"
    step whatif_live 100 "$py" -c "$runpy_first" benchmarks/whatif_live.py --ngl "$ngl" --requests 8 --tokens 128
    step served_replay_chat 170 "$py" -c "$runpy_first" benchmarks/served_replay_chat.py --n-gpu-layers "$ngl" --tokens 64
fi
echo "issue27_closing.sh: done in $(( $(date +%s) - t_start )) s"
} 2>&1 | tee "$out/issue27_closing.log"
ls -la "$out"

#!/usr/bin/env bash
# Issue 27's GPU figures in one device call of under 9 minutes, after `. benchmarks/gpu/device_setup.sh`
# (benchmarks/gpu/README.md): each table is teed into $OUT/NAME.log, everything into $OUT/issue27.log.
#   1. served vs replay through the production path, chat with Jinja on, one stream, f16 and q4_0
#      primaries (llama-server -np 4 + kvproxy backend --score-path decode + the proxy), fresh chats
#      and a second turn on a cached prefix: benchmarks/served_replay_chat.py
#      benchmarks/cached_prefix.py: that second turn replayed in process from scratch and with
#      llama-server's cached prefix (turn 1's prompt calls up to timings.cache_n)
#   2. issue 20's embedded --parallel 1/2/4 throughput, TTFT and fairness: benchmarks/embedded_parallel.py
#   3. scoring cost against generation, when benchmarks/scoring_cost.py exists (branch i27-capture)
# Each step runs under its own deadline and never stops the sequence.
#   QUICK=1   small settings, every layer on the CPU (-ngl 0): the dry run on a machine without a GPU
#   NGL=99  PYTHON=python3  BUDGET=530 (seconds for all steps; scoring_cost gets what is left)
set -uo pipefail
. "$(dirname "$0")/steps.sh"
if [ "$quick" = 1 ]; then ngl=${NGL:-0}; else ngl=${NGL:-99}; fi
budget=${BUDGET:-530}

{
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
echo "issue27.sh: QUICK=$quick -ngl $ngl, $(nproc) cores, $($py --version 2>&1)"
if [ "$quick" = 1 ]; then  # a 2-core machine shared with others: a chat and its scoring take minutes
    step served_replay_chat 900 "$py" benchmarks/served_replay_chat.py --n-gpu-layers "$ngl" \
        --tokens 4 --threads 2 --no-long
    step cached_prefix_q4_0 400 "$py" benchmarks/cached_prefix.py --kv q4_0 --n-gpu-layers "$ngl" \
        --server-args "-np 4 -c 16384" --warm 1 --tokens 4
    step embedded_parallel 400 "$py" benchmarks/embedded_parallel.py --n-gpu-layers "$ngl" \
        --parallel 1 2 --clients 2 --requests 2 --tokens 4 --fairness --long-tokens 60
else
    step served_replay_chat 170 "$py" benchmarks/served_replay_chat.py --n-gpu-layers "$ngl" --tokens 64
    # the second turn on a cached prefix: replayed from scratch and as llama-server computed it
    for kv in f16 q4_0; do
        step "cached_prefix_$kv" 60 "$py" benchmarks/cached_prefix.py --kv "$kv" --n-gpu-layers "$ngl" \
            --server-args "-np 4 -c 16384" --warm 2 --tokens 64
    done
    # the CPU table's settings (docs/benchmarks.md), every layer on the GPU
    step embedded_parallel 170 "$py" benchmarks/embedded_parallel.py --n-gpu-layers "$ngl" \
        --parallel 1 2 4 --fairness
fi
if [ -f benchmarks/scoring_cost.py ]; then
    left=$(( budget - ($(date +%s) - t_start) ))
    if [ "$left" -gt 30 ]; then
        step scoring_cost "$left" "$py" benchmarks/scoring_cost.py --ngl "$ngl"
    else
        echo "=== scoring_cost: skipped, ${left}s of the ${budget}s budget left"
    fi
else
    echo "=== scoring_cost: benchmarks/scoring_cost.py is not in this tree (branch i27-capture): skipped"
fi
echo "issue27.sh: done in $(( $(date +%s) - t_start )) s"
} 2>&1 | tee "$out/issue27.log"
ls -la "$out"

#!/usr/bin/env bash
# Every GPU measurement of issues 16 and 17, in two device calls of under 10 minutes each, after
# `. benchmarks/gpu/device_setup.sh` (benchmarks/gpu/README.md). Logs go to $OUT/PART.log and the
# outputs into $OUT/PART.tgz (the device returns at most 8 files).
#   bash benchmarks/gpu/measure.sh a     scrape cost, score paths vs llama-perplexity, scoring cost, serve
#   bash benchmarks/gpu/measure.sh b     through llama-server (top-K vs exact, the batching floor), calibrate
set -uo pipefail
part=${1:?a or b}
out=${OUT:-/tmp/out}
res=$out/$part
mkdir -p "$res"
export OUT=$res PYTHONUNBUFFERED=1
ngl=${NGL:-99}
threads=${THREADS:-$(nproc)}
step() {  # step NAME SECONDS COMMAND...: run with a deadline, log, never stop the sequence
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$res/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
}
{
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
case "$part" in
a)
    step scrape 60 python3 benchmarks/gpu_scrape_cost.py --requests 200 --seconds 15
    step score_paths 210 python3 benchmarks/score_paths.py --llama-bin "$KVPROXY_LLAMA_BIN" \
        --n-gpu-layers "$ngl" --threads "$threads" --chunks 4
    step decode_cost 120 python3 benchmarks/decode_scoring_cost.py --n-gpu-layers "$ngl" \
        --threads "$threads" --jobs 8 --tokens 64 --sequences 1,2,4,8 --repeats 2
    step serve 120 python3 benchmarks/gpu/serve_check.py --n-gpu-layers "$ngl" --requests 16
    ;;
b)
    step served_floor 300 python3 benchmarks/served_floor.py --n-gpu-layers "$ngl" --requests 8 --tokens 64
    for path in decode prefill; do
        step "calibrate_$path" 120 python3 -m kvproxy calibrate -ngl "$ngl" --score-path "$path" \
            --max-chunks 4 --out "$res/calib-$path" --budget 0.05
    done
    ;;
esac
} 2>&1 | tee "$out/$part.log"
tar -czf "$out/$part.tgz" -C "$res" . && rm -rf "$res"
ls -la "$out"

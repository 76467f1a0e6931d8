# Sourced by the GPU measurement scripts (issue27.sh, issue27_closing.sh): the common set-up and
# `step`. Sets out (=$OUT, default /tmp/out), py (=$PYTHON, default python3), quick (=$QUICK) and
# t_start; runs from the repository root.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
out=${OUT:-/tmp/out}
mkdir -p "$out"
export OUT=$out PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
quick=${QUICK:-0}
t_start=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a deadline, tee into $OUT/NAME.log
    # (only the steps named in $STEPS when it is set)
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ]; then
        case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    fi
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
}

# Sourced by the scripts that build llama.cpp (ensure-llama-wheel.sh, build-llama-tools.sh,
# build-llama-cuda.sh): how the CPU code is compiled, and the key a cached build is kept under.
#
# AMX is off in every build. The pinned llama.cpp's AMX matmul (ggml-cpu/amx) dies with SIGILL on
# CPUs that have it (Sapphire/Emerald/Granite Rapids): `tilezero` runs with a tile config the
# compiler may optimise away and without the per-thread permission (ggml-org/llama.cpp PR 26954
# fixes both; issue 28756). With GGML_NATIVE=ON (the default), `-march=native` turns on
# __AMX_INT8__ and with it that code; an explicit `-mno-amx-*` wins over -march wherever it stands on
# the command line (GCC and Clang), so CFLAGS/CXXFLAGS carry it. With GGML_NATIVE=OFF the GGML_AMX_*
# options decide, and they are passed OFF too. AMX only speeds up batched matmuls of some quant
# types (prompt processing), never a one-token decode; docs/deploy.md has what it was worth.
#
# A build with -march=native runs only on CPUs with every instruction set the compiler enabled for
# the build machine. llama_build_isa prints that set (the compiler's predefined ISA macros, such as
# __AVX512F__, less those of baseline x86-64); a cache records it beside the build and is reused
# only on a CPU whose own set contains it (llama_build_missing).

llama_no_amx_flags() {
    case "$(uname -m)" in
        x86_64 | amd64) echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
        *) echo "" ;;
    esac
}

LLAMA_NO_AMX_CMAKE="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

# The instruction sets a native build uses on this machine, one macro a line, sorted. Falls back to
# the CPU's flags from /proc/cpuinfo when there is no C compiler to ask.
llama_build_isa() {
    local cc=${CC:-cc} flags native base
    flags=$(llama_no_amx_flags)
    case "$(uname -m)" in
        x86_64 | amd64) native=-march=native base=-march=x86-64 ;;
        *) native=-mcpu=native base= ;;
    esac
    if command -v "$cc" >/dev/null 2>&1 \
        && "$cc" $native $flags -dM -E -x c /dev/null >/dev/null 2>&1; then
        comm -23 \
            <("$cc" $native $flags -dM -E -x c /dev/null | sed -n 's/^#define \(__[A-Z0-9_]*__\) .*/\1/p' | sort -u) \
            <("$cc" $base -dM -E -x c /dev/null | sed -n 's/^#define \(__[A-Z0-9_]*__\) .*/\1/p' | sort -u)
    else
        sed -n 's/^\(flags\|Features\)[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -1 | tr ' ' '\n' \
            | grep -v '^$' | sed 's/^/cpuinfo:/' | sort -u
    fi
}

# The record a build is kept under: what it was configured with, then the ISA it may use.
#   llama_build_record "CMAKE ARGS" "CFLAGS"
# A build configured with GGML_NATIVE=OFF does not follow the build machine's CPU: its ISA line
# says "portable" (what GGML_* options pick, the same on every machine).
llama_build_record() {
    echo "cmake: $1"
    echo "cflags: $2"
    case " $1 " in
        *" -DGGML_NATIVE=OFF "*) echo "isa: portable" ;;
        *) echo "isa: $(llama_build_isa | paste -sd' ')" ;;
    esac
}

# Why a recorded build cannot be reused here (one line), or nothing when it can: other
# configuration, or an instruction set this CPU lacks.
#   llama_build_stale RECORD_FILE "CMAKE ARGS" "CFLAGS"
llama_build_stale() {
    local file=$1 want have missing
    if [ ! -f "$file" ]; then
        echo "no record of what it was built for"
        return
    fi
    want=$(llama_build_record "$2" "$3")
    if [ "$(sed -n 1,2p "$file")" != "$(echo "$want" | sed -n 1,2p)" ]; then
        echo "built with other arguments ($(sed -n 1p "$file" | cut -c1-200))"
        return
    fi
    have=$(echo "$want" | sed -n 's/^isa: //p' | tr ' ' '\n' | sort -u)
    # compiler macros on one side and /proc/cpuinfo flags (no compiler) on the other: no common names
    if [ "$(echo "$have" | grep -q '^cpuinfo:' && echo y)" != "$(grep -q '^isa: cpuinfo:' "$file" && echo y)" ]; then
        echo "cannot compare instruction sets (no C compiler here or there); assuming the build fits" >&2
        return 0
    fi
    missing=$(sed -n 's/^isa: //p' "$file" | tr ' ' '\n' | grep -v '^$' | sort -u | comm -23 - <(echo "$have") \
        | paste -sd' ')
    [ -n "$missing" ] && echo "built for a CPU with $missing, which this CPU lacks"
    return 0
}

#!/usr/bin/env bash
# The LiteLLM proxy in a virtual environment of its own (for benchmarks/proxy_overhead.py), cached
# outside the repo in $KVPROXY_CACHE/litellm-venv and reused when present. Prints the executable.
set -euo pipefail
cache="${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}"
venv="$cache/litellm-venv"
version="${LITELLM_VERSION:-1.108.7}"
if [[ ! -x "$venv/bin/litellm" ]] || ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$version')"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "litellm[proxy]==$version" >&2
fi
echo "$venv/bin/litellm"

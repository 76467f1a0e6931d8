#!/bin/sh
# The JavaScript client of the client matrix (tests/test_client_matrix.py): openai-node, installed
# once into $KVPROXY_CACHE/node-clients (outside the repository, like the llama.cpp build). Prints
# that directory. Without node and npm it prints nothing and exits 0: the test then skips, saying so.
set -eu
VERSION=4.104.0
CACHE=${KVPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvproxy}
DIR=$CACHE/node-clients
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "ensure-node-clients: no node/npm on PATH; the JavaScript client test will skip" >&2
    exit 0
fi
if [ "$(cat "$DIR/.installed" 2>/dev/null)" != "openai@$VERSION" ]; then
    mkdir -p "$DIR"
    (cd "$DIR" && npm install --silent --no-audit --no-fund --no-save "openai@$VERSION" >&2)
    echo "openai@$VERSION" > "$DIR/.installed"
fi
echo "$DIR"

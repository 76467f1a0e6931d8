# The two commands of the README:  `make serve`  and  `make test`.
# Both create .venv, install what they need (building the pinned llama-cpp-python wheel once into
# $(KVPROXY_CACHE)/wheels and reusing it), then run.
#
# On an NVIDIA GPU:  `make serve CUDA=1`  (or `make install CUDA=1`) builds the same pinned version with
# CUDA once into $(KVPROXY_CACHE)/wheels-cuda (scripts/ensure-llama-wheel.sh --cuda; CUDA_ARCHS and
# FA_QUANTS are read there) and installs it into the venv in place of a CPU build. The venv keeps it:
# a later plain `make serve` runs the CUDA build too; `make clean` goes back to the CPU one, or give
# the CUDA build a venv of its own (VENV=.venv-cuda). Nothing changes without CUDA=1.

PYTHON ?= python3
VENV ?= .venv
KVPROXY_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kvproxy
export KVPROXY_CACHE
PIP := $(VENV)/bin/python -m pip
# The venv's packages are installed by uv (pinned, installed into the venv by pip first): with its
# cache warm (~/.cache/uv) a fresh clone's `make test` installs in about 20 s where pip took 49 s.
# uv resolves the same pins. pip stays for building the llama-cpp-python wheel
# (scripts/ensure-llama-wheel.sh).
#
# Byte code: kvproxy's own dependencies are compiled when installed (--compile-bytecode) and kvproxy
# itself before the tests run (compileall). Where PYTHONDONTWRITEBYTECODE is set (CI sandboxes set
# it) Python never keeps what it compiles, so every process would compile fastapi, pydantic, numpy,
# ... again: a `kvproxy serve --help` start takes about 3.5 s of CPU that way and 1.9 s with byte
# code (benchmarks/start_bytecode.py), and the tests start some 175 kvproxy processes. The test
# extras (litellm, langchain, ...) are imported by the two pytest workers only and are left to
# compile on import.
UV_VERSION := 0.13.8
UV := $(VENV)/bin/uv
UV_PIP := $(UV) pip install --quiet --python $(VENV)/bin/python
PIP_INSTALL := $(UV_PIP) --find-links $(KVPROXY_CACHE)/wheels
# mypy's incremental cache lives beside the other caches, so a fresh clone checks in about a second
# instead of 12 (mypy re-checks any file whose contents changed)
MYPY := $(VENV)/bin/mypy --cache-dir $(KVPROXY_CACHE)/mypy

# `make test`'s pytest workers (pytest-xdist): one a core, each pinned to its core (tests/workers.py);
# every module's tests run on one worker, so its module fixtures start once, and modules are handed
# out longest first (tests/conftest.py LONG_MODULES; --no-loadscope-reorder keeps that order instead
# of xdist's most-tests-first). TEST_WORKERS=0: one process.
TEST_WORKERS ?= $(shell nproc)

.PHONY: serve test test-fast llama-tools node-clients install install-test clean

# what `serve` and `install` need: the CPU build, or with CUDA=1 the CUDA one
ifeq ($(CUDA),1)
INSTALLED := $(VENV)/.installed-cuda
else
INSTALLED := $(VENV)/.installed
endif

# Each run first checks that the venv's llama.cpp build fits this CPU (a venv or cache carried to
# another machine is rebuilt, never run into SIGILL); that check takes a few milliseconds.
serve: $(INSTALLED)
	scripts/ensure-llama-wheel.sh --installed $(VENV)/bin/python
	$(VENV)/bin/kvproxy serve

test: $(VENV)/.installed-test llama-tools node-clients
	scripts/ensure-llama-wheel.sh --installed $(VENV)/bin/python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MYPY)
	$(VENV)/bin/python -m compileall -q kvproxy >/dev/null
	KVPROXY_LLAMA_BIN=$$(scripts/build-llama-tools.sh $(VENV)/bin/python) \
		$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit loop's tier: lint, types and the tests that start no llama-server and load the model at
# most once (tests/conftest.py FAST_MODULES, and tests marked fast); no llama.cpp tools are built for it. `make test` runs these and everything else.
test-fast: $(VENV)/.installed-test
	scripts/ensure-llama-wheel.sh --installed $(VENV)/bin/python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MYPY)
	$(VENV)/bin/python -m compileall -q kvproxy >/dev/null
	$(VENV)/bin/pytest -m fast

# llama-server and llama-perplexity from the pinned llama.cpp source, cached in $(KVPROXY_CACHE)
llama-tools: $(VENV)/.installed
	scripts/build-llama-tools.sh $(VENV)/bin/python

# the client matrix's JavaScript client (openai-node) in $(KVPROXY_CACHE)/node-clients; without node
# it says so and the test skips
node-clients:
	scripts/ensure-node-clients.sh >/dev/null

install: $(INSTALLED)
install-test: $(VENV)/.installed-test

$(VENV)/.venv-ok:
	scripts/install-system-deps.sh
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "kvproxy needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet 'uv==$(UV_VERSION)'
	$(UV_PIP) --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.venv-ok pyproject.toml scripts/ensure-llama-wheel.sh scripts/llama-cpu.sh
	scripts/ensure-llama-wheel.sh $(VENV)/bin/python
	$(PIP_INSTALL) --compile-bytecode -e .
	touch $@

# The script installs the CUDA wheel into the venv in place of any CPU one (same version and file
# name); then `uv pip install -e .` finds llama-cpp-python satisfied and adds only what is missing.
# Marking .installed too keeps a later plain `make serve` from building a CPU wheel it would not install.
$(VENV)/.installed-cuda: $(VENV)/.venv-ok pyproject.toml scripts/ensure-llama-wheel.sh scripts/llama-cpu.sh
	scripts/ensure-llama-wheel.sh --cuda $(VENV)/bin/python
	$(UV_PIP) --find-links $(KVPROXY_CACHE)/wheels-cuda --compile-bytecode -e .
	touch $@ $(VENV)/.installed

# instructor pins jiter<0.15, which the openai SDK outgrew: installed without its pins (pyproject.toml)
INSTRUCTOR := instructor==1.17.0

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	$(PIP_INSTALL) --no-deps '$(INSTRUCTOR)'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

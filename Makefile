# The two commands of the README:  `make serve`  and  `make test`.
# Both create .venv, install what they need (building the pinned llama-cpp-python wheel once into
# $(KVPROXY_CACHE)/wheels and reusing it), then run.

PYTHON ?= python3
VENV ?= .venv
KVPROXY_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kvproxy
export KVPROXY_CACHE
PIP := $(VENV)/bin/python -m pip
PIP_INSTALL := $(PIP) install --quiet --find-links $(KVPROXY_CACHE)/wheels

.PHONY: serve test llama-tools install install-test clean

serve: $(VENV)/.installed
	$(VENV)/bin/kvproxy serve

test: $(VENV)/.installed-test llama-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	KVPROXY_LLAMA_BIN=$$(scripts/build-llama-tools.sh $(VENV)/bin/python) $(VENV)/bin/pytest

# llama-server and llama-perplexity from the pinned llama.cpp source, cached in $(KVPROXY_CACHE)
llama-tools: $(VENV)/.installed
	scripts/build-llama-tools.sh $(VENV)/bin/python

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.venv-ok:
	scripts/install-system-deps.sh
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "kvproxy needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.venv-ok pyproject.toml scripts/ensure-llama-wheel.sh
	scripts/ensure-llama-wheel.sh $(VENV)/bin/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# gpt2cli developer tasks. `make install` sets up the tool alone; `make test` adds what the tests need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet
# optional extras for `make install`, comma-separated: `make install EXTRAS=serve,ray`
EXTRAS ?=
# one stamp per layer: the runtime (six dependencies, ~150 MB) and the test/bench extras on top
RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed

.PHONY: install test test-fast lint bench wheel-check clean

install: $(RUNTIME)
ifneq ($(strip $(EXTRAS)),)
	$(PIP) -e '.[$(EXTRAS)]'
endif

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

# torch is pinned to 2.13.0 in the test extra: any other request pulls a multi-GB CUDA build.
$(DEV): $(RUNTIME)
	$(PIP) -e '.[test]'
	touch $@

# the whole suite, as CI runs it
test: $(DEV)
	$(PY) -m pytest -q

# the inner loop: all but the tests marked slow in tests/conftest.py (server processes, the
# 124M model, lm-eval, Ray, the fake hub, the costliest tests); under two minutes on 2 cores
test-fast: $(DEV)
	$(PY) -m pytest -q -m "not slow"

lint: $(DEV)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

bench: $(DEV)
	$(PY) -m bench

# the wheel alone, in an empty venv, from outside the source tree: what `pip install gpt2cli` gives
wheel-check: $(DEV)
	bash .ci/wheel-check

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache

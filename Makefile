# `make run`: the gateway on 127.0.0.1:8000 serving the embedded model.
# `make test`: the whole suite. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
# llama-cpp-python builds from source: use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run test bench lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[local]'
	@touch $@

$(VENV)/.dev-deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[local,dev]'
	@touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(PY) -m app --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-deps
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest

bench: $(VENV)/.dev-deps
	$(PY) -m bench $(BENCH_ARGS)

lint: $(VENV)/.dev-deps
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/ruff format --check app tests bench
	$(VENV)/bin/mypy

format: $(VENV)/.dev-deps
	$(VENV)/bin/ruff format app tests bench
	$(VENV)/bin/ruff check --fix app tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

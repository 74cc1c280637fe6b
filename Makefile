# kanmoe: the two commands (`make serve`, `make test`) do all set-up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on local disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help venv install install-dev system-deps serve test test-reliability lint format bench bench-kan bench-onnx \
        bench-serve bench-explain bench-seq bench-triton paper-tables default-model export-default clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e '.[train,serve]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-dev
	$(PIP) install -q -e '.[dev,bench]'
	touch $@

venv install: $(VENV)/.installed  ## create .venv and install kanmoe with train+serve extras

install-dev: $(VENV)/.installed-dev  ## create .venv and install kanmoe with dev extras

# Debian tools the deployment tests run for real (promtool + a Prometheus server, compose
# config, haproxy -c), the serving benchmark's load generator, and the headless browser the
# model-card test renders in. CI installs them first.
SYSTEM_DEPS ?= prometheus docker-compose haproxy wrk chromium
system-deps:  ## apt-get install the Debian tools the tests and benchmarks use (root)
	@missing=""; for p in $(SYSTEM_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

serve: $(VENV)/.installed  ## serve the embedded default model on port 8000
	$(VENV)/bin/kanmoe serve --repository model_repository --port 8000

test: $(VENV)/.installed-dev  ## run the whole test suite (pytest exit code 5, no tests, fails)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-reliability: $(VENV)/.installed-dev  ## long service reliability run: 30 s at 10x capacity, 500 Hypothesis / 150 schemathesis cases per property / operation
	KANMOE_OVERLOAD_SECONDS=30 KANMOE_FUZZ_EXAMPLES=500 KANMOE_SCHEMATHESIS_EXAMPLES=150 \
		$(VENV)/bin/python -m pytest -q -s tests/test_service_fuzz.py tests/test_service_overload.py tests/test_service_faults.py $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev  ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: bench-kan bench-onnx bench-serve bench-explain  ## run every benchmark and update benchmarks/RESULTS.md

bench-kan: $(VENV)/.installed-bench  ## KAN layer speed vs efficient-kan-style baseline, pykan, kanditioned
	$(PY) benchmarks/kan_layers.py

bench-onnx: $(VENV)/.installed-dev  ## ONNX Runtime vs torch latency
	$(PY) benchmarks/onnx_runtime.py

bench-explain: $(VENV)/.installed-dev  ## what v1 "explain": true and the per-expert graph outputs cost (wrk, concurrency 1)
	@command -v wrk >/dev/null || $(MAKE) --no-print-directory system-deps SYSTEM_DEPS=wrk
	$(PY) benchmarks/explain_cost.py

bench-seq: $(VENV)/.installed-dev  ## sequence models on daily MSFT volume and synthetic regimes (3 seeds x 3 horizons; ~2 h on 2 cores)
	$(PY) benchmarks/sequences.py --lookback 24 --max-epochs 60

bench-serve: $(VENV)/.installed-dev  ## serving req/s and latency (wrk): kanmoe serve vs hand-written FastAPI+ORT and the HTTP floor
	@command -v wrk >/dev/null || $(MAKE) --no-print-directory system-deps SYSTEM_DEPS=wrk \
		|| echo "note: wrk could not be installed (apt-get install wrk); benchmarks/serving.py falls back to an httpx load generator"
	$(PY) benchmarks/serving.py

bench-triton: $(VENV)/.installed-dev  ## kanmoe serve vs Triton (+ FastAPI baseline, HTTP floor) at c=1/16/64/256: RESULTS.md, plots, py-spy profile
	$(PY) benchmarks/triton_peer.py setup --if-missing
	$(PY) benchmarks/triton_peer.py bench
	$(PY) benchmarks/triton_peer.py profile

paper-tables: $(VENV)/.installed-dev  ## reproduce the KAMoE paper's California Housing table (3 seeds)
	$(PY) benchmarks/paper_tables.py

default-model: $(VENV)/.installed  ## retrain the default KAMoE into default_run/ and export it
	$(VENV)/bin/kanmoe train --config configs/california_kamoe.yaml --out default_run
	$(MAKE) export-default

export-default: $(VENV)/.installed  ## export the committed default run into model_repository/
	$(VENV)/bin/kanmoe export default_run --repository model_repository --name california_kamoe --version 1 --check --force

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

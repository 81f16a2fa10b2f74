# The two set-up commands are `make install` and `make demo`; `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# The CPU build of torch that lies on this machine's disk; users install any torch>=2.7 themselves.
TORCH_PIN ?= torch==2.13.0
NPROC  ?= 2
DEMO_DIR ?= outputs/demo-llama

.PHONY: install test test-fast demo bench bench-scale gpu-check lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The default suite: lint and types first, then unit, multi-process, end-to-end and fault tests
# (slow ones included).
test: install lint
	$(PY) -m pytest -q -rs

# Quick loop while developing: everything not marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(BIN)/torchrun --standalone --nproc-per-node=$(NPROC) -m launcher.save +model=llama output.dir=$(abspath $(DEMO_DIR)) output.overwrite=replace
	$(BIN)/torchrun --standalone --nproc-per-node=1 -m launcher.load +model=llama source.path=$(abspath $(DEMO_DIR)) compare=random

bench: install
	$(PY) -m bench.run

bench-scale: install
	$(PY) -m bench.scale

# The whole GPU check on a CUDA machine (GPU tests, NCCL, CUDA async saves and their timing); within 8 minutes.
gpu-check: install
	$(PY) -m bench.gpu_check

# Style (ruff, no long-line exemption) and types (mypy); `make test` runs it first.
LINT_PATHS := hf_storage launcher tests bench examples
lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy hf_storage

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis

# The two set-up commands are `make install` and `make demo`; `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# The CPU build of torch that lies on this machine's disk; users install any torch>=2.7 themselves.
TORCH_PIN ?= torch==2.13.0
NPROC  ?= 2
DEMO_DIR ?= outputs/demo-llama

.PHONY: install test test-fast test-all demo bench bench-scale lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The default suite: unit, multi-process, end-to-end and fault tests (slow ones included).
test: install
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

lint: install
	$(BIN)/ruff check hf_storage launcher tests bench examples

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis

# `make run`: set up a virtual environment and run the pipeline on the debug preset.
# `make test`: set up the same environment and run the whole test suite.
# TORCH_SPEC pins torch before the project is installed: on a CPU-only machine with a local
# torch 2.13.0 CPU wheel pip takes that one; on a GPU machine the same pin installs the CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/debug.yaml
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: setup run test
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m dist_llama.pipeline --config $(CONFIG)

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

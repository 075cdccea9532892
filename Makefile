# `make run`: set up a virtual environment and run the pipeline on the debug preset.
# `make test`: set up the same environment and run the whole test suite.
# `make lint`: the formatter and linter (ruff, configured in pyproject.toml) check the code as it is.
# `make llama-cpp`: llama.cpp's llama-perplexity and llama-tokenize for tests/test_clients.py, from pinned
#   sources (PyPI's llama-cpp-python sdist), built once into ~/.cache/dist_llama (tools/llama_cpp.py; needs
#   cmake and g++).
# `make test-gpu-stack`: the release and client tests and the whole GPU session rehearsal in a second environment
#   that is the GPU machine's (launch/gpu_machine.txt, Python 3.12), with the bundle's wheels installed as the
#   session installs them: a version drift that would break the GPU run fails here.
# TORCH_SPEC pins torch before the project is installed: on a CPU-only machine with a local
# torch 2.13.0 CPU wheel pip takes that one; on a GPU machine the same pin installs the CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/debug.yaml
PY := $(VENV)/bin/python

# The GPU machine's stack. torch 2.11.0 from PyPI is a CUDA build (~4.6 GB with its CUDA libraries); it runs
# on this CPU too. A python3.12 that runs, else pyenv's newest 3.12.
PYTHON312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1) pyenv which python3.12 2>/dev/null)
STACK ?= .venv-gpu-stack
STACK_PY := $(STACK)/bin/python
STACK_SHARD ?= ../shared/data/owt/train/shard-00000.jsonl.zst

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(STACK)/.installed: pyproject.toml launch/gpu_machine.txt
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 2; }
	$(PYTHON312) -m venv $(STACK)
	$(STACK_PY) -m pip install -q -r launch/gpu_machine.txt
	grep '==' launch/gpu_machine.txt > $(STACK)/pins.txt
	# Test tools, not on the GPU machine (the tests build the tokenizer offline; the session reads the bundle's).
	$(STACK_PY) -m pip install -q -c $(STACK)/pins.txt pytest mistral-common
	$(STACK_PY) -m pip install -q --no-deps -e .
	touch $@

.PHONY: setup run test lint llama-cpp test-gpu-stack
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m dist_llama.pipeline --config $(CONFIG)

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=20

lint: $(VENV)/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

llama-cpp: $(VENV)/.installed
	$(PY) tools/llama_cpp.py build

# The bundle is built here as always (the default environment); one training shard is enough for the rehearsal.
test-gpu-stack: $(VENV)/.installed $(STACK)/.installed
	PYTHON=$(PY) launch/prepare_gpu_bundle.sh $(STACK)/bundle --train-data $(STACK_SHARD)
	$(STACK_PY) -m dist_llama.session install --bundle $(STACK)/bundle --target $(STACK)/bundle_site
	PYTHONPATH=$(abspath $(STACK))/bundle_site OMP_NUM_THREADS=1 $(STACK_PY) -m pytest -q -p no:cacheprovider \
		tests/test_release.py tests/test_clients.py
	rm -rf $(STACK)/rehearsal
	PYTHON=$(STACK_PY) launch/gpu_session.sh --rehearse --bundle $(STACK)/bundle --out $(STACK)/rehearsal/out \
		--work $(STACK)/rehearsal/work

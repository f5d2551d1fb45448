# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m hsd_serve.pb
	touch $@

demo: setup
	$(VENV)/bin/hsd-serve serve serve_config.yaml --once "def fib(n):"

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

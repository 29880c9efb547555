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

LOCK := requirements.lock

.PHONY: setup demo test test-slow lint lock clean

# Every worker installs the same versions: the lock is a pip constraints file (versions without
# local labels, so a CUDA build of the same torch satisfies it). `make lock` rewrites it from
# this environment after a dependency change; a test fails while the two disagree.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
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

lock: setup
	$(PY) -m pip install -q -e ".[dev]"
	{ echo "# quantmill's locked dependencies (pip constraints): make lock rewrites this file"; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(LOCK)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

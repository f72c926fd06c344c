# `make demo` and `make test` create .venv and install on first use (a no-op when up to date).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= demo_workdir
# Tests run on 2 workers; each JAX process is pinned to fewer threads so they do not fight.
PYTEST_WORKERS ?= 2

.PHONY: install test demo bench clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests

demo: $(STAMP)
	$(VENV)/bin/llava-jax demo --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) $(WORKDIR) build *.egg-info

# `make demo` and `make test` create .venv and install on first use (a no-op when up to date).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= demo_workdir
# Tests run on 2 workers (pytest-xdist), one test file per worker at a time (--dist loadfile), in
# collection order (--no-loadscope-reorder): tests/conftest.py puts the slowest files first.
PYTEST_WORKERS ?= 2
# pip byte-compiles every installed file (~17k, a third of a fresh install's time); instead,
# importing what the demo and CLI load (their lazy imports included) writes bytecode for just
# those modules; with PYTHONDONTWRITEBYTECODE set, as here, every later process would otherwise
# compile them again (~4 s each). The tests' torch and transformers models get theirs in a step
# of their own (24 s that `make demo`, which never imports torch, skips).
WARM_IMPORTS := import llava_jax.cli, llava_jax.demo.phases, llava_jax.demo.stage0, llava_jax.train.main, \
  llava_jax.infer.run, llava_jax.weights.convert, orbax.checkpoint, grain.python, matplotlib.pyplot, \
  huggingface_hub, transformers.utils.chat_template_utils; \
  from llava_jax.train import metrics; metrics.summary_writer_class()
WARM_TEST_IMPORTS := import torch; from transformers import LlavaForConditionalGeneration
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install test test-lmms-eval demo bench clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-compile --no-deps -e .
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "$(WARM_IMPORTS)"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "$(WARM_TEST_IMPORTS)"
	touch $(TEST_STAMP)

install: $(STAMP)

# tests/test_lmms_eval.py runs lmms-eval in a venv of its own (.venv-lmms-eval: ~4 min and 2.6 GB to build once,
# then ~1 min of test): `make test-lmms-eval`.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 --ignore tests/test_lmms_eval.py tests

test-lmms-eval: $(TEST_STAMP)
	$(PY) -m pytest -q tests/test_lmms_eval.py

demo: $(STAMP)
	$(VENV)/bin/llava-jax demo --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) .venv-lmms-eval $(WORKDIR) build *.egg-info

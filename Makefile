# Set-up, demo and tests. `make demo` and the test targets work on a fresh machine: they create
# .venv and install the package (the test targets add the test extra: CPU torch and transformers).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
STAMP  := $(VENV)/.installed-test
TBSTAMP := $(VENV)/.installed-tensorboard
# What `make tensorboard` serves (a parent directory shows each run below it).
LOGDIR ?= workdirs
# The tested versions of every dependency (see the file's header).
PIN    := -c constraints.txt

.PHONY: install demo test test-slow test-heavy test-all test-jax-next tensorboard clean

$(BASE): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -q $(PIN) -e '.[test]'
	touch $(STAMP)

install: $(BASE)

$(TBSTAMP): $(BASE)
	$(PY) -m pip install -q $(PIN) -e '.[tensorboard]'
	touch $(TBSTAMP)

# TensorBoard over the runs' event files (WORKDIR/tensorboard/): `make tensorboard LOGDIR=/tmp/run200`.
tensorboard: $(TBSTAMP)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

# Train a small model on the demo data (CPU, about two minutes), generate, answer held-out questions.
demo: $(BASE)
	$(PY) scripts/demo.py

# Test processes (pytest-xdist; each file runs whole in one of them, so its compiled fixtures are
# built once). They share one XLA compilation cache (tests/conftest.py).
WORKERS ?= 2
XDIST  := -n $(WORKERS) --dist loadfile --durations=15

# The default tier: parity with transformers, generation, data, trainer steps (a few minutes).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST) tests

# The end-to-end tier: notebook, kill -9 resume, multi-mesh and multi-process training, ablation runs.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not heavy" $(XDIST) tests

# The slow tests of minutes each, outside CI: the 270M fine-tune, the demo's accuracy, a 32K-token
# generation, the notebook's fresh-venv install, SIGTERM across two processes, variants of CI's runs.
test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy $(XDIST) tests

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests

# The default tier under the newer JAX of GPU images (jax 0.11.2, Python 3.12) in a scratch venv;
# not in CI (see scripts/test_jax_next.sh).
test-jax-next:
	bash scripts/test_jax_next.sh

clean:
	rm -rf $(VENV) .pytest_cache

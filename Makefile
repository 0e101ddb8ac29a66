PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch and torchvision pinned to the builds this project is tested with.
install: $(BIN)/python
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[tests]"

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/quickstart.py

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

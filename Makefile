PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# Every package at the version in constraints.txt: the versions the suite and README's demo output were run with.
install: $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e ".[tests]"

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/quickstart.py

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv inside the repo on first use; torch==2.13.0 goes in first so pip
# keeps the CPU build and never pulls a CUDA one.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/graphopt demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info

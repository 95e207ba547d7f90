# `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the pinned torch==2.13.0 goes in first, so nothing after it can pull a different build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo --output_dir runs/demo

test: $(STAMP)
	$(BIN)/ruff check posttrain tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check posttrain tests benchmarks

clean:
	rm -rf $(VENV) runs

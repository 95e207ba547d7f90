# `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

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

# posttrain against TRL (benchmarks/vs_trl.py): every stage, both shapes, JSON in runs/bench/ (long: hours on a 2-core CPU)
BENCH_THREADS ?= 1
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	mkdir -p runs/bench
	for shape in tiny medium; do for stage in sft rm dpo grpo; do \
		$(BIN)/python benchmarks/vs_trl.py $$stage --shape $$shape --threads $(BENCH_THREADS) \
			--output runs/bench/$$stage-$$shape.json || exit 1; \
	done; done

lint: $(STAMP)
	$(BIN)/ruff check posttrain tests benchmarks

clean:
	rm -rf $(VENV) runs

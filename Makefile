# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-full lint bench-zoo clean-venv fuzz

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -e ".[cpu,vision,data,plot,bench,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/graphmerge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not known_gaps"

test-full: $(STAMP)
	GRAPHMERGE_FULL_ZOO=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not known_gaps" --hypothesis-profile=thorough

lint: $(STAMP)
	$(BIN)/ruff check graphmerge passes tests benchmarks

bench-zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo.py

clean-venv:
	rm -rf $(VENV)

# Random architectures with fresh seeds and many examples: run before finishing a change to a pass.
# No per-test timeout: one hypothesis test runs all its examples (10,000 take well over the suite's 20 minutes).
FUZZ_EXAMPLES ?= 10000
fuzz: $(STAMP)
	GRAPHMERGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_invariants.py tests/test_random_transformers.py \
		-k "random_architectures or random_transformers" \
		--hypothesis-profile=fuzz --hypothesis-seed=$${SEED:-$$(date +%s)} --hypothesis-show-statistics \
		-o addopts="" -s --timeout=0

# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-full lint bench-zoo clean-venv

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -e ".[cpu,vision,data,plot,bench,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/graphmerge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-full: $(STAMP)
	GRAPHMERGE_FULL_ZOO=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup --hypothesis-profile=thorough

lint: $(STAMP)
	$(BIN)/ruff check graphmerge passes tests benchmarks

bench-zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo.py

clean-venv:
	rm -rf $(VENV)

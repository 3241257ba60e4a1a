# One-command entry points. Every target creates its own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data

.PHONY: run test typecheck install clean bench bench-quick

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make run: start the demo (switch + mock issuers + fixture of protocol §14) in the foreground
run: $(STAMP)
	$(BIN)/switch demo --data-dir $(DATA)

## make test: type check (mypy --strict on switch/) and the whole suite
test: typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/mypy

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

## make bench: the full bench suite (results under bench/results/)
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --full

## make bench-quick: a ~45-second run ending with the one-line summary a release check reads
bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache

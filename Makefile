# One-command entry points. Every target creates its own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data

.PHONY: run test typecheck install clean

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

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache

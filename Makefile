# One-command entry points. Every target creates its own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make run: start the demo (switch + mock issuers + fixture of protocol §14) in the foreground
run: $(STAMP)
	$(BIN)/switch demo --data-dir $(DATA)

## make test: the whole suite
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache

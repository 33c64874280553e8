# Quick start: `make train` (venv + install + default detection run), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) train.py task=detection $(ARGS)

test: install
	$(PY) -m pytest tests $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/detection_speed.py $(ARGS)

clean:
	rm -rf outputs .cache .pytest_cache .ruff_cache

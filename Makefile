VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint test bench

install:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -e '.[dev]'

lint:
	$(VENV)/bin/ruff check .

test:
	$(PY) -m pytest

bench:
	$(PY) -m benchmarks

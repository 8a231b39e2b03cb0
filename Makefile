# Two commands on a fresh machine (only Python and pip assumed):
#   make demo   -- the main job: train a SkipNet on Fashion-MNIST, evaluate it, write its report
#   make test   -- lint + the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo lint install bench

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest

demo: install
	bash scripts/ensure-fashion-mnist.sh
	$(BIN)/skipnet demo

# Each target sets up its own .venv so that a fresh clone needs only Python 3.11.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,torch]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check kt tests bench examples
	$(BIN)/ruff format --check kt tests bench examples
	$(BIN)/mypy kt

test: lint
	$(BIN)/python -m pytest -n 2 tests

demo: $(STAMP)
	$(BIN)/python examples/rl_grpo/train.py --task sort --steps 400 --min-exact 0.8 --max-overhead 0.15

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

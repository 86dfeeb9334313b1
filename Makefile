# Each target sets up its own .venv so that a fresh clone needs only Python 3.11.
# The venv holds exactly what requirements.lock names (pinned, hash-checked); `make lock`
# regenerates it from pyproject.toml's ranges (and bench/ray.lock, Ray's side of the
# benchmark, from bench/ray.in); `make test-latest` tries the newest releases the ranges
# admit.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS := dev,torch,examples
PIP_TOOLS := pip-tools==7.6.2

.PHONY: install test lint demo bench lock test-latest clean

# A changed lock rebuilds the venv from scratch: nothing the old lock installed stays.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
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

# pip-tools resolves with pip itself, so it sees the same indexes and the CPU torch wheel
# that `pip install` takes from local disk (uv would not look there).
lock:
	test -x .venv-lock/bin/pip-compile || ($(PY) -m venv .venv-lock && \
		.venv-lock/bin/python -m pip install -q $(PIP_TOOLS))
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-find-links --no-emit-index-url \
		--extra dev --extra torch --extra examples -o $(LOCK) pyproject.toml
	cd bench && ../.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
		--strip-extras --no-emit-find-links --no-emit-index-url -o ray.lock ray.in

# The newest releases pyproject.toml admits, in a venv of their own, no cache: finds the
# next upstream break before a new user does. Run on demand, not in CI.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	PIP_NO_CACHE_DIR=1 .venv-latest/bin/python -m pip install -q --upgrade pip
	PIP_NO_CACHE_DIR=1 .venv-latest/bin/python -m pip install -q --upgrade \
		--upgrade-strategy eager -e '.[$(EXTRAS)]'
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -n 2 -p no:cacheprovider --ignore tests/test_lock.py tests

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .mypy_cache .ruff_cache .pytest_cache

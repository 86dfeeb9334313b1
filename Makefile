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

.PHONY: install test lint demo bench lock test-gpu gpu-wheels test-latest mutate clean

# A changed lock rebuilds the venv from scratch: nothing the old lock installed stays.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check kt tests bench examples tools
	$(BIN)/ruff format --check kt tests bench examples tools
	$(BIN)/mypy kt

test: lint
	$(BIN)/python -m pytest -n 2 tests

# The tests marked gpu (tests/gpu): they need a CUDA build of torch, which the lock's
# CPU wheel is not. On a GPU machine install one into .venv first, or run
# `python -m pytest -m gpu tests` with a Python that has one and kt's other
# dependencies. Elsewhere they skip, saying why.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -p no:xdist tests

# What the GPU machine's python (3.12, a CUDA torch, most of kt's needs) lacks, as the
# lock's wheels in .whl/, for tools/gpu_check.sh to install there.
GPU_WHEELS = orjson starlette uvicorn
gpu-wheels:
	rm -rf .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $$(for p in $(GPU_WHEELS); do grep -oE "^$$p==[^ ]+" $(LOCK); done)

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
		--extra dev --extra torch --extra examples --extra k8s -o $(LOCK) pyproject.toml
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

# Mutation testing with cosmic-ray, on demand (never in `make test`). cosmic-ray changes
# the files on disk, so a mutant is seen by every process a test starts -- supervisors,
# zygote-forked workers, ranks -- where most of kt runs; it works on a copy of HEAD in
# .mutate/, and `exec` resumes an interrupted session. Each surviving mutant pays for
# the whole test command: a slice (MUTATE_MODULES=kt/core/ref.py
# MUTATE_TESTS=tests/core/test_ref.py) takes minutes, the default scope many hours.
# Mutants come from HEAD (commit first); rm -rf .mutate to start a new session.
# MUTATE_SAMPLE=N runs a random N of them (tools/mutate_sample.py; MUTATE_SEED picks which).
MUTATE_TOOL := cosmic-ray==8.7.0
MUTATE_MODULES ?= kt/core kt/actors kt/supervisor
MUTATE_TESTS ?= tests/core tests/supervisor tests/e2e/test_actors.py tests/e2e/test_first_day.py \
	tests/e2e/test_ownership.py
MUTATE_TIMEOUT ?= 600
MUTATE_TEST_TIMEOUT ?= 30  # per test: a mutant that hangs a test is caught, not waited out
MUTATE_SAMPLE ?=
MUTATE_SEED ?= 0

mutate: $(STAMP)
	test -x .venv-mutate/bin/cosmic-ray || ($(PY) -m venv .venv-mutate && \
		.venv-mutate/bin/python -m pip install -q $(MUTATE_TOOL))
	test -f .mutate/session.sqlite || ( \
		rm -rf .mutate && mkdir .mutate && git archive HEAD | tar -x -C .mutate && \
		$(BIN)/python -c 'import json, sys; print("[cosmic-ray]\nmodule-path = %s\ntimeout = %s\nexcluded-modules = []\ntest-command = %s\n\n[cosmic-ray.distributor]\nname = \"local\"" % (json.dumps(sys.argv[3].split()), sys.argv[2], json.dumps(sys.argv[1] + " -m pytest -x -q -p no:cacheprovider -o timeout_method=thread --timeout " + sys.argv[5] + " " + sys.argv[4])))' \
			"$(CURDIR)/$(BIN)/python" "$(MUTATE_TIMEOUT)" "$(MUTATE_MODULES)" "$(MUTATE_TESTS)" \
			"$(MUTATE_TEST_TIMEOUT)" \
			> .mutate/cosmic-ray.toml && \
		cd .mutate && ../.venv-mutate/bin/cosmic-ray init cosmic-ray.toml session.sqlite && \
		if [ -n "$(MUTATE_SAMPLE)" ]; then ../.venv-mutate/bin/python \
			$(CURDIR)/tools/mutate_sample.py sample session.sqlite $(MUTATE_SAMPLE) $(MUTATE_SEED); fi)
	cd .mutate && ../.venv-mutate/bin/cosmic-ray exec cosmic-ray.toml session.sqlite
	.venv-mutate/bin/python tools/mutate_sample.py score .mutate/session.sqlite

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .venv-mutate .mutate .mypy_cache .ruff_cache .pytest_cache

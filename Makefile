# packserve: `make run` (local server) and `make test` (whole suite) work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-test

.PHONY: test run lint typecheck imports unit venv redis-server bench clean

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing packserve with test extras"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

# Tests start their own redis-server on a free port; they only need the binary.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || sh scripts/install-redis.sh

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy policies cluster serve_apps tests bench

imports: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP) redis-server
	$(BIN)/pytest

test: $(STAMP) redis-server lint typecheck imports unit

bench: $(STAMP) redis-server
	$(BIN)/python bench/admission.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

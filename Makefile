# The two commands of the README, plus a few conveniences.
#   make run    set up .venv if needed, then execute every notebook (PROFILE=smoke|workshop|full)
#   make test   set up .venv if needed, then run the whole test suite
#   make lab    JupyterLab with the project's environment

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= workshop
STAMP := $(VENV)/.installed

# Huge pages for PyTorch's large tensor allocations: measured on the project's
# 2-core machines to roughly halve CPU training-step times for 3D models.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# Notebooks and subprocesses find the project's Python first.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONDONTWRITEBYTECODE := 1
# pip prints one warning per package about an optional local index; hide only those lines.
PIP_FILTER := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: help setup run test lint lab browser clean

help:
	@echo "make run   [PROFILE=smoke|workshop|full]  execute every notebook into outputs/"
	@echo "make test                                 run the whole test suite"
	@echo "make lab                                  open JupyterLab with the project environment"
	@echo "make lint                                 ruff over helpers, tests and notebooks"

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else print(f"Note: the pinned environment is tested on Python 3.11; this is {v[0]}.{v[1]}."))' || true
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned environment into $(VENV) (first time: about 2 minutes)..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt 2>&1 | $(PIP_FILTER)
	@$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | $(PIP_FILTER)
	@touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the real-browser widget test; installed only where we can (root + apt).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's chromium for the browser test..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "Could not install chromium; the browser test will say how to enable it."; \
	else echo "No /usr/bin/chromium and no root apt-get: the browser test will be skipped."; fi

run: $(STAMP)
	$(PY) -m helpers.series --profile $(PROFILE)

test: $(STAMP) browser
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check helpers tests notebooks benchmarks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf outputs test-artifacts .pytest_cache .ruff_cache

# Two entry points: `make demo` runs the main job on the embedded default; `make test` runs the suite.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# The machine's pip config adds local indexes; their "is ignored" warnings are noise.
	$(VPY) -m pip install -q -e ".[test]" 2>&1 | { grep -v "is ignored" || true; }
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline models jobs bench tests
	$(VENV)/bin/lint-imports

test: $(STAMP)
	$(VENV)/bin/ruff check pipeline models jobs bench tests
	$(VENV)/bin/lint-imports
	$(VPY) -m pytest -q

demo: $(STAMP)
	$(VPY) jobs/demo.py

clean:
	rm -rf data runs mlflow.db ray_tmp

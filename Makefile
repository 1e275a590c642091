# Two entry points: `make demo` runs the main job on the embedded default; `make test` runs the suite.
# `make stack-demo` runs it on the production stack (`stack-up` / `stack-down` keep one running).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-stack lint demo stack-up stack-down stack-demo clean

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
	$(VPY) -m pytest -q -m "not stack" -n 2 --dist loadgroup --no-loadscope-reorder --durations=25

# The production stack's full end-to-end test (four servers, four Ray jobs: ~14 min on 2 cores)
# and the MLflow server alone, kept out of `make test`'s 15-minute budget; `make test` runs the
# tiny version of the stack's path on the same servers (tests/pipeline/stack/test_stack_tiny.py).
test-stack: $(STAMP)
	$(VPY) -m pytest -q -m stack

demo: $(STAMP)
	$(VPY) jobs/demo.py

# The production stack on one machine (SeaweedFS, PostgreSQL + MLflow server, two Ray nodes),
# all on 127.0.0.1; state, logs and data under runs/stack. `stack-demo` brings it up (or uses
# the running one), runs ingest / training / retraining / batch inference as Ray jobs on it,
# prints one JSON line and stops what it started.
stack-up: $(STAMP)
	$(VPY) jobs/stack.py up

stack-down: $(STAMP)
	$(VPY) jobs/stack.py down

stack-demo: $(STAMP)
	$(VPY) jobs/stack_demo.py

clean:
	rm -rf data runs mlflow.db ray_tmp

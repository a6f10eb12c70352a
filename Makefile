# Entry points for newcomers, CI and benchmarks. Everything installs what it needs by itself.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ROWS ?= 200000
PYTEST_ARGS ?=

.PHONY: venv test test-slow lint demo demo-stop status bench bench-smoke emulator seed constraints clean

# Re-created whenever a requirements or constraints file changes.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The reliability scenarios under a real executor (airflow standalone: worker SIGKILL, emergency stop); minutes.
test-slow: $(STAMP)
	SCENARIOS_REAL_EXECUTOR=1 $(PY) -m pytest tests/scenarios -m real_executor $(PYTEST_ARGS)

demo: $(STAMP)
	ROWS=$(ROWS) bash include/scripts/demo.sh

demo-stop:
	bash include/scripts/demo.sh stop

status: $(STAMP)
	$(PY) -m include.status

bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(PY) -m bench.run --smoke

emulator: $(STAMP)
	$(PY) -m emulator serve --data-dir .demo/emulator

seed: $(STAMP)
	$(PY) -m emulator seed --data-dir .demo/emulator --records $(ROWS)

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .airflow_test_home

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

# Only the reliability scenarios under a real executor (airflow standalone: worker SIGKILL, emergency stop); ~75 s.
test-slow: $(STAMP)
	SCENARIOS_REAL_EXECUTOR=1 $(PY) -m pytest tests/scenarios -m real_executor $(PYTEST_ARGS)

# The real DAG on a distributed Airflow: CeleryExecutor with two workers, api-server, scheduler, dag-processor and
# triggerer as separate processes, metadata DB and Celery results on PostgreSQL, broker on Redis (both from Debian's
# packages, installed when missing, run on free 127.0.0.1 ports under .distributed/). A few minutes.
.PHONY: test-distributed
DIST_STAMP := $(VENV)/.installed-distributed

# The Celery/PostgreSQL extras on top of the base install; constraints-distributed.txt only adds pins.
$(DIST_STAMP): $(STAMP) requirements-distributed.txt constraints-distributed.txt
	@start=$$(date +%s); \
	$(PY) -m pip install --quiet -c constraints.txt -c constraints-distributed.txt -r requirements-distributed.txt && \
	echo "[distributed] Python extras installed in $$(( $$(date +%s) - start ))s"
	@touch $@

test-distributed: $(DIST_STAMP)
	bash include/scripts/distributed_deps.sh
	DISTRIBUTED=1 $(PY) -m pytest tests/distributed -v -s $(PYTEST_ARGS)

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

# The base pins only: packages pinned by constraints-distributed.txt (installed by test-distributed) stay out.
constraints: $(STAMP)
	(grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable | $(PY) -c "import sys; extra = {l.split('==')[0].lower() \
	  for l in open('constraints-distributed.txt') if '==' in l}; sys.stdout.writelines(l for l in sys.stdin \
	  if l.split('==')[0].lower() not in extra)") > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .airflow_test_home

"""Fixtures of the reliability scenarios: one seeded emulator, one Airflow DB and the real DAG for the package.

The data set is small (4,000 rows, 12 rows Salesforce rejects, 3 without an external id) so that each scenario's
whole DAG run takes seconds. Task retry delays are cut to one second: a scenario that makes a task fail
exercises Airflow's retry (and the ledger's resume) without waiting minutes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from emulator.harness import EmulatorProcess
from tests.e2e_support import airflow_for, load_dag

RECORDS = 4_000
ACCOUNTS = 60
BAD_ROWS = 12
NULL_KEYS = 3
EXPECTED_FAILED = BAD_ROWS + NULL_KEYS
#: Profile knobs that ``clear_faults`` leaves alone; every scenario starts from these.
BASELINE_KNOBS = {"session_lifetime_s": 7200.0, "per_record_ms": 0.0, "time_scale": 1.0, "dc_result_ttl_s": 86400.0,
                  "lock_contention_rate": 0.0, "fail_job_after_records": 0}


@pytest.fixture(scope="package")
def scen_org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    data_dir = tmp_path_factory.mktemp("scen_org")
    proc = EmulatorProcess(data_dir)
    proc.seed(records=RECORDS, accounts=ACCOUNTS, random_seed=23, bad_rows=BAD_ROWS, null_keys=NULL_KEYS)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="package")
def scen_airflow(scen_org: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with airflow_for(scen_org, tmp_path_factory.mktemp("scen_airflow")) as work:
        yield work


@pytest.fixture(scope="package")
def scen_dag(scen_airflow: Path) -> Any:
    dag = load_dag()
    # Retries stay as configured (3); only their delay shrinks so dag.test() does not wait minutes.
    for task in dag.tasks:
        if hasattr(task, "partial_kwargs"):
            task.partial_kwargs.update(retry_delay=timedelta(seconds=1), retry_exponential_backoff=0)
        else:
            task.retry_delay = timedelta(seconds=1)
            task.retry_exponential_backoff = 0
    return dag


@pytest.fixture
def org(scen_org: EmulatorProcess, scen_airflow: Path) -> Iterator[EmulatorProcess]:
    """No Opportunities, no faults, zero stats, baseline timings (Accounts and Data Cloud stay as seeded)."""
    scen_org.reset()
    scen_org.set_faults(**BASELINE_KNOBS)
    yield scen_org
    if scen_org.proc is not None:
        scen_org.clear_faults()
        scen_org.set_faults(**BASELINE_KNOBS)


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """Per-scenario figures (rows checked, faults injected, rows lost) for RELIABILITY.md.

    Written as JSON to ``$SCENARIO_FIGURES`` when set, else next to pytest's temp dirs, and printed.
    """
    rows: list[dict[str, Any]] = []
    yield rows
    if rows:
        path = Path(os.environ.get("SCENARIO_FIGURES") or tmp_path_factory.getbasetemp() / "scenario_figures.json")
        path.write_text(json.dumps(rows, indent=2))
        print(f"\nscenario figures: {path}\n" + "\n".join(json.dumps(r) for r in rows))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_executor: runs airflow standalone (part of `make test`; `make test-slow` "
                                       "runs only these; SCENARIOS_REAL_EXECUTOR=0 skips them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``SCENARIOS_REAL_EXECUTOR=0`` skips the real-executor scenarios (about 2 minutes) in a quick local run."""
    if os.environ.get("SCENARIOS_REAL_EXECUTOR") != "0":
        return
    skip = pytest.mark.skip(reason="real-executor scenario skipped: SCENARIOS_REAL_EXECUTOR=0")
    for item in items:
        if item.get_closest_marker("real_executor") is not None:
            item.add_marker(skip)

"""The DAG parses cleanly, cheaply and the way the team's conventions and Airflow's pitfalls demand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "datacloud_opportunity_sync.py"
DAG_ID = "datacloud_opportunity_sync"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags[DAG_ID]  # not get_dag(): that queries the metadata database


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert DAG_ID in dagbag.dags


def test_schedule_and_run_settings(dag) -> None:
    assert dag.schedule == "0 2 * * *"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.render_template_as_native_obj is True
    assert {"salesforce", "data-cloud"} <= set(dag.tags)
    assert dag.owner == "data-engineering"
    for heading in ("#### Params", "#### Restart one partition", "#### Where failed rows are"):
        assert heading in dag.doc_md
    assert dag.on_failure_callback


def test_shape(dag) -> None:
    assert set(dag.task_ids) == {"discover", "load_partition", "verify"}
    assert dag.get_task("load_partition").upstream_task_ids == {"discover"}
    assert dag.get_task("verify").upstream_task_ids == {"load_partition"}


def test_every_task_retries_with_exponential_backoff(dag) -> None:
    for task in dag.tasks:
        assert task.retries >= 2, task.task_id
        assert task.retry_exponential_backoff == 2.0, task.task_id
        assert task.owner == "data-engineering"


def test_verify_runs_when_partitions_failed(dag) -> None:
    assert dag.get_task("verify").trigger_rule == "all_done"


def test_load_partition_is_mapped_named_and_pooled(dag) -> None:
    load = dag.get_task("load_partition")
    assert load.is_mapped
    assert load.map_index_template == "{{ task.partition_label }}"
    assert load.pool == "salesforce_bulk"
    assert load.pool_slots == 1
    assert load.max_active_tis_per_dagrun == 16
    kwargs = load.partial_kwargs
    assert kwargs["max_records_per_job"] == "{{ params.max_records_per_job }}"
    assert kwargs["dry_run"] == "{{ params.dry_run }}"
    assert load.retry_delay == timedelta(minutes=2)


def test_load_retry_delay_is_overridable_at_parse_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SYNC_LOAD_RETRY_DELAY_S`` (the real-executor scenarios use 1 s) sets load_partition's first retry delay."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("SYNC_LOAD_RETRY_DELAY_S", "1")
    load = DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID].get_task("load_partition")
    assert load.retry_delay == timedelta(seconds=1)
    assert load.retries == 3 and load.retry_exponential_backoff == 2.0  # only the delay changes


def test_deadline_alert(dag) -> None:
    from airflow.sdk import AsyncCallback, DeadlineReference

    alert = dag.deadline[0] if isinstance(dag.deadline, list) else dag.deadline
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert alert.interval == timedelta(hours=4)
    assert isinstance(alert.callback, AsyncCallback)
    assert alert.callback.path == "sf_datacloud_sync.callbacks.deadline_missed"


def test_param_defaults_validate(dag) -> None:
    values = dag.params.validate()
    assert values == {"partitions": 15, "target_partition_rows": None, "partition_key": "account",
                      "max_records_per_job": 100_000, "dry_run": False, "tolerance": 0, "partitions_per_task": 5}
    for name, param in dag.params.items():
        p = dag.params.get_param(name)
        assert p.schema.get("title") and p.description, name
        del param


@pytest.mark.parametrize(("name", "value"), [
    ("partitions", 0), ("partitions", 1024), ("partitions", "ten"),
    ("target_partition_rows", 0), ("partition_key", "owner"),
    ("max_records_per_job", 0), ("max_records_per_job", 150_000_001),
    ("dry_run", "yes"), ("tolerance", -1),
])
def test_invalid_params_are_rejected(dag, name: str, value: object) -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(dag.params)
    with pytest.raises(ParamValidationError):
        params[name] = value
        params.validate()


@pytest.mark.parametrize(("name", "value"), [("partitions", 1), ("partitions", 1023), ("target_partition_rows", 5),
                                             ("partition_key", "external_id"), ("dry_run", True),
                                             ("tolerance", 25), ("max_records_per_job", 150_000_000)])
def test_valid_params_are_accepted(dag, name: str, value: object) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dag.params)
    params[name] = value
    assert params.validate()[name] == value


PARSE_PROBE = r"""
import builtins, io, json, socket, sys, time, importlib.util
import airflow.sdk  # Airflow's own import cost is not the DAG's (croniter even runs `file` on import)
import croniter, pendulum
baseline = set(sys.modules)
opened = []
real_open = builtins.open
def tracking_open(file, *args, **kwargs):
    opened.append(str(file))
    return real_open(file, *args, **kwargs)
def no_network(*args, **kwargs):
    raise AssertionError("the DAG file opened a network connection at parse time")
builtins.open = io.open = tracking_open
socket.socket.connect = no_network
socket.create_connection = no_network
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
t0 = time.perf_counter()
spec.loader.exec_module(module)
seconds = time.perf_counter() - t0
builtins.open = io.open = real_open
print(json.dumps({"seconds": seconds, "new_modules": sorted(set(sys.modules) - baseline),
                  "opened": [f for f in opened if not f.endswith((".py", ".pyc"))]}))
"""


@pytest.fixture(scope="module")
def parse_probe() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(DAG_FILE)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parsing_reads_no_files(parse_probe: dict) -> None:
    assert parse_probe["opened"] == []
    assert "yaml" not in {m.split(".")[0] for m in parse_probe["new_modules"]}


def test_parsing_imports_no_heavy_modules(parse_probe: dict) -> None:
    heavy = {"pandas", "numpy", "simple_salesforce", "requests"}
    assert heavy & {m.split(".")[0] for m in parse_probe["new_modules"]} == set()


def test_parsing_is_fast(parse_probe: dict) -> None:
    assert parse_probe["seconds"] < 2.0

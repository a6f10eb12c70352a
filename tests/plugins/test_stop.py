"""Emergency stop in the windows where neither the operator's nor the trigger's ``on_kill`` runs.

1. Handing over (RELIABILITY.md, scenario 8): the run is marked failed after ``load_partition`` closed its last Bulk
   job and before the server accepted ``self.defer()``. Airflow 3.3.2 refuses the deferral with 409, the task
   runner logs the refusal and exits as if deferred. Reproduced deterministically with Airflow's own task runner
   and supervisor (``run_task_in_process``: ``run()`` → ``DeferTask`` → ``finalize()``), the real operator, its
   ledger and the emulator. Only the execution API is a stand-in (an ``httpx.MockTransport``): it marks the task
   instance failed at the moment the deferral arrives and answers as the real one does (``409 invalid_state``).
2. Just deferred, trigger not started: the API server's listener aborts the jobs from the stored ledger.
"""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulator.harness import EmulatorProcess
from sf_datacloud_sync.utils.ledger import LEDGER_KEY
from sf_datacloud_sync.utils.partitions import Partition
from tests.e2e_support import environ, write_settings

DAG_ID = "datacloud_opportunity_sync_stop_test"
RUN_ID = "manual__2026-11-28T02:00:00+00:00"
# ~900 rows of the session's seed in 3 jobs of 300.
PARTITION = Partition(index=3, count=10, key="external_id", lower="OPP-0000100000", upper="OPP-0000100900")
OPEN_STATES = ("Open", "UploadComplete", "InProgress")


class ExecutionApi:
    """The few execution-API routes one task attempt uses, with the server's answers; ``on_defer`` decides what a
    person did meanwhile."""

    def __init__(self, ti_id: uuid.UUID, on_defer: str) -> None:
        self.ti_id = ti_id
        self.on_defer = on_defer  # "mark_failed": the run is marked failed first; "accept": nothing happens
        self.state = "queued"
        self.store: dict[str, Any] = {}
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        response = self._route(request)
        self.calls.append((request.method, request.url.path, response.status_code))
        return response

    def _route(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if method == "PATCH" and path == f"/task-instances/{self.ti_id}/run":
            self.state = "running"
            return httpx.Response(200, json=self._run_context())
        if method == "PATCH" and path == f"/task-instances/{self.ti_id}/state":
            wanted = json.loads(request.content)["state"]
            if wanted == "deferred" and self.on_defer == "mark_failed":
                # PATCH /api/v2/dags/{dag}/dagRuns/{run} {"state": "failed"} landed just before this request.
                self.state = "failed"
            if self.state != "running":  # api_fastapi/execution_api/routes/task_instances.py, ti_update_state
                return httpx.Response(409, json={"detail": {
                    "reason": "invalid_state", "previous_state": self.state,
                    "message": "TI was not in the running state so it cannot be updated"}})
            self.state = wanted
            return httpx.Response(204)
        if method == "GET" and path == "/task-instances/states":
            return httpx.Response(200, json={"task_states": {RUN_ID: {"load_partition": self.state}}})
        if path.startswith(f"/store/ti/{self.ti_id}/"):
            key = path.rsplit("/", 1)[1]
            if method == "PUT":
                self.store[key] = json.loads(request.content)["value"]
                return httpx.Response(204)
            if key in self.store:
                return httpx.Response(200, json={"value": self.store[key]})
            return httpx.Response(404, json={"detail": {"reason": "not_found"}})
        if re.fullmatch(rf"/task-instances/{self.ti_id}/(rtif|rendered-map-index)", path):
            return httpx.Response(201, json={"message": "ok"})
        return httpx.Response(404, json={"detail": f"not part of this stand-in: {method} {path}"})

    def _run_context(self) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {"dag_run": {"dag_id": DAG_ID, "run_id": RUN_ID, "logical_date": now, "data_interval_start": now,
                            "data_interval_end": now, "run_after": now, "start_date": now, "end_date": None,
                            "run_type": "manual", "state": "running", "conf": {}, "consumed_asset_events": [],
                            "partition_key": None},
                "max_tries": 3, "variables": [], "connections": [], "xcom_keys_to_clear": [], "should_retry": True}


def bulk_jobs(org: EmulatorProcess) -> dict[str, str]:
    with sqlite3.connect(f"file:{org.data_dir / 'org.sqlite'}?mode=ro", uri=True, timeout=30) as db:
        return dict(db.execute("SELECT id, state FROM bulk_jobs"))


@pytest.fixture
def slow_org(clean_emulator: EmulatorProcess, tmp_path: Path) -> Iterator[EmulatorProcess]:
    """Salesforce queues every closed job for 2 minutes: all are still running when the task hands over.

    (Queued rather than slow: the emulator's reset waits for a batch in flight, not for a queued job.)
    """
    clean_emulator.control("PUT", "profile", {"name": "instant", "job_dequeue_delay_s": 120})
    env = {"AIRFLOW_CONN_SALESFORCE_DEFAULT": clean_emulator.info["airflow_conn"],
           "SYNC_CONFIG_PATH": str(write_settings(tmp_path / "sync_config.yaml", wait_before_defer_s=0)),
           "SYNC_ARTIFACTS_URL": f"file://{tmp_path}/artifacts"}
    try:
        with environ(**env):
            yield clean_emulator
    finally:
        clean_emulator.control("PUT", "profile", {"name": "instant"})
        from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
        from sf_datacloud_sync.stop import abort_jobs

        with environ(**env):  # leave no job running in the session's emulator
            hook = SalesforceBulk2Hook()
            abort_jobs(hook, [j for j, s in bulk_jobs(clean_emulator).items() if s in OPEN_STATES])
            hook.close()


def run_attempt(on_defer: str) -> tuple[Any, ExecutionApi]:
    """One ``load_partition`` attempt through Airflow's in-process task runner and supervisor."""
    import pendulum
    from airflow.sdk import DAG
    from airflow.sdk.api.datamodels._generated import TaskInstance
    from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor, run_task_in_process

    from sf_datacloud_sync.operators.load_partition import LoadPartitionOperator

    with DAG(DAG_ID, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        op = LoadPartitionOperator(task_id="load_partition", partition=PARTITION.to_dict(), max_records_per_job=300)
    ti_id = uuid.uuid4()
    api = ExecutionApi(ti_id, on_defer)
    # dry_run only selects "no real server"; the transport given here answers instead of the no-op one.
    client = InProcessTestSupervisor._Client(base_url=None, dry_run=True, token="", transport=httpx.MockTransport(api))
    ti = TaskInstance(id=ti_id, task_id="load_partition", dag_id=DAG_ID, run_id=RUN_ID, try_number=1, map_index=-1,
                      dag_version_id=uuid.uuid4())
    return run_task_in_process(ti=ti, task=op, client=client), api


def test_marked_failed_while_handing_over_aborts_every_open_job(slow_org: EmulatorProcess) -> None:
    from airflow.sdk.execution_time.comms import DeferTask

    result, api = run_attempt(on_defer="mark_failed")

    # The window really happened: the runner sent DeferTask, the server refused it (twice: the supervisor replays
    # an undelivered terminal state once), and the runner ended believing it had deferred.
    assert isinstance(result.msg, DeferTask) and result.state == "deferred", result
    refusals = [c for c in api.calls if c[1].endswith("/state") and c[2] == 409]
    assert refusals, api.calls
    ledger = api.store[LEDGER_KEY]
    job_ids = list(ledger["jobs"])
    assert len(job_ids) == 3 and ledger["stream"]["done"], ledger  # every chunk was uploaded and closed
    # Every job of the partition was aborted by the end-of-attempt guard; none runs on at Salesforce.
    jobs = bulk_jobs(slow_org)
    assert {jobs[j] for j in job_ids} == {"Aborted"}, jobs
    assert not [j for j, s in jobs.items() if s in OPEN_STATES], jobs


def test_accepted_deferral_leaves_the_jobs_to_the_trigger(slow_org: EmulatorProcess) -> None:
    result, api = run_attempt(on_defer="accept")

    assert result.state == "deferred" and api.state == "deferred"
    job_ids = list(api.store[LEDGER_KEY]["jobs"])
    jobs = bulk_jobs(slow_org)
    assert len(job_ids) == 3 and all(jobs[j] in ("UploadComplete", "InProgress") for j in job_ids), jobs


def test_abort_jobs_ignores_jobs_that_already_finished(clean_emulator: EmulatorProcess) -> None:
    """Salesforce answers 400 INVALIDJOBSTATE to aborting a finished job: reported, not raised."""
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
    from sf_datacloud_sync.stop import abort_jobs

    with environ(AIRFLOW_CONN_SALESFORCE_DEFAULT=clean_emulator.info["airflow_conn"]):
        hook = SalesforceBulk2Hook()
        done = hook.create_ingest_job("Opportunity", "upsert", "ExternalId__c")["id"]
        hook.abort_job(done)
        open_ = hook.create_ingest_job("Opportunity", "upsert", "ExternalId__c")["id"]
        outcome = abort_jobs(hook, [done, open_, "750000000000000AAA"], label="P00")
        hook.close()
    assert outcome[done] == "finished" and outcome[open_] == "Aborted", outcome
    assert outcome["750000000000000AAA"] == "finished", outcome  # unknown job: 404, nothing left to stop
    assert bulk_jobs(clean_emulator)[open_] == "Aborted"


def test_api_listener_aborts_the_jobs_of_a_task_marked_failed(slow_org: EmulatorProcess, monkeypatch) -> None:
    """Deferred, then marked failed before the triggerer started the trigger: the API server's listener reads the
    ledger from the task state store and aborts the jobs. Only the API's manual change (``previous_state=None``)
    counts; a task that failed by itself keeps its jobs for a retry or a clear to re-attach."""
    import time
    from types import SimpleNamespace

    import airflow.state

    from sf_datacloud_sync.stop import MarkedFailedListener

    _, api = run_attempt(on_defer="accept")
    job_ids = list(api.store[LEDGER_KEY]["jobs"])
    assert api.store[LEDGER_KEY]["conn_id"] == "salesforce_default"

    class Backend:  # the metastore backend's answer: the stored JSON text
        def get(self, scope: Any, key: str, **_: Any) -> str | None:
            wanted = (DAG_ID, RUN_ID, "load_partition", -1)
            found = (scope.dag_id, scope.run_id, scope.task_id, scope.map_index)
            return json.dumps(api.store[key]) if found == wanted and key in api.store else None

    monkeypatch.setattr(airflow.state, "get_state_backend", Backend)
    ti = SimpleNamespace(dag_id=DAG_ID, run_id=RUN_ID, task_id="load_partition", map_index=-1,
                         operator="LoadPartitionOperator")
    listener = MarkedFailedListener()
    # Neither a task that failed by itself nor another operator's task starts a stop (the only gate before it).
    assert not listener.wants("running", ti)
    assert not listener.wants(None, SimpleNamespace(**{**vars(ti), "operator": "PythonOperator"}))
    assert {bulk_jobs(slow_org)[j] for j in job_ids} <= {"UploadComplete", "InProgress"}

    listener.on_task_instance_failed(previous_state=None, task_instance=ti,
                                     error="TaskInstance's state was manually set to `failed`.")
    deadline = time.monotonic() + 20
    while {bulk_jobs(slow_org)[j] for j in job_ids} != {"Aborted"}:
        assert time.monotonic() < deadline, bulk_jobs(slow_org)
        time.sleep(0.2)

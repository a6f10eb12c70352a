"""The real DAG on a distributed Airflow: CeleryExecutor, two workers, PostgreSQL, Redis, a separate triggerer.

Everything runs on this machine but as a multi-machine deployment would run it -- ``airflow api-server``,
``scheduler``, ``dag-processor``, ``triggerer`` and two ``airflow celery worker`` processes, the metadata database
and Celery's result backend on PostgreSQL, the broker on Redis -- against the emulator seeded with bad rows
(``conftest.py`` starts it; :mod:`tests.distributed.stack` says how). One run of ``datacloud_opportunity_sync``
with several partitions must

* succeed, every task instance in one try;
* spread the mapped partitions over **both** workers (the workers' logs name each workload they ran; the task
  instances' ``hostname`` says which worker ran them last);
* hand every partition's Bulk job wait to the **triggerer** (each partition is seen ``deferred`` with a
  triggerer job, its ``BulkJobsTrigger`` writes a trigger log, and a worker resumes it afterwards);
* land every row: ``rows == upserted + failed``, Salesforce's count as expected, each bad row reported with
  Salesforce's error code, nothing lost, nothing uploaded twice;
* keep Airflow's state in PostgreSQL and bind nothing but 127.0.0.1.

Minutes, and it installs system packages through the Makefile: skipped unless ``DISTRIBUTED=1``.
``make test-distributed`` installs what it needs and runs it.
"""

from __future__ import annotations

import contextlib
import os
import time

import psutil
import pytest

from tests.distributed.stack import BAD_ROWS, NULL_KEYS, PARTITIONS, ROWS, DistributedRun, SyncRun
from tests.e2e_support import DAG_ID, manifest, reconcile_rows, target_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # set-up ~1 min and a run of ~1 min here; generous for a loaded CI machine
    pytest.mark.skipif(os.environ.get("DISTRIBUTED") != "1",
                       reason="needs PostgreSQL, Redis and the Celery extras: run `make test-distributed`"),
]
WORKERS = ("worker1", "worker2")


def _worker_of_hostname(hostname: str | None) -> str | None:
    """``worker1.<fqdn>`` (see :mod:`tests.distributed.hostname`) -> ``worker1``."""
    name = (hostname or "").split(".", 1)[0]
    return name if name in WORKERS else None


def test_the_run_succeeds_with_every_task_in_one_try(sync_run: SyncRun) -> None:
    states = {(t["task_id"], t["map_index"]): (t.get("state"), t.get("try_number")) for t in sync_run.task_instances}
    assert sync_run.state == "success", states
    assert [t["map_index"] for t in sync_run.loads] == list(range(len(sync_run.loads))), states
    assert len(sync_run.loads) >= PARTITIONS, states
    assert set(states.values()) == {("success", 1)}, states


def test_the_partitions_ran_on_both_workers(sync_run: SyncRun) -> None:
    loads = sync_run.loads
    per_ti = {t["map_index"]: sync_run.workers_of(t["id"]) for t in loads}
    # Every partition's workloads (first run and resume) are in some worker's log, and both workers took some.
    assert all(per_ti.values()), per_ti
    assert {w for workers in per_ti.values() for w in workers} == set(WORKERS), per_ti
    for t in loads:
        # The REST API's hostname names the worker that ran the task instance last (the resume after deferral).
        assert _worker_of_hostname(t.get("hostname")) == per_ti[t["map_index"]][-1], (t.get("hostname"), per_ti)
        seen = sync_run.seen[("load_partition", t["map_index"])]["hostnames"]  # while it ran, every try
        assert {_worker_of_hostname(h) for h in seen} <= set(sync_run.workers_of_index(t["map_index"])), seen
    for task_id in ("discover", "verify"):
        ti = next(t for t in sync_run.task_instances if t["task_id"] == task_id)
        assert _worker_of_hostname(ti.get("hostname")) in WORKERS, ti


def test_every_bulk_wait_was_deferred_to_the_triggerer(sync_run: SyncRun, distributed: DistributedRun) -> None:
    stack = distributed.airflow
    assert stack is not None
    assert distributed.postgres is not None
    logs = stack.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={sync_run.run_id}" / "task_id=load_partition"
    triggerer_jobs: set[int] = set()
    for t in sync_run.loads:
        seen = sync_run.seen[("load_partition", t["map_index"])]
        assert "deferred" in seen["states"], seen
        assert seen["triggerer_jobs"], seen  # the REST API named the triggerer job holding the trigger
        # Deferred, then resumed by a worker: at least two workloads (execute, execute_complete).
        assert len(sync_run.workers_of(t["id"])) >= 2, sync_run.workers_of(t["id"])
        # The triggerer writes each trigger's own log next to the task's: started, fired with the jobs finished.
        trigger_logs = list((logs / f"map_index={t['map_index']}").glob(f"attempt={t['try_number']}.log.trigger.*"))
        assert trigger_logs, f"no trigger log for map index {t['map_index']} under {logs}"
        text = "\n".join(p.read_text(errors="replace") for p in trigger_logs)
        assert "Trigger fired event" in text and "'status': 'success'" in text and "JobComplete" in text, text
        triggerer_jobs |= seen["triggerer_jobs"]
    # The metadata database is new: its only triggerer job is the `airflow triggerer` process this test started,
    # and that job held every trigger.
    jobs = dict(distributed.postgres.query("SELECT id, state FROM job WHERE job_type = 'TriggererJob'"))
    assert len(jobs) == 1 and set(jobs.values()) == {"running"}, jobs
    assert triggerer_jobs == set(jobs), (triggerer_jobs, jobs)


def test_every_row_landed_or_is_reported(sync_run: SyncRun, distributed: DistributedRun) -> None:
    org = distributed.org
    assert org is not None
    summary = sync_run.verify
    assert summary is not None and summary["ok"] and summary["problems"] == [], summary
    assert summary["rows"] == ROWS == summary["upserted"] + summary["failed"], summary
    assert summary["failed"] == BAD_ROWS + NULL_KEYS, summary["failed_by_code"]
    assert "UNABLE_TO_LOCK_ROW" not in summary["failed_by_code"], summary["failed_by_code"]
    # Salesforce's count as verify read it, and the emulator's own table, agree with Data Cloud minus the failures.
    assert summary["salesforce_count"] == summary["expected_salesforce_count"], summary
    assert len(target_rows(org)) == summary["expected_salesforce_count"] == ROWS - NULL_KEYS - BAD_ROWS
    rec = reconcile_rows(org, summary)
    assert rec.lost == [] and rec.mismatches[:10] == [], (rec.lost[:10], rec.mismatches[:10])
    assert rec.rows == ROWS and rec.reported == BAD_ROWS + NULL_KEYS, rec
    for bad in manifest(org)["bad_row_list"]:
        assert rec.failed_codes.get(bad["external_id"]) == bad["expected_error_code"], bad
    assert org.stats()["duplicate_uploads"] == 0


def test_airflow_state_and_celery_results_are_in_postgres(sync_run: SyncRun, distributed: DistributedRun) -> None:
    pg = distributed.postgres
    assert pg is not None
    states = dict(pg.query("SELECT state, count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s "
                           "GROUP BY state", DAG_ID, sync_run.run_id))
    assert states == {"success": len(sync_run.task_instances)}, states
    # One Celery result per workload the workers ran (first runs and resumes). A worker stores SUCCESS only after
    # the task supervisor has finished, a moment after the task instance turned success: give it a minute.
    deadline = time.monotonic() + 60
    while (results := dict(pg.query("SELECT status, count(*) FROM celery_taskmeta GROUP BY status"))) != {
            "SUCCESS": len(sync_run.executions)} and time.monotonic() < deadline:
        time.sleep(1)
    assert results == {"SUCCESS": len(sync_run.executions)}, results
    assert len(sync_run.executions) > len(sync_run.task_instances)  # resumes after deferral are workloads too


def test_nothing_listens_beyond_loopback(distributed: DistributedRun) -> None:
    stack, pg = distributed.airflow, distributed.postgres
    assert stack is not None and pg is not None and distributed.redis is not None and distributed.org is not None
    roots = [*stack.procs.values(), distributed.redis.proc, distributed.org.proc]
    pids = {p.pid for p in roots if p is not None}
    pids.add(int((pg.data / "postmaster.pid").read_text().split()[0]))
    listening: dict[tuple[str, int], str] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            listening[(c.laddr.ip, c.laddr.port)] = " ".join(p.cmdline()[:3])
    ports = {port for _, port in listening}
    assert {stack.port, pg.port, distributed.redis.port, distributed.org.port} <= ports, listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening

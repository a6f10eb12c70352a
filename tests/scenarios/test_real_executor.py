"""Scenarios 4 and 8 under a real executor: ``airflow standalone`` (scheduler, triggerer, dag-processor, api-server,
LocalExecutor) in a temp ``AIRFLOW_HOME``, driven through the REST API.

4. The task's worker process is SIGKILLed while its Bulk jobs run; Airflow's own retry re-attaches to them, no
   chunk is uploaded twice and every row arrives.
8. Emergency stop: the DAG run is marked failed through ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}``; every
   open Bulk job ends ``Aborted`` and no task process is left.

Part of ``make test`` (about 2 minutes on two cores): one standalone serves the whole module, its start is polled
rather than waited for, and ``SYNC_LOAD_RETRY_DELAY_S=1`` retries the killed attempt after 1-2 s instead of the
DAG's 2-4 minutes. ``make test-slow`` runs only these; ``SCENARIOS_REAL_EXECUTOR=0`` skips them."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import pytest

from emulator.harness import EmulatorProcess
from tests.e2e_support import DAG_ID, DC_ROWS_PATH, ROOT, assert_no_secrets, reconcile_rows, write_settings

# Airflow takes up to a minute to start on two busy cores; the whole module must still end well within this.
pytestmark = [pytest.mark.slow, pytest.mark.real_executor, pytest.mark.timeout(600)]

OPEN_STATES = ("Open", "UploadComplete", "InProgress")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bulk_jobs(org: EmulatorProcess) -> dict[str, str]:
    """Ingest job id → state, straight from the emulator's database."""
    with sqlite3.connect(f"file:{org.data_dir / 'org.sqlite'}?mode=ro", uri=True, timeout=30) as db:
        return dict(db.execute("SELECT id, state FROM bulk_jobs"))


class Standalone:
    """``airflow standalone`` in its own process group, bound to 127.0.0.1 on a free port."""

    def __init__(self, home: Path, org: EmulatorProcess) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AIRFLOW", "SYNC_")) and k != "PYTEST_CURRENT_TEST"}
        self.env = {
            **base,
            # standalone starts its components as `airflow ...`: the venv's bin must be on PATH.
            "PATH": f"{Path(sys.executable).parent}:{base.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}",
            "PYTHONUNBUFFERED": "1",  # standalone.log stays complete when stop() kills the processes
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW_CONN_SALESFORCE_DEFAULT": org.info["airflow_conn"],
            "SYNC_CONFIG_PATH": str(write_settings(home / "sync_config.yaml")),
            "SYNC_ARTIFACTS_URL": f"file://{home}/artifacts",
            "SYNC_DEADLINE_HOURS": "0",
            # The killed attempt of scenario 4 is retried after 1-2 s instead of the DAG's 2-4 min.
            "SYNC_LOAD_RETRY_DELAY_S": "1",
        }
        self.proc: subprocess.Popen | None = None
        self.api: Any = None

    def start(self) -> Standalone:
        import requests

        # `airflow standalone` creates the database itself; the pool comes through the REST API once it answers
        # (one Airflow CLI process less: each costs ~5 s of imports on two shared cores).
        log = open(self.home / "standalone.log", "wb")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"], env=self.env,
                                     cwd=self.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        passwords = self.home / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + 180
        http = requests.Session()
        http.trust_env = False
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "standalone.log").read_text()[-3000:]
            try:
                if passwords.exists() and http.get(f"{self.url}/api/v2/monitor/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.25)
        else:
            raise AssertionError("airflow standalone did not come up")
        from include.status import AirflowApi

        user, password = next(iter(json.loads(passwords.read_text()).items()))
        self.api = AirflowApi(self.url, username=user, password=password, session=http)
        self.api.http.post(f"{self.url}/api/v2/pools", timeout=30, json={
            "name": "salesforce_bulk", "slots": 10, "description": "Salesforce Bulk API 2.0 jobs",
            "include_deferred": True}).raise_for_status()
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        # A throw-away home: no graceful shutdown needed. TERM first (components stop their task processes), KILL
        # whatever is left after a few seconds, including children that left our process group.
        family = _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group: standalone and its children
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for proc in [*family, *_descendants(self.proc.pid)]:
            try:
                proc.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    # -- REST ------------------------------------------------------------------------------------------------------
    def trigger(self, **conf: Any) -> str:
        deadline = time.monotonic() + 180
        while self.api.get(f"dags/{DAG_ID}") is None:
            assert time.monotonic() < deadline, "the DAG was not parsed"
            time.sleep(0.5)
        self.api.http.patch(f"{self.url}/api/v2/dags/{DAG_ID}", json={"is_paused": False},
                            timeout=30).raise_for_status()
        resp = self.api.http.post(f"{self.url}/api/v2/dags/{DAG_ID}/dagRuns", timeout=30,
                                  json={"logical_date": None, "conf": conf})
        resp.raise_for_status()
        return resp.json()["dag_run_id"]

    def run_path(self, run_id: str) -> str:
        return f"dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"

    def run_state(self, run_id: str) -> str:
        return (self.api.get(self.run_path(run_id)) or {}).get("state", "")

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return (self.api.get(f"{self.run_path(run_id)}/taskInstances") or {}).get("task_instances", [])

    def wait(self, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.run_state(run_id)) not in ("success", "failed"):
            assert time.monotonic() < deadline, (state, self.task_instances(run_id))
            time.sleep(0.5)
        return state

    def mark_failed(self, run_id: str) -> int:
        """``PATCH`` the run to failed, as the UI's "Mark failed" does; returns how many requests it took.

        On SQLite the API answers 500 ("database is locked") when a task's ledger write holds the database at the
        same moment (seen twice in about 50 stops): the request is repeated, as a person would click again.
        """
        for attempt in range(1, 4):
            resp = self.api.http.patch(f"{self.url}/api/v2/{self.run_path(run_id)}", json={"state": "failed"},
                                       timeout=30)
            if resp.status_code < 500 or attempt == 3:
                resp.raise_for_status()
                return attempt
            time.sleep(1)
        raise AssertionError("unreachable")

    def assert_marked_failed(self, run_id: str) -> None:
        """The run as the PATCH left it: partitions failed, ``verify`` skipped (it never ran), the run failed.

        Airflow 3.3.2 on SQLite (no row locks) can lose the run's state: a scheduler pass that loaded the run just
        before the PATCH sees its leaf ``verify`` skipped and writes the run back as ``success`` (seen once in about
        50 stops). The task states, which are what stops the work, are the PATCH's either way.
        """
        tis = self.task_instances(run_id)
        assert {t["state"] for t in tis if t["task_id"] == "load_partition"} == {"failed"}, tis
        assert [t["state"] for t in tis if t["task_id"] == "verify"] == ["skipped"], tis
        assert self.run_state(run_id) in ("failed", "success"), self.run_state(run_id)

    def verify_summary(self, run_id: str) -> dict[str, Any]:
        entry = self.api.get(f"{self.run_path(run_id)}/taskInstances/verify/xcomEntries/return_value",
                             deserialize="true")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def worker_process(ti_id: str) -> psutil.Process | None:
    """The task process: the task runner titles itself ``airflow worker -- <ti id>``."""
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(f"airflow worker -- {ti_id}"):
            return proc
    return None


@pytest.fixture(scope="module")
def rx_org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    proc = EmulatorProcess(tmp_path_factory.mktemp("rx_org"))
    proc.seed(records=3_000, accounts=30, random_seed=31, bad_rows=6, null_keys=2)
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def airflow_rx(rx_org: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    airflow = Standalone(tmp_path_factory.mktemp("rx_airflow"), rx_org)
    try:
        yield airflow.start()
    finally:
        airflow.stop()


def test_worker_sigkill_mid_job_resumes_without_duplicates(airflow_rx: Standalone, rx_org: EmulatorProcess,
                                                           figures: list) -> None:
    org = rx_org
    org.reset()
    # Slow both ends: pages of ~100 rows take 0.3 s each and Salesforce processes 4 ms per row, so the task is
    # still streaming while its first jobs are InProgress.
    org.control("PUT", "profile", {"name": "instant", "dc_first_page_max_rows": 100, "dc_page_max_bytes": 20_000,
                                   "per_record_ms": 4})
    org.set_faults(rules=[{"path": DC_ROWS_PATH, "status": 0, "latency_ms": 300, "rate": 1.0}])
    try:
        run_id = airflow_rx.trigger(partitions=1, partition_key="account", max_records_per_job=300,
                                    target_partition_rows=None, dry_run=False, tolerance=0)
        killed = None
        deadline = time.monotonic() + 240
        while killed is None:
            assert time.monotonic() < deadline, airflow_rx.task_instances(run_id)
            tis = {t["task_id"]: t for t in airflow_rx.task_instances(run_id)}
            load = tis.get("load_partition")
            running_jobs = [j for j, s in bulk_jobs(org).items() if s in ("UploadComplete", "InProgress")]
            if load and load["state"] == "running" and running_jobs:
                proc = worker_process(load["id"])
                if proc is not None:
                    proc.send_signal(signal.SIGKILL)
                    killed = {"pid": proc.pid, "jobs_running": len(running_jobs),
                              "jobs_total": len(bulk_jobs(org))}
            time.sleep(0.2)
        org.clear_faults()
        state = airflow_rx.wait(run_id, timeout=420)
    finally:
        org.clear_faults()
        org.control("PUT", "profile", {"name": "instant"})
    tis = {(t["task_id"], t.get("map_index", -1)): t for t in airflow_rx.task_instances(run_id)}
    assert state == "success", tis
    load = next(t for (task, _), t in tis.items() if task == "load_partition")
    assert load["try_number"] == 2, load  # Airflow retried the killed attempt
    stats = org.stats()
    assert stats["duplicate_uploads"] == 0, stats
    summary = airflow_rx.verify_summary(run_id)
    assert summary["ok"], summary
    rec = reconcile_rows(org, summary)
    assert rec.lost == [] and rec.mismatches == [], (rec.lost[:10], rec.mismatches[:10])
    assert summary["rows"] == rec.rows == summary["upserted"] + summary["failed"] == 3_000
    logs = {str(p): p.read_text(errors="replace") for p in (airflow_rx.home / "logs").rglob("*") if p.is_file()}
    assert logs, "no task logs were written"
    tokens = assert_no_secrets(org, logs)
    figures.append({"scenario": "4 worker SIGKILL (standalone)", "rows_checked": rec.rows, "landed": rec.landed,
                    "reported_failed": rec.reported, "rows_lost": len(rec.lost), "faults_injected": 1,
                    "duplicate_uploads": stats["duplicate_uploads"], "killed_with_jobs_running": killed["jobs_running"],
                    "log_files_scanned": len(logs), "tokens_checked": tokens})


def test_marking_the_run_failed_aborts_every_open_job(airflow_rx: Standalone, rx_org: EmulatorProcess,
                                                      figures: list) -> None:
    """Mark the run failed while both partitions stream (their first jobs open at Salesforce): every open job
    ends Aborted through the operator's ``on_kill`` and no task process is left."""
    org = rx_org
    org.reset()
    # Slow pages keep both partitions streaming for ~10 s; jobs that take minutes stay open until aborted. Chunks
    # of 5 rows (1 s): an aborted job stops within a second, so the emulator's reset never waits for one.
    org.control("PUT", "profile", {"name": "instant", "per_record_ms": 200, "chunk_records": 5,
                                   "dc_first_page_max_rows": 100, "dc_page_max_bytes": 20_000})
    org.set_faults(rules=[{"path": DC_ROWS_PATH, "status": 0, "latency_ms": 600, "rate": 1.0}])
    try:
        run_id = airflow_rx.trigger(partitions=2, partition_key="account", max_records_per_job=200,
                                    target_partition_rows=None, dry_run=False, tolerance=0, partitions_per_task=1)
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, airflow_rx.task_instances(run_id)
            states = [t["state"] for t in airflow_rx.task_instances(run_id) if t["task_id"] == "load_partition"]
            open_jobs = [j for j, s in bulk_jobs(org).items() if s in OPEN_STATES]
            if len(open_jobs) >= 2 and states == ["running", "running"]:
                break
            time.sleep(0.2)
        ti_ids = [t["id"] for t in airflow_rx.task_instances(run_id) if t["task_id"] == "load_partition"]
        airflow_rx.mark_failed(run_id)
        deadline = time.monotonic() + 120
        while True:
            jobs = bulk_jobs(org)
            still_open = [j for j, s in jobs.items() if s in OPEN_STATES]
            alive = [t for t in ti_ids if worker_process(t) is not None]
            if not still_open and not alive:
                break
            assert time.monotonic() < deadline, (jobs, alive, airflow_rx.task_instances(run_id))
            time.sleep(1)
    finally:
        org.clear_faults()
        org.control("PUT", "profile", {"name": "instant"})
    airflow_rx.assert_marked_failed(run_id)
    aborted = [j for j, s in jobs.items() if s == "Aborted"]
    assert set(open_jobs) <= set(aborted) and set(aborted) == set(jobs), jobs  # nothing ran on, nothing new
    figures.append({"scenario": "8 emergency stop (standalone, REST mark failed)", "rows_checked": 0,
                    "jobs_open_at_stop": len(open_jobs), "jobs_aborted": len(aborted), "jobs_left_open": 0,
                    "rows_lost": 0, "faults_injected": 1})


def start_run_to_stop(airflow_rx: Standalone, org: EmulatorProcess) -> str:
    """A fresh org whose jobs take long (200 ms/row in 5-row chunks, so an abort lands at once) and a run of two
    Account partitions on it, each one job (an Account partition waits in the worker for each job before it closes
    the next; its last job it waits for in the triggerer): the run the emergency-stop scenarios mark failed. The
    caller restores the profile."""
    org.reset()
    org.control("PUT", "profile", {"name": "instant", "per_record_ms": 200, "chunk_records": 5})
    return airflow_rx.trigger(partitions=2, partition_key="account", max_records_per_job=2_000,
                              target_partition_rows=None, dry_run=False, tolerance=0, partitions_per_task=1)


def partition_logs(airflow_rx: Standalone, run_id: str) -> Path:
    return airflow_rx.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=load_partition"


def test_marking_the_run_failed_while_deferred_aborts_jobs_from_the_triggerer(
        airflow_rx: Standalone, rx_org: EmulatorProcess, figures: list) -> None:
    """Mark the run failed while both partitions wait in the triggerer: the trigger's ``on_kill`` aborts every
    job still running at Salesforce."""
    org = rx_org
    try:
        run_id = start_run_to_stop(airflow_rx, org)
        run_logs = partition_logs(airflow_rx, run_id)
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, airflow_rx.task_instances(run_id)
            states = [t["state"] for t in airflow_rx.task_instances(run_id) if t["task_id"] == "load_partition"]
            # Both deferred, and both triggers started in the triggerer (each writes its own log file).
            triggers = [list((run_logs / f"map_index={i}").glob("attempt=1.log.trigger.*")) for i in (0, 1)]
            if states == ["deferred", "deferred"] and all(triggers):
                break
            time.sleep(0.5)
        open_jobs = [j for j, s in bulk_jobs(org).items() if s in OPEN_STATES]
        airflow_rx.mark_failed(run_id)
        deadline = time.monotonic() + 120
        while True:
            jobs = bulk_jobs(org)
            if not [j for j, s in jobs.items() if s in OPEN_STATES]:
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(1)
    finally:
        org.control("PUT", "profile", {"name": "instant"})
    airflow_rx.assert_marked_failed(run_id)
    aborted = [j for j, s in jobs.items() if s == "Aborted"]
    assert open_jobs and set(open_jobs) <= set(aborted), jobs
    figures.append({"scenario": "8b emergency stop while deferred (trigger on_kill)", "rows_checked": 0,
                    "jobs_open_at_stop": len(open_jobs), "jobs_aborted": len(aborted), "jobs_left_open": 0,
                    "rows_lost": 0, "faults_injected": 1})


def test_marking_the_run_failed_right_after_deferral_aborts_every_job(
        airflow_rx: Standalone, rx_org: EmulatorProcess, figures: list) -> None:
    """Mark the run failed the moment a partition has deferred, before the triggerer starts its trigger, while the
    other partition is handing over: the two windows where neither ``on_kill`` runs (``sf_datacloud_sync.stop``).

    Without the end-of-attempt guard and the API server's listener, 3 of 4 such runs left jobs to finish.
    """
    org = rx_org
    try:
        run_id = start_run_to_stop(airflow_rx, org)
        deadline = time.monotonic() + 240
        while "deferred" not in (states := [t["state"] for t in airflow_rx.task_instances(run_id)
                                             if t["task_id"] == "load_partition"]):
            assert time.monotonic() < deadline, airflow_rx.task_instances(run_id)
            time.sleep(0.05)
        clicks = airflow_rx.mark_failed(run_id)
        at_stop = bulk_jobs(org)  # a small tail job may have finished already: it has nothing left to stop
        deferred = states.index("deferred")
        trigger_started = any((partition_logs(airflow_rx, run_id) / f"map_index={deferred}")
                              .glob("attempt=1.log.trigger.*"))
        deadline = time.monotonic() + 120
        while True:
            jobs = bulk_jobs(org)
            if jobs and not [j for j, s in jobs.items() if s in OPEN_STATES]:
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(1)
        load = [t for t in airflow_rx.task_instances(run_id) if t["task_id"] == "load_partition"]
        if {t["state"] for t in load} != {"failed"}:
            # SQLite has no row locks: a deferral whose read preceded the mark can commit after it and leave the
            # task instance deferred in a failed run (its jobs are aborted all the same). Mark it again.
            clicks += airflow_rx.mark_failed(run_id)
    finally:
        org.control("PUT", "profile", {"name": "instant"})
    airflow_rx.assert_marked_failed(run_id)
    # Every job still open when the run was stopped, and any created after, ended Aborted: none ran on to
    # JobComplete (a partition's job takes minutes here).
    # (Aborted already when the states were read after the mark counts as stopped: the listener can be that quick.)
    finished_before = {j for j, s in at_stop.items() if s not in OPEN_STATES and s != "Aborted"}
    assert {s for j, s in jobs.items() if j not in finished_before} == {"Aborted"}, (at_stop, jobs)
    figures.append({"scenario": "8c emergency stop right after deferral (guard + API listener)", "rows_checked": 0,
                    "states_at_stop": states, "trigger_started_at_stop": trigger_started,
                    "mark_failed_requests": clicks,
                    "jobs_open_at_stop": len(at_stop) - len(finished_before),
                    "jobs_aborted": sum(1 for s in jobs.values() if s == "Aborted"), "jobs_left_open": 0,
                    "rows_lost": 0, "faults_injected": 1})

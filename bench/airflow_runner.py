"""Run the real DAG under ``airflow standalone`` (LocalExecutor, real parallel task processes) and measure it.

Same mechanics as ``include/scripts/demo.sh``: an isolated ``AIRFLOW_HOME`` (here under ``.bench/``), the
emulator as ``AIRFLOW_CONN_SALESFORCE_DEFAULT``, the repo's ``dags/`` and ``plugins/``, every port on 127.0.0.1
and free (API, worker and trigger log servers: a running ``make demo`` keeps 8080/8793/8794), the
``salesforce_bulk`` pool counting deferred tasks, then one DAG run triggered through the REST API with the
given conf and watched until it ends.

What is measured while the run lasts, with :class:`bench.metrics.TreeSampler` over the whole standalone process
tree (sampled every 0.2 s): CPU seconds and peak RSS per process, grouped by what the process is -- task processes
(``airflow worker -- <ti id>``: the code of the DAG), their supervisors (the LocalExecutor workers), scheduler,
triggerer, dag-processor, api-server. Per task instance: Airflow's start/end/duration, its XCom summary and its
process's CPU and peak RSS (a deferred task resumes in a new process: both are counted).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from bench.metrics import TreeSampler

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "datacloud_opportunity_sync"
POOL = "salesforce_bulk"
POOL_SLOTS = 16
TERMINAL_RUN_STATES = ("success", "failed")
_TI_ID = re.compile(r"airflow worker -- ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classify(title: str) -> str:
    """What an Airflow process is, from its process title (set with setproctitle) or command line."""
    if _TI_ID.search(title):
        return "task"
    if "LocalExecutor" in title or "airflow supervisor" in title:
        return "executor_worker"
    for kind, needle in (("scheduler", "scheduler"), ("triggerer", "triggerer"), ("dag_processor", "dag-processor"),
                         ("dag_processor", "dag_processor"), ("api_server", "api-server"),
                         ("api_server", "api_server"), ("api_server", "uvicorn"), ("api_server", "gunicorn"),
                         ("serve_logs", "serve-logs"), ("standalone", "standalone")):
        if needle in title:
            return kind
    return "other"


@dataclass
class AirflowStack:
    """``airflow standalone`` in its own process group with an isolated home.

    :param home: ``AIRFLOW_HOME`` (created).
    :param conn: The emulator's ``connection_info``.
    :param sync_config: Settings file for the tasks (``SYNC_CONFIG_PATH``); default: the repo's.
    """

    home: Path
    conn: dict[str, Any]
    sync_config: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    http: requests.Session = field(default_factory=requests.Session)
    log_path: Path | None = None
    nice: int = 0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items()
               # SYNC_* settings of the caller (e.g. pytest's SYNC_MIN_DEFER_S=0) must not leak into a real executor.
               if not k.startswith(("AIRFLOW", "SYNC_")) and k != "PYTEST_CURRENT_TEST"}
        ca = self.conn["ca_bundle"]
        env.update({
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW_CONN_SALESFORCE_DEFAULT": self.conn["airflow_conn"],
            # The emulator's own CA: TLS stays verified (as in demo.sh).
            "REQUESTS_CA_BUNDLE": ca, "SSL_CERT_FILE": ca,
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.api,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # The benchmark triggers its runs by hand: no scheduled run on top of them.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "SYNC_ARTIFACTS_URL": f"file://{self.home}/sync_artifacts",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        })
        if self.sync_config is not None:
            env["SYNC_CONFIG_PATH"] = str(self.sync_config)
        env.update(self.extra_env)
        return env

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> AirflowStack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.http.trust_env = False
        self.log_path = self.home / "standalone.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        # Own session = own process group: stop() signals every component and task process at once.
        prefix = ["nice", "-n", str(self.nice)] if self.nice else []  # nice execs: the pid stays Airflow's
        self.proc = subprocess.Popen([*prefix, "airflow", "standalone"], cwd=self.home, env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_alive(self) -> None:
        """Raise if Airflow exited while starting (subclasses running several processes check each)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"airflow standalone exited with {self.proc.returncode}; see {self.log_path}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        passwords = self.home / "simple_auth_manager_passwords.json.generated"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = self.http.get(f"{self.api}/api/v2/monitor/health", timeout=5)
                if health.ok and passwords.exists():
                    body = health.json()
                    parts = [body.get(k, {}).get("status") for k in ("metadatabase", "scheduler", "triggerer",
                                                                     "dag_processor")]
                    if all(p == "healthy" for p in parts):
                        user, password = next(iter(json.loads(passwords.read_text()).items()))
                        resp = self.http.post(f"{self.api}/auth/token", json={"username": user, "password": password},
                                              timeout=30)
                        resp.raise_for_status()
                        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
                        return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"Airflow did not become healthy in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """SIGINT (standalone shuts its components down), then SIGTERM, then SIGKILL to the whole group."""
        proc, self.proc = self.proc, None
        self.http.close()
        if proc is not None:
            stop_process_groups([proc])

    # -- REST ----------------------------------------------------------------------------------------------------
    def get(self, path: str, **params: Any) -> Any:
        resp = self.http.get(f"{self.api}/api/v2/{path.lstrip('/')}", params=params or None, timeout=30)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()

    def ensure_pool(self, name: str = POOL, slots: int = POOL_SLOTS) -> dict[str, Any]:
        body = {"name": name, "slots": slots, "include_deferred": True,
                "description": "Concurrent Salesforce Bulk API 2.0 jobs of the Data Cloud sync (benchmark)"}
        resp = self.http.post(f"{self.api}/api/v2/pools", json=body, timeout=30)
        if resp.status_code == 409:
            resp = self.http.patch(f"{self.api}/api/v2/pools/{name}", json=body, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def wait_for_dag(self, dag_id: str = DAG_ID, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = (self.get("importErrors") or {}).get("import_errors") or []
            if errors:
                raise RuntimeError("DAG import errors:\n" + "\n".join(e.get("stack_trace", "") for e in errors))
            if self.get(f"dags/{dag_id}") is not None:
                return
            time.sleep(1)
        raise TimeoutError(f"the DAG {dag_id} was not parsed within {timeout:.0f}s")

    def trigger(self, conf: dict[str, Any], dag_id: str = DAG_ID, note: str = "bench") -> str:
        resp = self.http.patch(f"{self.api}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30)
        resp.raise_for_status()
        resp = self.http.post(f"{self.api}/api/v2/dags/{dag_id}/dagRuns",
                              json={"logical_date": None, "conf": conf, "note": note}, timeout=30)
        resp.raise_for_status()
        return resp.json()["dag_run_id"]

    def wait_run(self, run_id: str, timeout: float, dag_id: str = DAG_ID, interval: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        path = f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"
        while True:
            run = self.get(path) or {}
            if run.get("state") in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run.get('state')} after {timeout:.0f}s")
            time.sleep(interval)

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        body = self.get(f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances", limit=1000) or {}
        return body.get("task_instances") or []

    def earlier_tries(self, run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        """Task instances' earlier tries: id, task, map index, try, state, end (a retry gets a new id).

        Read from the metadata database (SQLite, read-only) because the public API's ``tries`` carry no id.
        """
        import sqlite3
        import uuid

        db = self.home / "airflow.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT task_instance_id, task_id, map_index, try_number, state, end_date "
                                "FROM task_instance_history WHERE dag_id=? AND run_id=?", (dag_id, run_id)).fetchall()
        except sqlite3.Error:
            return []
        finally:
            conn.close()
        return [{"id": str(uuid.UUID(str(tid))), "task_id": task_id, "map_index": int(mi), "try_number": int(tn),
                 "state": st, "end_date": str(end) if end else None} for tid, task_id, mi, tn, st, end in rows]

    def xcom(self, run_id: str, task_id: str, map_index: int = -1, dag_id: str = DAG_ID) -> Any:
        body = self.get(f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/"
                        "return_value", map_index=map_index, deserialize="true")
        return None if body is None else body.get("value")


def _ts(text: str) -> float:
    """An ISO timestamp from the API (``...Z``) or SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC) -> epoch seconds."""
    from datetime import UTC, datetime

    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


#: How :func:`stop_process_groups` ends a group: SIGINT to its leader (Airflow's components shut down cleanly
#: on it), then SIGTERM and SIGKILL to the whole group, each after the previous step's grace period (seconds).
STOP_STEPS = ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


def stop_process_groups(procs: list[subprocess.Popen], steps: tuple[tuple[int, float], ...] = STOP_STEPS) -> None:
    """Stop processes started with ``start_new_session=True`` (pgid == pid) and everything they started.

    All groups get each step at once, so stopping several components takes as long as the slowest one.
    """
    for sig, grace in steps:
        alive = [p for p in procs if _group_alive(p.pid)]
        if not alive:
            break
        for proc in alive:
            try:
                os.killpg(proc.pid, sig) if sig != signal.SIGINT else os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_alive(p.pid) for p in alive):
            for proc in alive:
                proc.poll()
            time.sleep(0.2)
    for proc in procs:
        proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def run_dag(stack: AirflowStack, conf: dict[str, Any], *, timeout: float, label: str) -> dict[str, Any]:
    """Trigger one run, sample the process tree until it ends, and gather per-task figures."""
    assert stack.proc is not None
    sampler = TreeSampler([stack.proc.pid], classify, interval=0.2).start()
    t0 = time.monotonic()
    run_id = stack.trigger(conf, note=f"bench {label}")
    try:
        run = stack.wait_run(run_id, timeout)
    finally:
        sampler.stop()
    wall = time.monotonic() - t0
    tis = stack.task_instances(run_id)
    owners = {ti.get("id"): (ti["task_id"], int(ti.get("map_index", -1))) for ti in tis}
    earlier = stack.earlier_tries(run_id)
    owners.update({t["id"]: (t["task_id"], t["map_index"]) for t in earlier})
    per_task: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in sampler.records("task"):
        m = _TI_ID.search(rec.title)
        key = owners.get(m.group(1), ("unknown", -1)) if m else ("unknown", -1)
        agg = per_task.setdefault(key, {"cpu_s": 0.0, "peak_rss_mb": 0.0, "processes": 0})
        agg["cpu_s"] += rec.cpu_s
        agg["peak_rss_mb"] = max(agg["peak_rss_mb"], rec.peak_rss_mb)
        agg["processes"] += 1
    tasks = []
    summaries = []
    for ti in sorted(tis, key=lambda t: (t.get("start_date") or "", t["task_id"], t.get("map_index", -1))):
        key = (ti["task_id"], int(ti.get("map_index", -1)))
        proc = per_task.get(key, {})
        entry = {"task_id": ti["task_id"], "map_index": key[1], "label": ti.get("rendered_map_index"),
                 "state": ti.get("state"), "try_number": ti.get("try_number"),
                 "start_date": ti.get("start_date"), "end_date": ti.get("end_date"),
                 "duration_s": round(float(ti.get("duration") or 0), 2),
                 "cpu_s": round(proc.get("cpu_s", 0.0), 2), "peak_rss_mb": proc.get("peak_rss_mb", 0.0),
                 "processes": proc.get("processes", 0)}
        if ti["task_id"] == "load_partition" and ti.get("state") == "success":
            summary = stack.xcom(run_id, "load_partition", key[1]) or {}
            summaries.append(summary)
            entry.update({k: summary.get(k) for k in ("rows", "upserted", "failed", "failed_by_code", "retried",
                                                      "rounds", "job_count")})
        tasks.append(entry)
    # Time lost waiting for Airflow retries (retry_delay): the gap between a failed try's end and the next try's
    # start. Retries of different partitions wait in parallel, so the largest gap is what the run lost at most.
    gaps = []
    for t in earlier:
        cur = next((x for x in tasks if x["task_id"] == t["task_id"] and x["map_index"] == t["map_index"]), None)
        if cur and cur.get("start_date") and t.get("end_date"):
            gaps.append(max(0.0, _ts(cur["start_date"]) - _ts(t["end_date"])))
    verify = stack.xcom(run_id, "verify") if any(t["task_id"] == "verify" and t["state"] == "success"
                                                 for t in tasks) else None
    kinds = sampler.by_kind()
    loads = [t for t in tasks if t["task_id"] == "load_partition"]
    return {
        "run_id": run_id,
        "state": run.get("state"),
        "conf": conf,
        "wall_s": round(wall, 2),
        "run_start": run.get("start_date"),
        "run_end": run.get("end_date"),
        "queued_at": run.get("queued_at"),
        "tasks": tasks,
        "partitions": len(loads),
        "rows": sum(int(s.get("rows") or 0) for s in summaries),
        "upserted": sum(int(s.get("upserted") or 0) for s in summaries),
        "failed_rows": sum(int(s.get("failed") or 0) for s in summaries),
        "retried_rows": sum(int(s.get("retried") or 0) for s in summaries),
        "rounds_max": max((int(s.get("rounds") or 0) for s in summaries), default=0),
        "jobs": sum(int(s.get("job_count") or 0) for s in summaries),
        "task_retries": sum(max(0, int(t.get("try_number") or 1) - 1) for t in tasks),
        "earlier_tries": earlier,
        "max_retry_wait_s": round(max(gaps, default=0.0), 2),
        "wall_s_without_retry_wait": round(wall - max(gaps, default=0.0), 2),
        "verify": verify,
        "process_kinds": kinds,
        "task_cpu_s": round(sum(t["cpu_s"] for t in tasks), 2),
        "partition_task_peak_rss_mb": max((t["peak_rss_mb"] for t in loads), default=0.0),
        "partition_task_cpu_s": round(sum(t["cpu_s"] for t in loads), 2),
        "airflow_cpu_s": round(sum(k["cpu_s"] for k in kinds.values()), 2),
        "task_processes": [{"pid": r.pid, "title": r.title[:120], "cpu_s": round(r.cpu_s, 2),
                            "peak_rss_mb": r.peak_rss_mb, "seconds": round(r.last_seen - r.first_seen, 1)}
                           for r in sampler.records("task")],
    }

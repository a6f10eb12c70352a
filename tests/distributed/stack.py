"""Airflow 3.3 with CeleryExecutor as separate processes, PostgreSQL, Redis and the emulator: one distributed stack.

:class:`CeleryStack` is :class:`bench.airflow_runner.AirflowStack` (same isolated home, emulator connection,
ports on 127.0.0.1, REST client, pool, trigger and wait helpers) with ``airflow standalone`` replaced by the
components a real deployment runs one by one, each in its own process group with its own log:

* ``airflow api-server`` (REST + Execution API), ``airflow scheduler`` (CeleryExecutor), ``airflow dag-processor``,
  ``airflow triggerer``;
* two ``airflow celery worker`` processes, ``worker1@<host>`` and ``worker2@<host>``, each with a
  ``hostname_callable`` (:mod:`tests.distributed.hostname`) that makes the task instances it runs record which
  worker ran them;
* metadata database and Celery result backend on PostgreSQL, broker on Redis (:mod:`tests.distributed.services`).

:class:`DistributedRun` puts everything under one folder (``.distributed/``), starts it in order with timings,
stops it all in ``stop()`` (also from ``atexit`` and on SIGTERM), kills what a killed earlier run left behind, and
can print the tail of every log.

Settings (environment): ``DISTRIBUTED_ROWS`` (30000), ``DISTRIBUTED_BAD_ROWS`` (25), ``DISTRIBUTED_NULL_KEYS`` (3),
``DISTRIBUTED_PARTITIONS`` (6), ``DISTRIBUTED_RUN_TIMEOUT`` (seconds, 900), ``DISTRIBUTED_DIR`` (``.distributed``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.airflow_runner import DAG_ID, ROOT, TERMINAL_RUN_STATES, AirflowStack, free_port, stop_process_groups
from emulator.harness import EmulatorProcess
from tests.distributed.hostname import WORKER_NAME_ENV
from tests.distributed.services import Postgres, Redis, tail
from tests.e2e_support import write_settings

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: Airflow's log servers listen on every interface (no host setting in 3.3.2). All components share one
#: AIRFLOW_HOME here, so the api-server reads every log from disk and none is started: only 127.0.0.1 ports.
SKIP_SERVE_LOGS = {"scheduler": ("--skip-serve-logs",), "triggerer": ("--skip-serve-logs",)}
_READY = re.compile(r"(\S+@\S+) ready\.")
# A Celery worker's log line for each workload it runs (a first attempt, a retry or a resume after deferral).
_EXECUTING = re.compile(r"^(\S+) .*?Executing workload in Celery: .*ti=TaskInstanceDTO\(id=UUID\('([0-9a-f-]{36})'\), "
                        r"task_id='([^']+)'.*? map_index=(-?\d+)", re.MULTILINE)


ROWS = int(os.environ.get("DISTRIBUTED_ROWS", "30000"))
BAD_ROWS = int(os.environ.get("DISTRIBUTED_BAD_ROWS", "25"))
NULL_KEYS = int(os.environ.get("DISTRIBUTED_NULL_KEYS", "3"))
PARTITIONS = int(os.environ.get("DISTRIBUTED_PARTITIONS", "6"))
RUN_TIMEOUT = float(os.environ.get("DISTRIBUTED_RUN_TIMEOUT", "900"))


@dataclass
class SyncRun:
    """One DAG run under CeleryExecutor, as seen through the REST API and the workers' logs."""

    run_id: str
    state: str
    wall_s: float
    task_instances: list[dict[str, Any]]
    #: (task_id, map_index) -> {"states": states in the order seen, "triggerer_jobs": ids, "hostnames": seen}
    seen: dict[tuple[str, int], dict[str, Any]]
    #: every workload a worker ran (worker, at, ti_id, task_id, map_index), in time order
    executions: list[dict[str, Any]]
    verify: dict[str, Any] | None
    loads: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loads = sorted((t for t in self.task_instances if t["task_id"] == "load_partition"),
                            key=lambda t: t["map_index"])

    def workers_of(self, ti_id: str) -> list[str]:
        """The workers that ran this try of a task instance (a retry has a new id), in order."""
        return [e["worker"] for e in self.executions if e["ti_id"] == ti_id]

    def workers_of_index(self, map_index: int) -> list[str]:
        """The workers that ran any try of ``load_partition[map_index]``, in order."""
        return [e["worker"] for e in self.executions
                if e["task_id"] == "load_partition" and e["map_index"] == map_index]


@dataclass
class CeleryStack(AirflowStack):
    """Airflow's components and ``len(workers)`` Celery workers as separate processes (see the module doc).

    :param db_url: SQLAlchemy URL of the metadata database.
    :param broker_url: Celery broker (``redis://...``).
    :param result_backend: Celery result backend (``db+postgresql://...``).
    :param workers: Worker names; each worker's Celery hostname is ``<name>@%h``.
    :param concurrency: Task slots per worker.
    """

    db_url: str = ""
    broker_url: str = ""
    result_backend: str = ""
    workers: tuple[str, ...] = ("worker1", "worker2")
    concurrency: int = 2
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    base_env: dict[str, str] = field(default_factory=dict)
    #: Called after each process is started (DistributedRun records the pids, for a later run to clean up).
    on_spawn: Callable[[], None] | None = None

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update({
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": self.result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
            # tests/conftest.py sets SYNC_MIN_DEFER_S=0 for in-process runs; a real triggerer needs the
            # settings file's minimum wait (apache/airflow#72716): empty = not set.
            "SYNC_MIN_DEFER_S": "",
            # A failing partition is retried after seconds, not the DAG's 2 minutes: a broken build fails fast.
            "SYNC_LOAD_RETRY_DELAY_S": "5",
        })
        return env

    def worker_env(self, name: str) -> dict[str, str]:
        return {**self.base_env, WORKER_NAME_ENV: name,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.distributed.hostname.worker_hostname"}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def airflow(self, *args: str, timeout: float = 600) -> str:
        """Run one ``airflow`` CLI command with the stack's environment; its output goes to ``cli.log``."""
        out = subprocess.run(["airflow", *args], cwd=self.home, env=self.base_env, capture_output=True, text=True,
                             timeout=timeout)
        with open(self.home / "cli.log", "a") as log:
            log.write(f"$ airflow {' '.join(args)}\n{out.stdout}{out.stderr}\n")
        if out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return out.stdout

    def prepare(self) -> CeleryStack:
        """Settle the environment (one JWT secret and set of ports for all) and migrate the metadata database."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.http.trust_env = False
        self.base_env = self.env()
        self.airflow("db", "migrate")
        return self

    def start(self, timeout: float = 300.0) -> CeleryStack:
        if not self.base_env:
            self.prepare()
        for name in COMPONENTS:
            self._spawn(name, ["airflow", name, *SKIP_SERVE_LOGS.get(name, ())], self.base_env)
        for name in self.workers:
            self._spawn(name, ["airflow", "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency",
                               str(self.concurrency), "--skip-serve-logs"], self.worker_env(name))
        self.proc, self.log_path = self.procs["api-server"], self.logs["api-server"]
        try:
            self._wait_ready(timeout)
            self.wait_workers(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.logs[name] = self.home / f"{name}.log"
        with open(self.logs[name], "ab") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(cmd, cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        if self.on_spawn is not None:
            self.on_spawn()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{tail(self.logs[name])}")

    def ready_workers(self) -> set[str]:
        """Celery node names that logged ``<name>@<host> ready.``"""
        return {m.group(1) for name in self.workers
                for m in _READY.finditer(self.logs[name].read_text(errors="replace"))}

    def wait_workers(self, timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        while len(nodes := self.ready_workers()) < len(self.workers):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"Celery workers ready after {timeout:.0f}s: {sorted(nodes)}")
            time.sleep(0.5)
        return nodes

    def executions(self) -> list[dict[str, Any]]:
        """Every workload the workers ran, from their logs: worker, time, task instance id, task id, map index."""
        runs = []
        for name in self.workers:
            for m in _EXECUTING.finditer(self.logs[name].read_text(errors="replace")):
                runs.append({"worker": name, "at": m.group(1), "ti_id": m.group(2), "task_id": m.group(3),
                             "map_index": int(m.group(4))})
        return sorted(runs, key=lambda r: r["at"])

    def stop(self) -> None:
        """Every component at once: SIGINT, then SIGTERM and SIGKILL to each process group."""
        self.http.close()
        self.proc = None
        stop_process_groups(list(self.procs.values()))
        self.procs = {}

    # -- watching a run ------------------------------------------------------------------------------------------
    def watch_run(self, run_id: str, timeout: float, interval: float = 0.5,
                  progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[tuple[str, int], dict]]:
        """Poll the run until it ends; per task instance, the states, triggerer job ids and hostnames seen."""
        seen: dict[tuple[str, int], dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        path = f"dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
        last = ""
        while True:
            self._check_alive()
            for ti in self.task_instances(run_id):
                entry = seen.setdefault((ti["task_id"], int(ti.get("map_index", -1))),
                                        {"states": [], "triggerer_jobs": set(), "hostnames": set()})
                if not entry["states"] or entry["states"][-1] != ti.get("state"):
                    entry["states"].append(ti.get("state"))
                if ti.get("triggerer_job"):
                    entry["triggerer_jobs"].add(ti["triggerer_job"].get("id"))
                if ti.get("hostname"):
                    entry["hostnames"].add(ti["hostname"])
            run = self.get(path) or {}
            line = " ".join(f"{t[0][:4]}[{t[1]}]={e['states'][-1]}" for t, e in sorted(seen.items()))
            if progress and line != last:
                progress(line)
                last = line
            if run.get("state") in TERMINAL_RUN_STATES:
                return run, seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run.get('state')} after {timeout:.0f}s: {line}")
            time.sleep(interval)


def _say(message: str) -> None:
    print(f"[distributed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class DistributedRun:
    """Everything the test needs under ``root``, started in order and stopped in ``stop()``.

    :param root: Working folder (wiped at start): ``postgres/``, ``redis/``, ``emulator/``, ``airflow/``.
    :param rows, bad_rows, null_keys, accounts: What the emulator is seeded with.
    """

    root: Path
    rows: int = 30_000
    bad_rows: int = 25
    null_keys: int = 3
    accounts: int | None = None
    random_seed: int = 77
    timings: dict[str, float] = field(default_factory=dict)
    postgres: Postgres | None = None
    redis: Redis | None = None
    org: EmulatorProcess | None = None
    airflow: CeleryStack | None = None
    say: Callable[[str], None] = _say

    @property
    def pids_file(self) -> Path:
        return self.root / "pids.json"

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        result = fn()
        self.timings[name] = round(time.monotonic() - t0, 1)
        return result

    def start(self) -> DistributedRun:
        atexit.register(self.stop)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            # A TERM (CI timeout, kill) raises SystemExit instead, so every finally and teardown still runs.
            signal.signal(signal.SIGTERM, _exit_on_term)
        t0 = time.monotonic()
        self.kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.postgres = self._timed("postgres_s", lambda: Postgres(self.root / "postgres").start())
        self.say(f"PostgreSQL {self.postgres.bindir.parent.name} on 127.0.0.1:{self.postgres.port} "
                 f"({self.timings['postgres_s']}s)")
        self.redis = self._timed("redis_s", lambda: Redis(self.root / "redis").start())
        self.say(f"Redis on 127.0.0.1:{self.redis.port} ({self.timings['redis_s']}s)")
        self._record_pids()
        org = EmulatorProcess(self.root / "emulator")
        self._timed("seed_s", lambda: org.seed(records=self.rows, accounts=self.accounts, random_seed=self.random_seed,
                                               bad_rows=self.bad_rows, null_keys=self.null_keys))
        self.org = self._timed("emulator_s", org.start)
        self._record_pids()
        self.say(f"emulator on {self.org.instance_url}: {self.rows:,} rows ({self.bad_rows} bad, {self.null_keys} "
                 f"without a key), seeded in {self.timings['seed_s']}s")
        home = self.root / "airflow"
        home.mkdir()
        self.airflow = CeleryStack(
            # The repo's settings with test-speed polling, and every Bulk wait deferred to the triggerer (jobs of
            # the instant emulator finish within the seconds the operator would otherwise wait in the worker).
            home=home, conn=self.org.info, sync_config=write_settings(home / "sync_config.yaml", wait_before_defer_s=0),
            db_url=self.postgres.url(), broker_url=self.redis.url(),
            result_backend="db+" + self.postgres.url("postgresql"), on_spawn=self._record_pids)
        self._timed("migrate_s", self.airflow.prepare)
        self.say(f"metadata database migrated on PostgreSQL ({self.timings['migrate_s']}s)")
        self._timed("airflow_up_s", self.airflow.start)
        self.say(f"Airflow up on {self.airflow.api} ({self.timings['airflow_up_s']}s): "
                 f"{', '.join(self.airflow.procs)}; workers {sorted(self.airflow.ready_workers())}")
        self._timed("dag_parsed_s", self.airflow.wait_for_dag)
        pool = self.airflow.ensure_pool()
        assert pool["include_deferred"] is True, pool
        self.timings["setup_s"] = round(time.monotonic() - t0, 1)
        self.say(f"DAG parsed, pool {pool['name']} ({pool['slots']} slots, deferred included); "
                 f"set-up took {self.timings['setup_s']}s")
        return self

    def stop(self) -> None:
        """Airflow first (its workers still need the broker to shut down), then the emulator, Redis, PostgreSQL.

        Each part is forgotten only once stopped: a stop interrupted by a signal is finished by ``atexit``.
        """
        t0 = time.monotonic()
        running = any(x is not None for x in (self.airflow, self.org, self.redis, self.postgres))
        for part in ("airflow", "org", "redis", "postgres"):
            service = getattr(self, part)
            if service is not None:
                service.stop()
                setattr(self, part, None)
        with contextlib.suppress(OSError):
            self.pids_file.unlink()
        if running:
            self.timings["teardown_s"] = round(time.monotonic() - t0, 1)
            self.say(f"stopped everything in {self.timings['teardown_s']}s")
        atexit.unregister(self.stop)
        if signal.getsignal(signal.SIGTERM) is _exit_on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # -- leftovers of a killed run -------------------------------------------------------------------------------
    def _record_pids(self) -> None:
        procs: dict[str, int] = {}
        if self.airflow is not None:
            procs.update({name: p.pid for name, p in self.airflow.procs.items()})
        if self.redis is not None and self.redis.proc is not None:
            procs["redis"] = self.redis.proc.pid
        if self.org is not None and self.org.proc is not None:
            procs["emulator"] = self.org.proc.pid
        record = {name: {"pid": pid, "started": _started(pid)} for name, pid in procs.items()}
        self.pids_file.write_text(json.dumps(record, indent=1))

    def kill_leftovers(self) -> None:
        """Kill what a killed earlier run recorded (the same process: pid and start time), stop its PostgreSQL.

        The start time identifies the process (Celery and the api-server change their titles, so not the command
        line); process groups go as a whole (a worker's pool processes, a triggerer's runner).
        """
        with contextlib.suppress(OSError, ValueError):
            for name, rec in json.loads(self.pids_file.read_text()).items():
                pid = int(rec["pid"])
                if rec.get("started") is not None and _started(pid) == rec["started"]:
                    self.say(f"killing {name} (pid {pid}) left by an earlier run")
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        if os.getpgid(pid) == pid:
                            os.killpg(pid, signal.SIGKILL)
                        else:
                            os.kill(pid, signal.SIGKILL)
        Postgres.stop_stale(self.root / "postgres")

    # -- diagnostics ---------------------------------------------------------------------------------------------
    def log_files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        if self.postgres is not None:
            files["postgres"] = self.postgres.log_path
        if self.redis is not None:
            files["redis"] = self.redis.log_path
        if self.org is not None:
            files["emulator"] = self.org.log_path
        if self.airflow is not None:
            files.update(self.airflow.logs)
            files["airflow cli"] = self.airflow.home / "cli.log"
        return files

    def dump_logs(self, lines: int = 60) -> None:
        """The tail of every process log, then the errors of the task logs (JSON lines, one file per try)."""
        for name, path in self.log_files().items():
            print(f"\n===== {name}: last {lines} lines of {path} =====\n{tail(path, lines)}", file=sys.stderr)
        if self.airflow is None:
            return
        for path in sorted((self.airflow.home / "logs").glob("dag_id=*/**/attempt=*.log*"))[:40]:
            errors = [line[:1500] for line in path.read_text(errors="replace").splitlines()
                      if '"level":"error"' in line or '"level":"critical"' in line]
            if errors:
                rel = path.relative_to(self.airflow.home / "logs")
                print(f"\n===== task log {rel}: {len(errors)} errors =====\n" + "\n".join(errors[:5]), file=sys.stderr)


def _exit_on_term(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def default_root() -> Path:
    return Path(os.environ.get("DISTRIBUTED_DIR") or ROOT / ".distributed")


def settings() -> dict[str, int]:
    """What the emulator is seeded with (:class:`DistributedRun`'s arguments)."""
    return {"rows": ROWS, "bad_rows": BAD_ROWS, "null_keys": NULL_KEYS}

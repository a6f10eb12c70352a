"""What the benchmark measures besides wall time: processes' CPU and peak memory, emulator counters, the floor.

* :class:`TreeSampler` follows whole process trees (``airflow standalone`` and everything it forks) with psutil
  every ``interval`` seconds. Per process it keeps the last CPU seconds (user + system) and the peak resident set
  from ``/proc/<pid>/status`` ``VmHWM`` -- the kernel's high-water mark, so a peak between two samples is not
  missed. CPU spent after a process's last sample is lost: at most ``interval`` per process.
* :func:`run_child` runs a contender in a child process and reaps it with ``os.wait4``, which returns that
  child's own rusage (CPU seconds, ``ru_maxrss``) exactly, including its own children.
* :func:`stats_summary` turns the emulator's ``/__emulator/stats`` into the table's columns.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

LOCK_CODE = "UNABLE_TO_LOCK_ROW"
INTERNAL_BATCH_RECORDS = 10_000
# Published anchors of the realistic profile (timing_model.md §1.3/§3): one 10,000-record batch on one thread.
BATCH_SECONDS = 36.0
DAILY_BATCH_ALLOCATION = 15_000


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def peak_rss_mb(pid: int) -> float | None:
    """``VmHWM`` (peak resident set) of a live process, in MB; ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.M)
    return round(int(m.group(1)) / 1024, 1) if m else None


@dataclass
class ProcRecord:
    """One process seen by the sampler."""

    pid: int
    title: str
    kind: str
    first_seen: float
    last_seen: float
    cpu_start: float  # CPU seconds already spent when first seen (0 for processes born during the run)
    cpu_last: float
    peak_rss_mb: float = 0.0

    @property
    def cpu_s(self) -> float:
        return max(0.0, self.cpu_last - self.cpu_start)


@dataclass
class TreeSampler:
    """Samples every process under ``roots`` (recursively) in a background thread.

    :param roots: Root pids; their whole current subtree is sampled each round.
    :param classify: ``title -> kind`` (e.g. ``"task"``, ``"scheduler"``); the title is the process title
        (Airflow sets it with setproctitle) or the command line.
    :param interval: Seconds between samples.
    """

    roots: list[int]
    classify: Callable[[str], str]
    interval: float = 0.2
    procs: dict[tuple[int, float], ProcRecord] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    started_at: float = 0.0

    def start(self) -> TreeSampler:
        self.started_at = time.time()
        self.sample(initial=True)
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a sampling hiccup must never end the benchmark
                continue

    def _tree(self) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                out.append(root)
                out.extend(root.children(recursive=True))
            except psutil.Error:
                continue
        return out

    def sample(self, initial: bool = False) -> None:
        now = time.time()
        for p in self._tree():
            try:
                with p.oneshot():
                    created = p.create_time()
                    cpu = p.cpu_times()
                    spent = cpu.user + cpu.system
                    key = (p.pid, created)
                    rec = self.procs.get(key)
                    if rec is None:
                        title = " ".join(p.cmdline()) or p.name()
                        # A process born after the sampler started counts from zero (its first sample may already
                        # carry CPU); one that existed before counts only what it spends from now on.
                        born_during = not initial and created >= self.started_at - 1
                        rec = ProcRecord(pid=p.pid, title=title, kind=self.classify(title), first_seen=now,
                                         last_seen=now, cpu_start=0.0 if born_during else spent, cpu_last=spent)
                        self.procs[key] = rec
                    else:
                        # Airflow retitles processes (a forked task process starts with its supervisor's title);
                        # keep the last *recognisable* title: while a process exits its title can read truncated.
                        title = " ".join(p.cmdline()) or p.name()
                        if title != rec.title:
                            kind = self.classify(title)
                            if kind != "other":
                                rec.title, rec.kind = title, kind
                    rec.last_seen = now
                    rec.cpu_last = spent
                    hwm = peak_rss_mb(p.pid)
                    if hwm is not None:
                        rec.peak_rss_mb = max(rec.peak_rss_mb, hwm)
            except psutil.Error:
                continue

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """CPU seconds, peak RSS and process count per kind."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.procs.values():
            agg = out.setdefault(rec.kind, {"cpu_s": 0.0, "peak_rss_mb": 0.0, "processes": 0})
            agg["cpu_s"] += rec.cpu_s
            agg["peak_rss_mb"] = max(agg["peak_rss_mb"], rec.peak_rss_mb)
            agg["processes"] += 1
        for agg in out.values():
            agg["cpu_s"] = round(agg["cpu_s"], 2)
        return out

    def records(self, kind: str) -> list[ProcRecord]:
        return [r for r in self.procs.values() if r.kind == kind]


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has spent so far."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


@dataclass
class ChildResult:
    """A contender run in a child process: its JSON answer and its own resource usage."""

    returncode: int
    result: dict[str, Any]
    cpu_s: float
    peak_rss_mb: float
    wall_s: float


def run_child(module: str, payload: dict[str, Any], *, log_path: Path, timeout: float, cwd: Path,
              nice: int = 0) -> ChildResult:
    """``python -m <module> --child`` with ``payload`` as JSON on stdin; the answer is the last stdout line.

    Reaped with ``os.wait4`` so the rusage is this child's alone (``ru_maxrss`` is KiB on Linux).
    """
    out_path = log_path.with_suffix(".result.json")
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(cwd / "plugins")])}
    started = time.monotonic()
    with open(log_path, "ab") as log:
        prefix = ["nice", "-n", str(nice)] if nice else []  # nice execs: the pid stays the child's
        proc = subprocess.Popen([*prefix, sys.executable, "-m", module, "--child", str(out_path)], cwd=cwd,
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(payload).encode())
        proc.stdin.close()
        deadline = started + timeout
        status = rusage = None
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{module} did not finish within {timeout:.0f}s; see {log_path}")
                time.sleep(0.1)
        except BaseException:
            _kill_group(proc.pid)
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    return ChildResult(returncode=proc.returncode, result=result, cpu_s=round(rusage.ru_utime + rusage.ru_stime, 2),
                       peak_rss_mb=round(rusage.ru_maxrss / 1024, 1), wall_s=round(wall, 2))


def _kill_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGTERM)
        time.sleep(1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def endpoint_group(key: str) -> str:
    """Emulator endpoint key (``"POST /services/data/vXX.X/jobs/ingest"``) -> a coarse group for the table."""
    path = key.split(" ", 1)[-1]
    if "/oauth2/" in path or path.endswith("/a360/token"):
        return "auth"
    if "/jobs/ingest" in path:
        return "bulk_ingest"
    if "/jobs/query" in path:
        return "bulk_query"
    if "/ssot/" in path or path.startswith(("/api/v1/", "/api/v2/", "/api/v3/")):
        return "datacloud"
    return "rest"


def stats_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The emulator counters the results table reports."""
    requests = stats.get("requests") or {}
    groups: dict[str, int] = {}
    for key, n in requests.items():
        g = endpoint_group(key)
        groups[g] = groups.get(g, 0) + int(n)
    failures = stats.get("failures_by_code") or {}
    return {
        "requests_total": int(stats.get("requests_total") or sum(requests.values())),
        "requests_by_group": dict(sorted(groups.items())),
        "requests_by_endpoint": dict(sorted(requests.items(), key=lambda kv: -kv[1])),
        "status_codes": stats.get("status_codes") or {},
        "bulk_jobs": int(stats.get("bulk_jobs_created") or 0),
        "bulk_batches": int(stats.get("bulk_batches") or 0),
        "bulk_batch_retries": int(stats.get("bulk_batch_retries") or 0),
        "bulk_records": int(stats.get("bulk_records") or 0),
        "bulk_records_failed": int(stats.get("bulk_records_failed") or 0),
        "bulk_uploads": int(stats.get("bulk_uploads") or 0),
        "bulk_upload_bytes": int(stats.get("bulk_upload_bytes") or 0),
        "duplicate_uploads": int(stats.get("duplicate_uploads") or 0),
        "lock_failures": int(failures.get(LOCK_CODE) or 0),
        "failures_by_code": dict(failures),
        "dc_queries": int(stats.get("dc_queries") or 0),
        "dc_pages": int(stats.get("dc_pages") or 0),
        "dc_rows_served": int(stats.get("dc_rows_served") or 0),
    }


def floor_seconds(rows: int, threads: int = 15, batch_s: float = BATCH_SECONDS) -> dict[str, float]:
    """The org-side lower bound on the modelled clock: ``ceil(rows / 10,000)`` batches over ``threads``.

    ``waves`` rounds up to whole waves of batches (what a strategy with equal batches can reach); ``continuous``
    is the pure work bound (batches × 36 s / threads).
    """
    batches = math.ceil(rows / INTERNAL_BATCH_RECORDS)
    return {"batches": batches, "threads": threads,
            "waves_s": math.ceil(batches / threads) * batch_s,
            "continuous_s": round(batches * batch_s / threads, 1)}

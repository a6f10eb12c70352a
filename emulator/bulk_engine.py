"""Bulk API 2.0 ingest processing: job store, internal batches, worker pool, record locks and result files.

How a job runs (``salesforce_api.md`` §4.7/§4.11, ``timing_model.md`` §1 and §3)
----------------------------------------------------------------------------------
``PATCH state=UploadComplete`` queues the job. After ``job_dequeue_delay_s`` a worker takes the job's *parent
batch*: it reads the header, compiles it (an unknown column fails the job) and splits the upload into internal
batches of ``internal_batch_records`` by byte offsets, so nothing but one batch is ever held in memory. The
batches join one org-wide FIFO queue served by ``org_worker_threads`` threads shared by all jobs; one batch runs
on one thread. A batch is processed in chunks of ``chunk_records`` rows, each chunk one transaction: in a timed
profile (``per_record_ms > 0``) a chunk takes ``chunk_records × per_record_ms`` while holding its parents' locks
and commits on its own; in the instant profile the chunks of a batch are committed together (one SQLite
transaction per batch), which keeps the emulator fast without changing any result. When the last batch is done
the job becomes ``JobComplete`` after ``job_finalize_s``.

Lock model
----------
Opportunity rows lock their parent Account (``AccountId`` or ``Account.<indexed field>``) for the duration of
their chunk's transaction. Two mechanisms produce ``UNABLE_TO_LOCK_ROW``:

1. *Real waits* (timed profiles). A chunk acquires all its parents atomically from an org-wide lock table. If
   another running chunk holds one, it waits up to ``lock_wait_timeout_s`` (scaled); on timeout the whole chunk
   fails with ``UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record or N records: <ids>:--``.
   Chunks last 0.72 s in the realistic profile, so failures need real convoys on one Account.
2. *The contention knob* ``lock_contention_rate`` (0..1, any profile, set with ``PUT /__emulator/faults``). Every
   running batch registers the set of parent Accounts it touches. A chunk is exposed to contention in proportion
   to the share of its rows whose Account is also registered by *another* batch running at the same time (any
   job); the chunk fails with probability ``rate × exposed_rows / chunk_rows`` (a seeded draw per chunk and
   attempt, so runs are repeatable). Data sorted by Account with each Account's rows in one job only shares the
   one Account that straddles an internal-batch boundary (≈20 exposed rows out of 10,000 → well under 1 % of the
   failures of randomly interleaved rows, where every row is exposed); randomly interleaved concurrent jobs share
   nearly every Account and fail at close to ``rate`` per chunk.

Either way, once more than 100 rows of a batch attempt failed on locks the rest of the batch goes back to the end
of the queue (``retries`` + 1) and failed rows are not retried; a batch retried more than ``max_batch_retries``
times fails the job, leaving the rest in ``unprocessedrecords``. A batch attempt that runs longer than
``batch_time_limit_s`` (modelled time) is requeued the same way.

Persistence
-----------
Jobs and batches live in ``bulk_jobs``/``bulk_batches`` in ``org.sqlite``; the upload and per-batch result files
live under ``org.jobs_dir/<jobId>/``. A batch's checkpoint (next row, result-file lengths) commits in the same
transaction as its records, so after a restart result files are cut back to the checkpoint and the batch resumes
exactly where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from .bulk_validation import (
    DELIMITERS,
    IGNORE,
    LINE_ENDINGS,
    STAGE_FLAGS,
    HeaderError,
    IgnoreType,
    Plan,
    RowError,
    compile_plan,
    lock_error,
    required_missing,
)
from .ids import case_safe, make_id
from .schema import SObject, get_object
from .state import Org, connect

log = logging.getLogger("emulator.bulk")
# An ignored (empty) CSV value that reaches an INSERT binds as NULL; UPDATEs leave such columns out.
sqlite3.register_adapter(IgnoreType, lambda _v: None)

JOB_DDL = """
CREATE TABLE IF NOT EXISTS bulk_jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, kind TEXT NOT NULL, object TEXT, operation TEXT NOT NULL,
    external_id_field TEXT, assignment_rule_id TEXT, column_delimiter TEXT NOT NULL, line_ending TEXT NOT NULL,
    content_type TEXT NOT NULL, api_version REAL NOT NULL, created_by TEXT NOT NULL, created_date TEXT NOT NULL,
    system_modstamp TEXT NOT NULL, state TEXT NOT NULL, error_message TEXT, query TEXT,
    uploaded INTEGER NOT NULL DEFAULT 0, upload_bytes INTEGER NOT NULL DEFAULT 0, header_end INTEGER,
    header_text TEXT, total_batches INTEGER, records_processed INTEGER NOT NULL DEFAULT 0,
    records_failed INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0,
    total_ms INTEGER NOT NULL DEFAULT 0, api_active_ms INTEGER NOT NULL DEFAULT 0,
    apex_ms INTEGER NOT NULL DEFAULT 0, started_at REAL, finished_at REAL, finalized INTEGER NOT NULL DEFAULT 0,
    result_rows INTEGER
);
CREATE INDEX IF NOT EXISTS ix_bulk_jobs_kind_seq ON bulk_jobs(kind, seq);
-- Unique external ids match case-insensitively (Salesforce's default); these keep those lookups indexed.
CREATE INDEX IF NOT EXISTS "ix_Opportunity_ExternalId__c_nocase" ON "Opportunity"("ExternalId__c" COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS "ix_Account_ExternalId__c_nocase" ON "Account"("ExternalId__c" COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS bulk_batches (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, start_off INTEGER NOT NULL, end_off INTEGER NOT NULL,
    state TEXT NOT NULL, next_record INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0,
    ok_off INTEGER NOT NULL DEFAULT 0, err_off INTEGER NOT NULL DEFAULT 0, unp_off INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, seq)
);
"""

TERMINAL = ("JobComplete", "Failed", "Aborted")
LOCK_REQUEUE_THRESHOLD = 100  # Bulk API: >100 lock failures in a batch requeue the rest of it
ID_BLOCK = 10_000
OUTCOME_WIDTH = 20  # 18-character id, outcome flag (c created, u updated, f failed), newline
BLANK_ID = " " * 18
UNTIMED_PARALLELISM = 2  # one thread in Python while another is inside SQLite (which releases the GIL)
READ_CHUNK = 1 << 20


_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
TEXT_TYPES = frozenset({"string", "textarea", "picklist", "email", "phone", "url", "combobox"})


def fold(value: str) -> str:
    """Case folding as SQLite's NOCASE does it (ASCII only)."""
    return value.translate(_ASCII_FOLD)


def match_sql(table: str, column: str, text: bool) -> str:
    """``(input value, Id)`` pairs for a JSON array of values; text keys match case-insensitively."""
    collate = " COLLATE NOCASE" if text else ""
    return f'SELECT j.value, t."Id" FROM json_each(?) j JOIN "{table}" t ON t."{column}" = j.value{collate}'


def sf_time(t: float | None = None) -> str:
    """Salesforce's job timestamp format (whole seconds, as real job info shows)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(time.time() if t is None else t))


def now_ms_string() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}+0000"


# -- ids -----------------------------------------------------------------------------------------------------------
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
# Two low base-62 digits with the upper-case bits they contribute at positions 3 and 4 of their 5-char chunk.
_LOW2 = [(a + b, (8 if "A" <= a <= "Z" else 0) | (16 if "A" <= b <= "Z" else 0)) for a in _B62 for b in _B62]


def id_block(prefix: str, start: int, n: int, pod: str = "5g") -> list[str]:
    """``[make_id(prefix, k) for k in range(start, start + n)]``, about ten times faster."""
    out: list[str] = []
    k = start
    end = start + n
    while k < end:
        base = make_id(prefix, k, pod)
        head = base[:13]  # prefix, pod and the upper 8 of the 10 base-62 digits
        hi = base[10:13]  # the first three characters of the last 5-char chunk
        hi_bits = sum(1 << i for i, ch in enumerate(hi) if "A" <= ch <= "Z")
        fixed = base[15:17]  # checksum characters of the first two chunks
        low = k % 3844
        run = min(3844 - low, end - k)
        for lo, bits in _LOW2[low:low + run]:
            out.append(head + lo + fixed + _SUFFIX[hi_bits | bits])
        k += run
    return out


class IdAllocator:
    """Record ids from ``org.next_number(object)`` blocks, so they survive restarts and never collide with REST."""

    def __init__(self, org: Org, obj: SObject) -> None:
        self.org = org
        self.name = obj.name
        self.prefix = obj.key_prefix
        self.next = 0
        self.end = 0

    def ensure(self, n: int) -> None:
        """Reserve at least ``n`` ids; call outside any open write transaction (next_number commits)."""
        if self.end - self.next < n:
            size = max(n, ID_BLOCK)
            self.next = self.org.next_number(self.name, size)
            self.end = self.next + size

    def take(self, n: int) -> list[str]:
        ids = id_block(self.prefix, self.next, n)
        self.next += n
        return ids


# -- locks ------------------------------------------------------------------------------------------------------
class ParentLocks:
    """Org-wide parent-record locks; a chunk takes all of its parents at once or none (no deadlocks)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[str, object] = {}

    def acquire(self, ids: list[str], owner: object, timeout: float) -> list[str]:
        """Contended ids if the wait timed out, else ``[]`` with every id held by ``owner``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                busy = [i for i in ids if self._held.get(i, owner) is not owner]
                if not busy:
                    for i in ids:
                        self._held[i] = owner
                    return []
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return busy
                self._cond.wait(remaining)

    def release(self, ids: list[str], owner: object) -> None:
        with self._cond:
            for i in ids:
                if self._held.get(i) is owner:
                    del self._held[i]
            self._cond.notify_all()


class ContentionRegistry:
    """Which parent records each running batch touches (the lock_contention_rate knob's notion of overlap)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()

    def register(self, ids: set[str]) -> None:
        with self._lock:
            self._count.update(ids)

    def unregister(self, ids: set[str]) -> None:
        with self._lock:
            self._count.subtract(ids)
            for i in ids:
                if self._count[i] <= 0:
                    del self._count[i]

    def shared(self, ids: set[str]) -> set[str]:
        """The subset of a registered batch's ids that another running batch also registered."""
        with self._lock:
            count = self._count
            return {i for i in ids if count[i] > 1}


# -- runtime state ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    seq: int
    start: int
    end: int
    state: str = "Queued"  # Queued | Completed | NotProcessed | Stopped
    next_record: int = 0
    retries: int = 0
    ok_off: int = 0
    err_off: int = 0
    unp_off: int = 0


@dataclass
class Job:
    """In-memory side of a job that is not finished yet."""

    id: str
    obj: SObject
    operation: str
    ext_field: str | None
    delimiter: str
    line_ending: str
    dir: Path
    header_text: str = ""
    header_end: int = 0
    plan: Plan | None = None
    batches: dict[int, Batch] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_reason: str | None = None  # Aborted | Failed | Deleted | Shutdown
    error_message: str | None = None
    running: int = 0
    completed: int = 0
    reserved: int = 0  # rows handed out under fail_job_after_records
    finalizing: bool = False
    started: float = 0.0

    @property
    def data_path(self) -> Path:
        return self.dir / "data.csv"


@dataclass(slots=True)
class Item:
    """One data row while its batch is processed."""

    index: int
    row: list[str]
    vals: list[Any] | None
    error: RowError | None = None
    sf_id: str = ""
    created: bool = False
    parent: str | None = None
    rowid: int = 0


# -- the engine ---------------------------------------------------------------------------------------------------
class Engine:
    """Owns the worker threads and every ingest job of one org."""

    def __init__(self, org: Org) -> None:
        self.org = org
        self._local = threading.local()
        self.write_lock = threading.Lock()  # one bulk writer at a time; taken after any job lock, never before
        self.jobs_lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self.queue: deque[tuple[Callable[[], None], str]] = deque()
        self.cond = threading.Condition()
        self.active = 0
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.timers: set[threading.Timer] = set()
        self.locks = ParentLocks()
        self.registry = ContentionRegistry()
        self.allocators: dict[str, IdAllocator] = {}
        self.generation = 0
        with connect(org.org_db_path) as conn:
            conn.executescript(JOB_DDL)
            conn.commit()

    # -- plumbing -----------------------------------------------------------------------------------------------
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = connect(self.org.org_db_path)
            c.row_factory = sqlite3.Row
        return c

    def write(self, sql: str, params: tuple = ()) -> None:
        """A small write in its own transaction (job state changes)."""
        with self.write_lock:
            c = self.conn()
            c.execute(sql, params)
            c.commit()

    def job_row(self, job_id: str) -> sqlite3.Row | None:
        if len(job_id) == 15:
            job_id = case_safe(job_id)
        return self.conn().execute("SELECT * FROM bulk_jobs WHERE id=?", (job_id,)).fetchone()

    def allocator(self, obj: SObject) -> IdAllocator:
        a = self.allocators.get(obj.name)
        if a is None:
            a = self.allocators[obj.name] = IdAllocator(self.org, obj)
        return a

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after a modelled delay (scaled); at once when there is none."""
        wall = self.org.profile.scaled(delay_s) if delay_s > 0 else 0.0
        if wall <= 0:
            fn()
            return

        def fire() -> None:
            self.timers.discard(timer)
            if not self.stopping:
                try:
                    fn()
                except Exception:
                    log.exception("bulk timer failed")
        timer = threading.Timer(wall, fire)
        timer.daemon = True
        self.timers.add(timer)
        timer.start()

    def submit(self, fn: Callable[[], None], label: str, front: bool = False) -> None:
        with self.cond:
            if front:
                self.queue.appendleft((fn, label))
            else:
                self.queue.append((fn, label))
            self._ensure_threads()
            self.cond.notify()

    def _limit(self) -> int:
        """Batches processed at once: the org's thread pool; in an untimed profile at most ``UNTIMED_PARALLELISM``,
        since the work is then pure CPU under the GIL and more threads only add contention."""
        profile = self.org.profile
        threads = max(1, int(profile.org_worker_threads))
        return threads if profile.per_record_ms > 0 else min(threads, UNTIMED_PARALLELISM)

    def _ensure_threads(self) -> None:
        while len(self.threads) < self._limit():
            t = threading.Thread(target=self._worker, name=f"bulk-worker-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()

    def _worker(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and (not self.queue or self.active >= self._limit()):
                    self.cond.wait(0.5)
                if self.stopping:
                    return
                fn, label = self.queue.popleft()
                self.active += 1
            try:
                fn()
            except Exception:
                log.exception("bulk task %s failed", label)
            finally:
                with self.cond:
                    self.active -= 1
                    self.cond.notify()

    def start(self) -> None:
        with self.cond:
            self._ensure_threads()
        self.recover()

    def stop(self) -> None:
        with self.jobs_lock:
            for job in self.jobs.values():
                with job.lock:
                    if job.stop_reason is None:
                        job.stop_reason = "Shutdown"
        self.stopping = True
        for t in list(self.timers):
            t.cancel()
        with self.cond:
            self.cond.notify_all()
        deadline = time.monotonic() + 10
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def queue_depth(self) -> int:
        return len(self.queue)

    # -- job lifecycle ----------------------------------------------------------------------------------------
    def runtime(self, row: sqlite3.Row) -> Job:
        with self.jobs_lock:
            job = self.jobs.get(row["id"])
            if job is None:
                obj = get_object(row["object"])
                assert obj is not None
                job = Job(row["id"], obj, row["operation"], row["external_id_field"],
                          DELIMITERS[row["column_delimiter"]], LINE_ENDINGS[row["line_ending"]],
                          self.org.jobs_dir / row["id"], header_text=row["header_text"] or "",
                          header_end=row["header_end"] or 0)
                self.jobs[job.id] = job
            return job

    def close(self, row: sqlite3.Row) -> None:
        """``Open`` → ``UploadComplete`` (already validated by the caller); processing starts after the dequeue delay."""
        job = self.runtime(row)
        self.write("UPDATE bulk_jobs SET state='UploadComplete', system_modstamp=? WHERE id=?", (sf_time(), job.id))
        gen = self.generation
        self.later(self.org.profile.job_dequeue_delay_s,
                   lambda: self.submit(lambda: self._prepare(job, gen), f"prepare {job.id}"))

    def abort(self, row: sqlite3.Row) -> None:
        job = self.runtime(row)
        self.write("UPDATE bulk_jobs SET state='Aborted', system_modstamp=? WHERE id=?", (sf_time(), job.id))
        with job.lock:
            if job.stop_reason is None:
                job.stop_reason = "Aborted"
            idle = job.running == 0
        if idle:
            self._finalize_stopped(job)

    def delete(self, job_id: str) -> None:
        with self.jobs_lock:
            job = self.jobs.pop(job_id, None)
        if job is not None:
            with job.lock:
                job.stop_reason = job.stop_reason or "Deleted"
            deadline = time.monotonic() + 30
            while job.running and time.monotonic() < deadline:
                time.sleep(0.01)
        with self.write_lock:
            c = self.conn()
            c.execute("DELETE FROM bulk_batches WHERE job_id=?", (job_id,))
            c.execute("DELETE FROM bulk_jobs WHERE id=?", (job_id,))
            c.commit()
        shutil.rmtree(self.org.jobs_dir / job_id, ignore_errors=True)

    def fail(self, job: Job, message: str) -> None:
        """Fail the job as a whole; running batches stop at their next chunk."""
        with job.lock:
            if job.stop_reason is None:
                job.stop_reason = "Failed"
                job.error_message = message
            idle = job.running == 0
        if idle:
            self._finalize_stopped(job)

    def _enter(self, job: Job, gen: int) -> bool:
        with job.lock:
            if job.stop_reason is not None or gen != self.generation or self.stopping:
                return False
            job.running += 1
            return True

    def _leave(self, job: Job, completed_batch: bool = False) -> None:
        with job.lock:
            job.running -= 1
            if completed_batch:
                job.completed += 1
            stopped = job.stop_reason is not None and job.stop_reason not in ("Deleted", "Shutdown")
            idle = job.running == 0
            done = (not stopped and job.stop_reason is None and job.plan is not None
                    and job.completed == len(job.batches) and idle and not job.finalizing)
            if done:
                job.finalizing = True
        if stopped and idle:
            self._finalize_stopped(job)
        elif done:
            self.later(self.org.profile.job_finalize_s, lambda: self._finalize_complete(job))

    def _finalize_complete(self, job: Job) -> None:
        now = time.time()
        with self.write_lock:
            c = self.conn()
            started = c.execute("SELECT started_at FROM bulk_jobs WHERE id=?", (job.id,)).fetchone()
            total = int((now - (started[0] if started and started[0] else now)) * 1000 * self.org.profile.time_scale)
            c.execute("UPDATE bulk_jobs SET state='JobComplete', system_modstamp=?, finished_at=?, total_ms=?, "
                      "finalized=1 WHERE id=? AND state='InProgress'", (sf_time(now), now, total, job.id))
            c.commit()
        with self.jobs_lock:
            self.jobs.pop(job.id, None)

    def _finalize_stopped(self, job: Job) -> None:
        """Failed/Aborted: whatever was not processed becomes ``unprocessedrecords``."""
        with job.lock:
            if job.finalizing:
                return
            job.finalizing = True
        for b in job.batches.values():
            if b.state != "Queued":
                continue
            if b.next_record == 0:
                b.state = "NotProcessed"
            else:
                rows = self._read_rows(job, b)[b.next_record:]
                b.unp_off = self._append_rows(job.dir / f"b{b.seq:05d}.unp", 0, rows, job)
                b.state = "Stopped"
        now = time.time()
        with self.write_lock:
            c = self.conn()
            for b in job.batches.values():
                c.execute("UPDATE bulk_batches SET state=?, unp_off=? WHERE job_id=? AND seq=?",
                          (b.state, b.unp_off, job.id, b.seq))
            row = c.execute("SELECT started_at FROM bulk_jobs WHERE id=?", (job.id,)).fetchone()
            started = row[0] if row and row[0] else now
            total = int((now - started) * 1000 * self.org.profile.time_scale)
            if job.stop_reason == "Failed":
                c.execute("UPDATE bulk_jobs SET state='Failed', error_message=?, system_modstamp=?, finished_at=?, "
                          "total_ms=?, finalized=1 WHERE id=? AND state NOT IN ('Aborted')",
                          (job.error_message, sf_time(now), now, total, job.id))
            else:
                c.execute("UPDATE bulk_jobs SET finished_at=?, total_ms=?, finalized=1 WHERE id=?",
                          (now, total, job.id))
            c.commit()
        with self.jobs_lock:
            self.jobs.pop(job.id, None)

    # -- the parent batch: header, splitting ----------------------------------------------------------------------
    def _prepare(self, job: Job, gen: int) -> None:
        if not self._enter(job, gen):
            with job.lock:
                idle = job.running == 0 and job.stop_reason in ("Aborted", "Failed")
            if idle:
                self._finalize_stopped(job)
            return
        try:
            now = time.time()
            job.started = now
            self.write("UPDATE bulk_jobs SET state='InProgress', started_at=?, system_modstamp=? WHERE id=? "
                       "AND state='UploadComplete'", (now, sf_time(now), job.id))
            error = self._compile(job)
            if error:
                job.plan = None
                with job.lock:
                    job.stop_reason = "Failed"
                    job.error_message = error
                return
            per_batch = max(1, int(self.org.profile.internal_batch_records))
            spans = split_records(job.data_path, job.header_end, per_batch)
            batches = {i: Batch(i, s, e) for i, (s, e) in enumerate(spans)}
            with self.write_lock:
                c = self.conn()
                c.execute("DELETE FROM bulk_batches WHERE job_id=?", (job.id,))
                c.executemany("INSERT INTO bulk_batches(job_id, seq, start_off, end_off, state) "
                              "VALUES(?,?,?,?, 'Queued')", [(job.id, b.seq, b.start, b.end) for b in batches.values()])
                c.execute("UPDATE bulk_jobs SET total_batches=? WHERE id=?", (len(batches), job.id))
                c.commit()
            job.batches = batches
            job.completed = 0
            for b in batches.values():
                self.submit(self._batch_task(job, b, gen), f"batch {job.id}/{b.seq}")
        except Exception as exc:
            log.exception("preparing %s failed", job.id)
            with job.lock:
                job.stop_reason = job.stop_reason or "Failed"
                job.error_message = job.error_message or f"Unknown : {exc}"
        finally:
            self._leave(job)

    def _compile(self, job: Job) -> str | None:
        """Compile the header; the job's ``errorMessage`` when the job cannot run."""
        path = job.data_path
        if not path.exists():
            return "InvalidBatch : No content for job"
        with open(path, "rb") as f:
            first = f.readline(64 * 1024)
        if not first.strip(b"\r\n"):
            return "InvalidBatch : No content for job"
        if job.line_ending == "\n" and first.endswith(b"\r\n"):
            return "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is LF"
        if job.line_ending == "\r\n" and not first.endswith(b"\r\n") and first.endswith(b"\n"):
            return "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is CRLF"
        text = first.decode("utf-8", "replace").rstrip("\r\n")
        header = next(csv.reader([text], delimiter=job.delimiter), [])
        try:
            job.plan = compile_plan(job.obj, job.operation, header, job.ext_field)
        except HeaderError as exc:
            return str(exc)
        return None

    # -- internal batches -------------------------------------------------------------------------------------------
    def _batch_task(self, job: Job, b: Batch, gen: int) -> Callable[[], None]:
        def run() -> None:
            if not self._enter(job, gen):
                with job.lock:
                    idle = job.running == 0 and job.stop_reason in ("Aborted", "Failed")
                if idle:
                    self._finalize_stopped(job)
                return
            completed = False
            try:
                completed = self._run_batch(job, b, gen)
            except Exception as exc:
                log.exception("batch %s/%s failed", job.id, b.seq)
                with job.lock:
                    if job.stop_reason is None:
                        job.stop_reason = "Failed"
                        job.error_message = f"Unknown : {exc}"
            finally:
                self._leave(job, completed)
        return run

    def _read_rows(self, job: Job, b: Batch) -> list[list[str]]:
        return read_rows(job.data_path, b.start, b.end, job.delimiter)

    def _run_batch(self, job: Job, b: Batch, gen: int) -> bool:
        """Process the rest of one internal batch; ``True`` when it is finished."""
        org = self.org
        plan = job.plan
        assert plan is not None
        rows = self._read_rows(job, b)
        start = b.next_record
        if b.retries == 0 and start == 0:
            org.stats.add("bulk_batches", 1)
        items = self._convert(job, plan, rows, start)
        parents = {it.parent for it in items if it.parent and it.error is None}
        self.registry.register(parents)
        attempt_started = time.monotonic()
        timeline = attempt_started  # wall-clock end of the modelled work so far (timed profiles)
        lock_failed = 0
        seed = f"{job.id}:{b.seq}:{b.retries}"
        try:
            pending: list[Item] = []
            pos = start
            n = len(rows)
            while pos < n:
                profile = org.profile
                timed = profile.per_record_ms > 0
                if job.stop_reason is not None or gen != self.generation or self.stopping:
                    break
                size = max(1, int(profile.chunk_records))
                chunk = items[pos - start: pos - start + size]
                limit = int(getattr(profile, "fail_job_after_records", 0) or 0)
                if limit > 0:
                    with job.lock:
                        allowed = max(0, min(len(chunk), limit - job.reserved))
                        job.reserved += allowed
                    if allowed < len(chunk):
                        chunk = chunk[:allowed]
                        if not chunk:
                            self.fail(job, f"Unknown : Internal server error: job processing stopped after {limit} "
                                      "records (emulator fault fail_job_after_records)")
                            break
                chunk_parents = sorted({it.parent for it in chunk if it.parent and it.error is None})
                owner = object()
                held: list[str] = []
                contended: list[str] = []
                rate = profile.lock_contention_rate
                if rate > 0 and chunk_parents:
                    shared = self.registry.shared(set(chunk_parents))
                    if shared:
                        exposed = sum(1 for it in chunk if it.parent in shared)
                        rnd = random.Random(f"{seed}:{pos}").random()
                        if rnd < rate * exposed / len(chunk):
                            contended = sorted(shared)
                            if timed:  # the modelled wait for the lock that never came
                                timeline += profile.scaled(profile.lock_wait_timeout_s)
                if not contended and timed and chunk_parents:
                    contended = self.locks.acquire(chunk_parents, owner, profile.scaled(profile.lock_wait_timeout_s))
                    timeline = max(timeline, time.monotonic())  # a real wait already took its time
                    if not contended:
                        held = chunk_parents
                try:
                    if contended:
                        err = lock_error(chunk_parents, len(chunk))
                        for it in chunk:
                            if it.error is None:
                                it.error = err
                                lock_failed += 1
                    elif timed:
                        timeline += profile.scaled(len(chunk) * profile.per_record_ms / 1000.0)
                    pending.extend(chunk)
                    pos += len(chunk)
                    active_ms = int(len(chunk) * profile.per_record_ms) if timed else 0
                    if timed:
                        self._commit(job, b, pending, pos, active_ms)
                        pending = []
                        # The chunk lasts its modelled time: CPU already spent on it counts towards that.
                        delay = timeline - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                finally:
                    if held:
                        self.locks.release(held, owner)
                if limit > 0 and job.reserved >= limit and pos < n:
                    self.fail(job, f"Unknown : Internal server error: job processing stopped after {limit} records "
                              "(emulator fault fail_job_after_records)")
                    break
                elapsed = (time.monotonic() - attempt_started) * profile.time_scale
                if pos < n and (lock_failed > LOCK_REQUEUE_THRESHOLD or elapsed > profile.batch_time_limit_s):
                    if pending:
                        self._commit(job, b, pending, pos, 0)
                        pending = []
                    self._requeue(job, b, gen, "lock" if lock_failed > LOCK_REQUEUE_THRESHOLD else "time")
                    return False
            if pending:
                self._commit(job, b, pending, pos, int((time.monotonic() - attempt_started) * 1000))
            if pos >= n:
                self._mark_completed(job, b)
                return True
            return False
        finally:
            self.registry.unregister(parents)

    def _requeue(self, job: Job, b: Batch, gen: int, why: str) -> None:
        b.retries += 1
        self.org.stats.add("bulk_batch_retries", 1)
        self.write("UPDATE bulk_batches SET retries=? WHERE job_id=? AND seq=?", (b.retries, job.id, b.seq))
        self.write("UPDATE bulk_jobs SET retries=retries+1, system_modstamp=? WHERE id=?", (sf_time(), job.id))
        if b.retries > self.org.profile.max_batch_retries:
            if why == "lock":
                msg = (f"TooManyLockFailure : Too many lock failures; batch {b.seq + 1} failed after "
                       f"{b.retries - 1} retries. Batch will not be retried.")
            else:
                msg = (f"InvalidBatch : Batch {b.seq + 1} could not be processed within the time limit after "
                       f"{b.retries - 1} retries. Batch will not be retried.")
            self.fail(job, msg)
            return
        self.submit(self._batch_task(job, b, gen), f"batch {job.id}/{b.seq} retry {b.retries}")

    def _mark_completed(self, job: Job, b: Batch) -> None:
        b.state = "Completed"
        self.write("UPDATE bulk_batches SET state='Completed' WHERE job_id=? AND seq=?", (job.id, b.seq))

    # -- row conversion and parent resolution ---------------------------------------------------------------------
    def _convert(self, job: Job, plan: Plan, rows: list[list[str]], start: int) -> list[Item]:
        todo = rows[start:] if start else rows
        values, errors = plan.convert_rows(todo)
        items = [Item(start + i, row, vals) for i, (row, vals) in enumerate(zip(todo, values, strict=True))]
        for i, exc in errors.items():
            items[i].error = exc
        key_col = plan.key_column
        op = job.operation
        if op == "upsert" or op in ("update", "delete", "hardDelete"):
            key_name = plan.key_field.name if plan.key_field is not None else (job.ext_field or "Id")
            if op == "upsert":
                # Duplicates count over the whole batch, also rows before a resume point.
                dups: set[str] = set()
                if key_col is not None:
                    keys = [r[key_col] for r in rows if key_col < len(r)]
                    folded = list(map(fold, keys))
                    if len(set(folded)) != len(folded):
                        counts = Counter(folded)
                        dups = {k for k, c in counts.items() if c > 1 and k and k != "#n/a"}
            else:
                dups = set()
            key_values = [it.vals[key_col] if (key_col is not None and it.error is None) else "" for it in items]
            # Only walk the rows when some key is missing or duplicated (rare).
            if dups or key_col is None or IGNORE in key_values or None in key_values:
                for it in items:
                    if it.error is not None:
                        continue
                    key = it.vals[key_col] if key_col is not None else IGNORE
                    if key is IGNORE or key is None:
                        msg = "Id not specified in an update call" if op == "update" else f"{key_name} not specified"
                        it.error = RowError("MISSING_ARGUMENT", msg)
                    elif dups and fold(key) in dups:
                        it.error = RowError("DUPLICATE_VALUE", f"Duplicate external id specified: {key}")
        if plan.relationships:
            self._resolve_relationships(plan, items)
        if plan.reference_columns:
            self._check_references(plan, items)
        parent_cols = [i for i, f in enumerate(plan.write_fields)
                       if f.type == "reference" and f.reference_to and f.reference_to[0] not in ("User",)]
        if len(parent_cols) == 1:
            c = parent_cols[0]
            for it in items:
                if it.error is None and isinstance(v := it.vals[c], str):
                    it.parent = v
        elif parent_cols:
            for it in items:
                if it.error is None:
                    for c in parent_cols:
                        v = it.vals[c]
                        if isinstance(v, str):
                            it.parent = v
                            break
        return items

    def _resolve_relationships(self, plan: Plan, items: list[Item]) -> None:
        conn = self.conn()
        for rel in plan.relationships:
            col = rel.column
            wanted = {it.vals[col] for it in items if it.error is None and isinstance(it.vals[col], str)}
            if not wanted:
                continue
            found: dict[str, list[str]] = {}
            sql = match_sql(rel.target.name, rel.lookup_field.name, rel.lookup_field.type in TEXT_TYPES)
            for value, rid in conn.execute(sql, (json.dumps(list(wanted)),)):
                found.setdefault(value, []).append(rid)
            for it in items:
                if it.error is not None:
                    continue
                v = it.vals[col]
                if not isinstance(v, str):
                    continue
                ids = found.get(v)
                if not ids:
                    it.error = RowError("INVALID_FIELD", f"Foreign key external ID: {v} not found for field "
                                        f"{rel.lookup_field.name} in entity {rel.target.name}")
                elif len(ids) > 1:
                    it.error = RowError("DUPLICATE_EXTERNAL_ID", f"{rel.lookup_field.label}: more than one record "
                                        f"found for external id field: [{', '.join(ids)}]", (rel.header,))
                else:
                    it.vals[col] = ids[0]

    def _check_references(self, plan: Plan, items: list[Item]) -> None:
        conn = self.conn()
        for col, f in plan.reference_columns:
            target = f.reference_to[0]
            wanted = {it.vals[col] for it in items if it.error is None and isinstance(it.vals[col], str)}
            if not wanted:
                continue
            found = {r[0] for r in conn.execute(f'SELECT t."Id" FROM json_each(?) j JOIN "{target}" t '
                                                 f'ON t."Id" = j.value', (json.dumps(list(wanted)),))}
            for it in items:
                if it.error is None and isinstance(it.vals[col], str) and it.vals[col] not in found:
                    it.error = RowError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")

    # -- writing ------------------------------------------------------------------------------------------------
    def _commit(self, job: Job, b: Batch, items: list[Item], next_record: int, active_ms: int) -> None:
        """Apply a group of rows, append their results and move the checkpoint, atomically."""
        plan = job.plan
        assert plan is not None
        writer = Writer(self, job, plan)
        with self.write_lock:
            alloc = self.allocator(job.obj)
            if job.operation in ("insert", "upsert"):
                alloc.ensure(len(items))
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                writer.apply(conn, items, alloc)
                bad = [it for it in items if it.error is not None]
                # One fixed-width outcome per row; successfulResults are built from these and the upload on demand.
                outcomes = "".join([f"{BLANK_ID if it.error is not None else it.sf_id:18.18}"
                                    f"{'f' if it.error is not None else ('c' if it.created else 'u')}\n"
                                    for it in items])
                b.ok_off = self._append_bytes(job.dir / f"b{b.seq:05d}.ids", b.ok_off, outcomes.encode("ascii"))
                b.err_off = self._append_results(job.dir / f"b{b.seq:05d}.err", b.err_off,
                                                 [(it.sf_id, it.error.text(), *it.row) for it in bad], job)
                b.next_record = next_record
                conn.execute("UPDATE bulk_batches SET next_record=?, ok_off=?, err_off=? WHERE job_id=? AND seq=?",
                             (next_record, b.ok_off, b.err_off, job.id, b.seq))
                conn.execute("UPDATE bulk_jobs SET records_processed=records_processed+?, "
                             "records_failed=records_failed+?, api_active_ms=api_active_ms+?, system_modstamp=? "
                             "WHERE id=?", (len(items), len(bad), active_ms, sf_time(), job.id))
                conn.execute("INSERT INTO api_usage(day, requests, bulk_batches, bulk_records) VALUES(?, 0, 0, ?) "
                             "ON CONFLICT(day) DO UPDATE SET bulk_records=bulk_records+excluded.bulk_records",
                             (time.strftime("%Y-%m-%d", time.gmtime()), len(items)))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        stats = self.org.stats
        stats.add("bulk_records", len(items))
        if bad:
            stats.add("bulk_records_failed", len(bad))
            for code, n in Counter(it.error.code for it in bad).items():
                stats.failure(code, n)

    def _append_results(self, path: Path, offset: int, rows: list[tuple[str, ...]], job: Job) -> int:
        if not rows:
            return offset
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=job.delimiter, lineterminator=job.line_ending, quoting=csv.QUOTE_ALL)
        w.writerows(rows)
        return self._append_bytes(path, offset, buf.getvalue().encode("utf-8"))

    def _append_rows(self, path: Path, offset: int, rows: list[list[str]], job: Job) -> int:
        if not rows:
            return offset
        buf = io.StringIO()
        csv.writer(buf, delimiter=job.delimiter, lineterminator=job.line_ending,
                   quoting=csv.QUOTE_MINIMAL).writerows(rows)
        return self._append_bytes(path, offset, buf.getvalue().encode("utf-8"))

    @staticmethod
    def _append_bytes(path: Path, offset: int, data: bytes) -> int:
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(offset)
            f.write(data)
            f.truncate()
        return offset + len(data)

    # -- recovery and reset -------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Resume what was running when the emulator stopped."""
        conn = self.conn()
        rows = conn.execute("SELECT * FROM bulk_jobs WHERE kind='ingest' AND (state IN ('UploadComplete', "
                            "'InProgress') OR (state IN ('Aborted', 'Failed') AND finalized=0)) "
                            "ORDER BY seq").fetchall()
        gen = self.generation
        for row in rows:
            job = self.runtime(row)
            if row["state"] == "UploadComplete" or row["total_batches"] is None:
                self.write("UPDATE bulk_jobs SET state='UploadComplete' WHERE id=? AND state='InProgress'", (job.id,))
                if row["state"] in ("Aborted", "Failed"):
                    job.stop_reason = row["state"]
                    job.error_message = row["error_message"]
                    self._finalize_stopped(job)
                else:
                    self.submit(lambda j=job: self._prepare(j, gen), f"prepare {job.id}")
                continue
            if self._compile(job) is not None:
                continue
            for br in conn.execute("SELECT * FROM bulk_batches WHERE job_id=? ORDER BY seq", (job.id,)):
                b = Batch(br["seq"], br["start_off"], br["end_off"], br["state"], br["next_record"], br["retries"],
                          br["ok_off"], br["err_off"], br["unp_off"])
                job.batches[b.seq] = b
                for suffix, off in (("ids", b.ok_off), ("err", b.err_off)):
                    p = job.dir / f"b{b.seq:05d}.{suffix}"
                    if p.exists() and p.stat().st_size > off:
                        with open(p, "r+b") as f:
                            f.truncate(off)
            job.started = row["started_at"] or time.time()
            if row["state"] in ("Aborted", "Failed"):
                job.stop_reason = row["state"]
                job.error_message = row["error_message"]
                self._finalize_stopped(job)
                continue
            job.completed = sum(1 for b in job.batches.values() if b.state == "Completed")
            queued = [b for b in job.batches.values() if b.state == "Queued"]
            if not queued:
                job.finalizing = True
                self.later(0, lambda j=job: self._finalize_complete(j))
            for b in queued:
                self.submit(self._batch_task(job, b, gen), f"batch {job.id}/{b.seq} (resumed)")

    def reset(self) -> None:
        """Abort and delete every bulk job (ingest and query) and its files."""
        with self.jobs_lock:
            self.generation += 1
            jobs = list(self.jobs.values())
            self.jobs.clear()
        for job in jobs:
            with job.lock:
                job.stop_reason = "Deleted"
        with self.cond:
            self.queue.clear()
        deadline = time.monotonic() + 30
        while any(j.running for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.write_lock:
            c = self.conn()
            c.execute("DELETE FROM bulk_batches")
            c.execute("DELETE FROM bulk_jobs")
            c.commit()
        for p in self.org.jobs_dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # -- results ------------------------------------------------------------------------------------------------------
    def result_stream(self, row: sqlite3.Row, which: str) -> Iterator[bytes | tuple[Path, int, int]]:
        """One result CSV as bytes and file ranges, in batch order (see :func:`iter_segments`)."""
        head, segments = self.result_segments(row, which)
        if head:
            yield head
        if which != "successfulResults":
            yield from segments
            return
        data = self.org.jobs_dir / row["id"] / "data.csv"
        d = DELIMITERS[row["column_delimiter"]]
        le = LINE_ENDINGS[row["line_ending"]]
        for outcomes, start_end, length in segments:
            start, end = start_end
            yield success_rows(data, outcomes, start, end, length, d, le)

    def result_segments(self, row: sqlite3.Row, which: str) -> tuple[bytes, list[Any]]:
        """The header line and the file ranges that make up one result CSV, in batch order."""
        d = DELIMITERS[row["column_delimiter"]]
        le = LINE_ENDINGS[row["line_ending"]]
        header = row["header_text"] or ""
        job_dir = self.org.jobs_dir / row["id"]
        segments: list[tuple[Path, int, int]] = []
        batches = self.conn().execute("SELECT * FROM bulk_batches WHERE job_id=? ORDER BY seq", (row["id"],)).fetchall()
        if which == "successfulResults":
            head = f'"sf__Id"{d}"sf__Created"{d}{header}{le}'
            segments = [(job_dir / f"b{b['seq']:05d}.ids", (b["start_off"], b["end_off"]), b["ok_off"])
                        for b in batches if b["ok_off"]]
        elif which == "failedResults":
            head = f'"sf__Id"{d}"sf__Error"{d}{header}{le}'
            segments = [(job_dir / f"b{b['seq']:05d}.err", 0, b["err_off"]) for b in batches if b["err_off"]]
        else:
            head = f"{header}{le}" if header else ""
            data = job_dir / "data.csv"
            if row["state"] in ("Failed", "Aborted") and row["finalized"]:
                if not batches and data.exists() and row["header_end"] is not None:
                    segments = [(data, row["header_end"], data.stat().st_size)]
                for b in batches:
                    if b["state"] == "NotProcessed":
                        segments.append((data, b["start_off"], b["end_off"]))
                    elif b["state"] == "Stopped" and b["unp_off"]:
                        segments.append((job_dir / f"b{b['seq']:05d}.unp", 0, b["unp_off"]))
        return head.encode("utf-8"), segments


def read_rows(path: Path, start: int, end: int, delimiter: str) -> list[list[str]]:
    """The CSV records in a byte range of an upload (blank lines are not records)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    text = data.decode("utf-8", "replace")
    return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]


def success_rows(data: Path, outcomes: Path, start: int, end: int, length: int, delimiter: str,
                 line_ending: str) -> bytes:
    """One batch's part of successfulResults: its processed rows that did not fail, with their ids."""
    with open(outcomes, "rb") as f:
        marks = f.read(length).decode("ascii")
    rows = read_rows(data, start, end, delimiter)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=line_ending, quoting=csv.QUOTE_ALL)
    w.writerows((marks[k:k + 18], "true" if flag == "c" else "false", *row)
                for k, flag, row in zip(range(0, length, OUTCOME_WIDTH), marks[18::OUTCOME_WIDTH], rows, strict=False)
                if flag != "f")
    return buf.getvalue().encode("utf-8")


def split_records(path: Path, offset: int, per_batch: int) -> list[tuple[int, int]]:
    """Byte ranges of ``per_batch`` CSV records each, from ``offset`` to the end of the file.

    A record ends at a newline outside double quotes (RFC 4180: quote characters only come in pairs inside
    quoted fields), so counting quotes per physical line is enough; blank lines are not records.
    """
    spans: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        pos = start = offset
        count = 0
        inq = False
        for line in f:
            pos += len(line)
            q = line.count(b'"')
            if inq:
                if q & 1:
                    inq = False
                else:
                    continue
            elif q & 1:
                inq = True
                continue
            elif line == b"\n" or line == b"\r\n":
                continue
            count += 1
            if count >= per_batch:
                spans.append((start, pos))
                start = pos
                count = 0
        if pos > start and (count or inq):
            spans.append((start, pos))
    return spans


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_segments(parts: Iterator[bytes | tuple[Path, int, int]],
                  throttle: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Stream a result from bytes and file ranges without holding it in memory."""
    for part in parts:
        if isinstance(part, bytes):
            if part:
                if throttle:
                    throttle(len(part))
                yield part
            continue
        path, start, end = part
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        with f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(READ_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                if throttle:
                    throttle(len(chunk))
                yield chunk


# -- per-object writes --------------------------------------------------------------------------------------------
_INVALID_FIELD_FOR_INSERT_UPDATE = ("Unable to create/update fields: {names}. Please check the security settings of "
                                    "this field and verify that it is read/write for your profile or permission set.")


class Writer:
    """Turns converted rows into INSERT/UPDATE/DELETE statements for one job's object and header."""

    def __init__(self, engine: Engine, job: Job, plan: Plan) -> None:
        self.engine = engine
        self.job = job
        self.plan = plan
        self.obj = plan.obj
        self.user = engine.org.credentials.user_id
        self.has = {f.name for f in self.obj.fields}
        # The last column wins when two columns write the same field (AccountId and Account.ExternalId__c).
        last: dict[str, int] = {}
        for i, f in enumerate(plan.write_fields):
            if f.name != "Id":
                last[f.name] = i
        self.value_cols = sorted(last.values())
        self.value_names = [plan.write_fields[i].name for i in self.value_cols]
        self.get_values = itemgetter(*self.value_cols) if self.value_cols else (lambda vals: ())
        self.stage_col = next((i for i, f in enumerate(plan.write_fields) if f.name == "StageName"), None)
        # An update never rewrites the key it matched on (saves two index writes per row).
        key = plan.key_column
        self.update_cols = [c for c in self.value_cols if c != key]

    def _field_errors(self, it: Item, cols: list[int]) -> RowError | None:
        bad = [self.plan.header[c] for c in cols if it.vals[c] is not IGNORE]
        if not bad:
            return None
        return RowError("INVALID_FIELD_FOR_INSERT_UPDATE", _INVALID_FIELD_FOR_INSERT_UPDATE.format(names=", ".join(bad)),
                        bad)

    def apply(self, conn: sqlite3.Connection, items: list[Item], alloc: IdAllocator) -> None:
        op = self.job.operation
        live = [it for it in items if it.error is None]
        if not live:
            return
        key_col = self.plan.key_column
        obj = self.obj.name
        if op in ("update", "delete", "hardDelete"):
            ids = list({it.vals[key_col] for it in live})
            found = dict(conn.execute(f'SELECT t."Id", t.rowid FROM json_each(?) j JOIN "{obj}" t ON t."Id" = '
                                      'j.value', (json.dumps(ids),)).fetchall())
            targets = []
            for it in live:
                rid = it.vals[key_col]
                rowid = found.get(rid)
                if rowid is None:
                    it.error = RowError("ENTITY_IS_DELETED", "entity is deleted") if op != "update" else \
                        RowError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
                else:
                    it.sf_id = rid
                    it.rowid = rowid
                    targets.append(it)
            if op == "update":
                self._update(conn, targets)
            else:
                conn.executemany(f'DELETE FROM "{obj}" WHERE rowid=?', [(it.rowid,) for it in targets])
            return
        key_field = self.plan.key_field
        if op == "insert":
            rel_cols = {r.column for r in self.plan.relationships}
            key_col, key_field = next(((i, f) for i, f in enumerate(self.plan.write_fields)
                                       if f.unique and f.name != "Id" and i not in rel_cols), (None, None))
        existing: dict[str, list[tuple[str, int]]] = {}
        if key_col is not None and key_field is not None:
            keys = [k for it in live if isinstance(k := it.vals[key_col], str)]
            collate = " COLLATE NOCASE" if key_field.type in TEXT_TYPES else ""
            sql = (f'SELECT j.value, t."Id", t.rowid FROM json_each(?) j JOIN "{obj}" t '
                   f'ON t."{key_field.name}" = j.value{collate}')
            matches = conn.execute(sql, (json.dumps(keys),)).fetchall()
            existing = {k: [(rid, rowid)] for k, rid, rowid in matches}
            if len(existing) != len(matches):  # a key matched several records (case variants)
                existing = {}
                for k, rid, rowid in matches:
                    existing.setdefault(k, []).append((rid, rowid))
        inserts: list[Item] = []
        updates: list[Item] = []
        for it in live:
            key = it.vals[key_col] if key_col is not None else None
            found = existing.get(key) if existing and isinstance(key, str) else None
            if op == "insert":
                if found:
                    it.error = RowError("DUPLICATE_VALUE", f"duplicate value found: {key_field.name} duplicates value "
                                        f"on record with id: {found[0][0]}", (key_field.name,))
                else:
                    inserts.append(it)
            elif not found:
                inserts.append(it)
            elif len(found) > 1:
                it.error = RowError("DUPLICATE_EXTERNAL_ID", f"{key_field.label}: more than one record found for "
                                    f"external id field: [{', '.join(f[0] for f in found)}]", (key_field.name,))
            else:
                it.sf_id, it.rowid = found[0]
                updates.append(it)
        if inserts:
            self._insert(conn, inserts, alloc)
        if updates:
            self._update(conn, updates)

    def _insert(self, conn: sqlite3.Connection, items: list[Item], alloc: IdAllocator) -> None:
        plan = self.plan
        req_cols = {f.name: None for f in plan.required_on_create}
        for i, f in enumerate(plan.write_fields):
            if f.name in req_cols:
                req_cols[f.name] = i
        bad_cols = plan.not_createable
        absent = [name for name, c in req_cols.items() if c is None]
        present = [(name, c) for name, c in req_cols.items() if c is not None]
        ok: list[Item] = []
        for it in items:
            vals = it.vals
            if bad_cols:
                err = self._field_errors(it, bad_cols)
                if err is not None:
                    it.error = err
                    continue
            if present:
                missing = [name for name, c in present if vals[c] is IGNORE or vals[c] is None]
                if missing or absent:
                    it.error = required_missing([f.name for f in plan.required_on_create
                                                 if f.name in missing or f.name in absent])
                    continue
            elif absent:
                it.error = required_missing(absent)
                continue
            ok.append(it)
        if not ok:
            return
        sql = self._insert_sql()
        get_values = self.get_values
        ids = alloc.take(len(ok))
        if len(self.value_cols) == 1:
            params = [(rid, get_values(it.vals)) for it, rid in zip(ok, ids, strict=True)]
        else:
            params = [(rid, *get_values(it.vals)) for it, rid in zip(ok, ids, strict=True)]
        for it, rid in zip(ok, ids, strict=True):
            it.sf_id = rid
            it.created = True
        try:
            conn.execute("SAVEPOINT bulk_insert")
            conn.executemany(sql, params)
            conn.execute("RELEASE bulk_insert")
        except sqlite3.IntegrityError:
            # A unique field clashed: find the offending rows one by one, as Salesforce reports them per row.
            conn.execute("ROLLBACK TO bulk_insert")
            conn.execute("RELEASE bulk_insert")
            for it, p in zip(ok, params, strict=True):
                try:
                    conn.execute(sql, p)
                except sqlite3.IntegrityError as exc:
                    it.error = RowError("DUPLICATE_VALUE", f"duplicate value found: {exc}")
                    it.sf_id = ""
                    it.created = False

    def _insert_sql(self) -> str:
        """``INSERT`` with ``?1`` = Id, ``?2…`` = the header's values; defaults and derived fields computed in SQL."""
        names = self.value_names
        now = now_ms_string()
        user = self.user
        cols = ["Id"]
        exprs = ["?1"]
        param = {name: f"?{k + 2}" for k, name in enumerate(names)}
        for name, value in (("IsDeleted", "0"), ("CreatedDate", f"'{now}'"), ("CreatedById", f"'{user}'"),
                            ("LastModifiedDate", f"'{now}'"), ("LastModifiedById", f"'{user}'"),
                            ("SystemModstamp", f"'{now}'")):
            if name in self.has:
                cols.append(name)
                exprs.append(value)
        for name in names:
            cols.append(name)
            exprs.append(param[name])
        if "OwnerId" in self.has:
            if "OwnerId" in param:
                exprs[cols.index("OwnerId")] = f"COALESCE({param['OwnerId']}, '{user}')"
            else:
                cols.append("OwnerId")
                exprs.append(f"'{user}'")
        if self.obj.name == "Opportunity":
            stage = param.get("StageName", "NULL")
            closed, won, probability = stage_sql(stage)
            cols += ["IsClosed", "IsWon"]
            exprs += [closed, won]
            if "Probability" in param:
                exprs[cols.index("Probability")] = f"COALESCE({param['Probability']}, {probability})"
            else:
                cols.append("Probability")
                exprs.append(probability)
        if self.obj.name == "User" and "IsActive" not in param:
            cols.append("IsActive")
            exprs.append("1")
        quoted = ", ".join(f'"{c}"' for c in cols)
        return f'INSERT INTO "{self.obj.name}" ({quoted}) VALUES ({", ".join(exprs)})'

    def _update(self, conn: sqlite3.Connection, items: list[Item]) -> None:
        plan = self.plan
        bad_cols = plan.not_updateable
        non_null = plan.non_nillable_columns
        cols = self.update_cols
        # Columns with an empty (ignored) value somewhere in this group; the others are set on every row.
        sparse = [c for c in cols if IGNORE in [it.vals[c] for it in items]]
        # Only columns that hold a #N/A somewhere can null a required field.
        non_null = [c for c in non_null if None in [it.vals[c] for it in items]]
        shapes: dict[tuple[bool, ...], tuple[tuple[int, ...], Callable[[list[Any]], Any]]] = {}
        groups: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
        for it in items:
            vals = it.vals
            if bad_cols:
                err = self._field_errors(it, bad_cols)
                if err is not None:
                    it.error = err
                    continue
            if non_null:
                nulled = [plan.write_fields[c].name for c in non_null if vals[c] is None]
                if nulled:
                    it.error = required_missing(nulled)
                    continue
            shape_key = tuple(vals[c] is IGNORE for c in sparse) if sparse else ()
            shape = shapes.get(shape_key)
            if shape is None:
                skip = {c for c, ign in zip(sparse, shape_key, strict=True) if ign}
                pattern = tuple(c for c in cols if c not in skip)
                getter = itemgetter(*pattern) if len(pattern) > 1 else (
                    (lambda v, _c=pattern[0]: (v[_c],)) if pattern else (lambda v: ()))
                shape = shapes[shape_key] = (pattern, getter)
                groups[pattern] = []
            pattern, getter = shape
            groups[pattern].append((*getter(vals), it.rowid))
        now = now_ms_string()
        user = self.user
        for pattern, params in groups.items():
            names = [plan.write_fields[c].name for c in pattern]
            sets = [f'"{name}"=?{k + 1}' for k, name in enumerate(names)]
            if self.obj.name == "Opportunity" and "StageName" in names:
                closed, won, _ = stage_sql(f"?{names.index('StageName') + 1}")
                sets += [f'"IsClosed"={closed}', f'"IsWon"={won}']
            sets += [f"\"LastModifiedDate\"='{now}'", f"\"LastModifiedById\"='{user}'", f"\"SystemModstamp\"='{now}'"]
            conn.executemany(f'UPDATE "{self.obj.name}" SET {", ".join(sets)} WHERE rowid=?{len(names) + 1}', params)


def stage_sql(stage: str) -> tuple[str, str, str]:
    """SQL for IsClosed, IsWon and the default Probability of the StageName in parameter ``stage``."""
    closed = [name for name, (_p, c, _w) in STAGE_FLAGS.items() if c]
    won = [name for name, (_p, _c, w) in STAGE_FLAGS.items() if w]
    quote = lambda names: ", ".join("'" + n.replace("'", "''") + "'" for n in names)  # noqa: E731
    prob = " ".join(f"WHEN '{name}' THEN {float(p)}" for name, (p, _c, _w) in STAGE_FLAGS.items())
    return (f"({stage} IS NOT NULL AND {stage} IN ({quote(closed)}))",
            f"({stage} IS NOT NULL AND {stage} IN ({quote(won)}))",
            f"(CASE {stage} {prob} END)")

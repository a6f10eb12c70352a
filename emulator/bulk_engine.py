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

The fast path
-------------
Where chunks change nothing but commit points (untimed profile, neither lock-contention nor fail-after fault,
insert/upsert/update), a batch skips the per-row :class:`Item` machinery: :class:`Columns` holds it column by
column, every check runs over whole columns (``Plan.convert_columns``, parent and key lookups with one query
each) and only failing rows are visited one by one; records are written with multi-row ``INSERT … SELECT … FROM
(VALUES …)`` and ``UPDATE … FROM (VALUES …)`` statements through one shared writer connection, and the batch's
results, checkpoint and completion commit in one transaction. Batches queued back to back (of any jobs) share
that transaction, up to ``GROUP_MAX_RECORDS`` records and only while no other thread waits to write: each one is
processed exactly as on its own, in queue order, but a load whose keys land all over the key indexes writes far
fewer index pages per record (see :meth:`Engine._run_group`). Outcomes, error texts, result files, record values
and ids are those of the chunked path (``tests/emulator/test_bulk_fast_path.py`` runs both). One batch runs at a
time there: the work is CPU under the GIL and a second thread costs more than it overlaps.

Lock model
----------
Opportunity rows lock their parent Account (``AccountId`` or ``Account.<indexed field>``) for the duration of
their chunk's transaction. Two mechanisms produce ``UNABLE_TO_LOCK_ROW``:

1. *Real waits* (timed profiles). A chunk acquires all its parents atomically from an org-wide lock table. If
   another running chunk holds one, it waits up to ``lock_wait_timeout_s`` (scaled); on timeout the whole chunk
   fails with ``UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record or N records: <ids>:--``.
   Waiters are served in arrival order (:class:`ParentLocks`), so two batches on one Account take turns per
   chunk. Chunks last 0.72 s in the realistic profile, so failures need real convoys on one Account (about 14
   chunks queued ahead).
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
import gc
import hashlib
import io
import itertools
import json
import logging
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import eq, itemgetter, not_, or_
from pathlib import Path
from typing import Any

from .bulk_validation import (
    DELIMITERS,
    IGNORE,
    LINE_ENDINGS,
    STAGE_FLAGS,
    Converted,
    HeaderError,
    IgnoreType,
    Plan,
    RowError,
    compile_plan,
    lock_error,
    required_missing,
)
from .ids import case_safe, make_id
from .schema import Field, SObject, get_object
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
UNTIMED_PARALLELISM = 2  # with the lock-contention knob on: batches must run side by side to contend
FAST_PARALLELISM = 1  # otherwise: two batches at once cost ~15 % more CPU (GIL hand-offs) for no wall-clock gain
READ_CHUNK = 1 << 20
# Page cache of the shared writer connection. It holds the key indexes a load ordered by Account inserts into all
# over (about 60 MB per million Opportunities) and the pages one transaction dirties; 256 MB ran no faster at
# 2,000,000 rows and stayed resident for good.
WRITER_CACHE_KIB = 128 * 1024
WRITER_CHECKPOINT_PAGES = 50_000  # WAL pages (about 200 MB) after which a commit of the writer checkpoints
WRITER_WAL_KEEP_BYTES = 64 << 20
FAST_MIN_TIME_LIMIT_S = 60.0  # the fast path runs a batch in one go: only where its time limit is far away
ROWS_PER_STATEMENT = 500  # multi-row INSERT/UPDATE statements on the fast path
GROUP_MAX_RECORDS = 50_000  # fast-path batches queued back to back share one transaction up to this many records
GC_THRESHOLDS = (20_000, 20, 50)  # see tune_gc


_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
TEXT_TYPES = frozenset({"string", "textarea", "picklist", "email", "phone", "url", "combobox"})


def fold(value: str) -> str:
    """Case folding as SQLite's NOCASE does it (ASCII only)."""
    return value.translate(_ASCII_FOLD)


def fold_all(values: list[str]) -> list[str]:
    """``[fold(v) for v in values]`` in a few C calls."""
    joined = "\x00".join(values)
    folded = (joined.lower() if joined.isascii() else joined.translate(_ASCII_FOLD)).split("\x00")
    return folded if len(folded) == len(values) else list(map(fold, values))


def text_values(col: list[Any]) -> set[str]:
    """The distinct strings of a converted column (without ``IGNORE`` and ``None``)."""
    values = set(col)
    values.discard(IGNORE)
    values.discard(None)
    return values


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


def tune_gc() -> None:
    """Collect young objects less often in the emulator process.

    A 10,000-record batch allocates tens of thousands of lists and tuples that live until the batch is written; with
    the default thresholds (700, 10, 10) the collector walks them, and every object of the web app, over and over:
    about a tenth of the CPU of a bulk load. Larger thresholds only let cyclic garbage (rare here: reference
    counting frees the rest) live a little longer."""
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_THRESHOLDS[0]), max(gen1, GC_THRESHOLDS[1]), max(gen2, GC_THRESHOLDS[2]))


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

    def ensure(self, n: int, conn: sqlite3.Connection | None = None) -> None:
        """Reserve at least ``n`` ids through ``conn``, the engine's writer (under ``write_lock``, so that its page
        cache stays valid): inside its write transaction the numbers commit or roll back with it (a caller that
        rolls back restores ``next``/``end``), outside one :meth:`Org.next_number` commits them at once."""
        if self.end - self.next < n:
            size = max(n, ID_BLOCK)
            self.next = self.org.next_number(self.name, size, conn)
            self.end = self.next + size

    def take(self, n: int) -> list[str]:
        ids = id_block(self.prefix, self.next, n)
        self.next += n
        return ids


# -- locks ------------------------------------------------------------------------------------------------------
class ParentLocks:
    """Org-wide parent-record locks; a chunk takes all of its parents at once or none (no deadlocks).

    Waiters are served in arrival order, as a database queues row-lock waiters: a chunk may take its parents only
    when no chunk that asked earlier still waits for one of them. Without that, a batch whose next chunk asks again
    right after its last one let go (no I/O in between, so no other thread runs) could hold an Account for as long
    as it has rows of it, and a waiter that asked first would time out behind it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[str, object] = {}
        self._waiting: dict[int, frozenset[str]] = {}  # ticket -> the ids that waiter wants, oldest first
        self._tickets = itertools.count()

    def acquire(self, ids: list[str], owner: object, timeout: float) -> list[str]:
        """Contended ids if the wait timed out, else ``[]`` with every id held by ``owner``."""
        deadline = time.monotonic() + timeout
        wanted = frozenset(ids)
        with self._cond:
            ticket = next(self._tickets)
            self._waiting[ticket] = wanted
            got = False
            try:
                while True:
                    busy = [i for i in ids if self._held.get(i, owner) is not owner]
                    ahead = set().union(*(w & wanted for t, w in self._waiting.items() if t < ticket))
                    if not busy and not ahead:
                        for i in ids:
                            self._held[i] = owner
                        got = True
                        return []
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return busy or sorted(ahead)
                    self._cond.wait(remaining)
            finally:
                del self._waiting[ticket]
                if not got:  # leaving without them: waiters queued behind this one only may go now
                    self._cond.notify_all()

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


class Columns:
    """One internal batch on the fast path: converted values column by column, failures and outcomes by row.

    The chunked path keeps an :class:`Item` per row; here a 10,000-row batch is a handful of lists, the checks run
    over whole columns (C loops) and only failing rows are looked at one by one."""

    __slots__ = ("raw", "odd", "cols", "errors", "n", "parents", "ids", "created")

    def __init__(self, converted: Converted, n: int) -> None:
        # Values as read, by column (a list per record would keep 10,000 more objects alive for the collector).
        self.raw = converted.raw
        self.odd = converted.odd  # records without one value per column, as read
        self.cols = converted.cols
        self.errors = converted.errors  # row -> its failure (the first one wins)
        self.n = n
        self.parents: set[str] = set()
        self.ids: list[str] = [""] * self.n  # record id per row; failed rows keep one they got before failing
        self.created: list[bool] | bool = False  # per row, or one value for all rows

    def record(self, i: int) -> list[str]:
        """Row ``i`` as read."""
        odd = self.odd.get(i)
        return odd if odd is not None else [c[i] for c in self.raw]

    def outcomes(self) -> str:
        """The batch's ``.ids`` lines: 18-character id (blank when failed) and c/u/f, as :meth:`Engine._commit`."""
        ids, errors, created = self.ids, self.errors, self.created
        if not errors and isinstance(created, bool) and ids and min(map(len, ids)) == 18 == max(map(len, ids)):
            end = "c\n" if created else "u\n"
            return end.join(ids) + end
        if isinstance(created, bool):
            created = [created] * self.n
        return "".join([f"{BLANK_ID}f\n" if i in errors else f"{ids[i]:18.18}{'c' if created[i] else 'u'}\n"
                        for i in range(self.n)])


class WriteLock:
    """``threading.Lock`` for bulk writes that tells whether another thread is waiting for it: the worker keeps a
    transaction open across queued batches only while nobody else needs to write (see :meth:`Engine._run_group`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[None] = []  # one entry per waiting thread (list.append/pop are atomic)

    def __enter__(self) -> WriteLock:
        self._waiting.append(None)
        try:
            self._lock.acquire()
        finally:
            self._waiting.pop()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @property
    def contended(self) -> bool:
        return bool(self._waiting)


@dataclass
class FastOutcome:
    """What one batch of a fast-path transaction did; its counters are added once the transaction commits."""

    first_attempt: bool  # counts in the ``bulk_batches`` statistic
    finished: bool = False  # False: its job stopped before the batch was written
    records: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # failed records by error code


@dataclass(eq=False)
class BatchTask:
    """A queued internal batch (the worker groups consecutive ones on the fast path)."""

    engine: Engine
    job: Job
    batch: Batch
    gen: int

    def __call__(self) -> None:
        self.engine._run_tasks([self])


# -- the engine ---------------------------------------------------------------------------------------------------
class Engine:
    """Owns the worker threads and every ingest job of one org."""

    def __init__(self, org: Org) -> None:
        self.org = org
        self._local = threading.local()
        self.write_lock = WriteLock()  # one bulk writer at a time; taken after any job lock, never before
        self._writer: sqlite3.Connection | None = None
        self.sql_cache: dict[tuple, str] = {}  # multi-row statements of the fast path
        self._indexes: dict[str, tuple[tuple[bool, tuple[str, ...]], ...]] = {}
        self._variable_limit = 0
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

    def writer(self) -> sqlite3.Connection:
        """The one connection bulk writes go through, used only under ``write_lock``. Sharing it keeps its page
        cache warm: SQLite drops a connection's cache whenever another connection has written in between."""
        c = self._writer
        if c is None:
            c = self._writer = connect(self.org.org_db_path)
            c.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            # No fsync when this connection checkpoints the WAL into the database (it runs nearly all checkpoints:
            # after every batch commit). A commit is durable once written, so a killed or restarted emulator loses
            # nothing; only an operating-system crash could, which an emulator need not survive. The syncs cost
            # about a sixth of the CPU of a large load, in the kernel, on the worker thread.
            c.execute("PRAGMA synchronous=OFF")
            # Checkpoint after WRITER_CHECKPOINT_PAGES pages rather than SQLite's 1,000 (every commit of a load): an
            # index page rewritten by several transactions in between is copied into the database once. The WAL
            # file goes back to WRITER_WAL_KEEP_BYTES after each checkpoint.
            c.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}")
            c.execute(f"PRAGMA journal_size_limit={WRITER_WAL_KEEP_BYTES}")
        return c

    def indexes(self, table: str) -> tuple[tuple[bool, tuple[str, ...]], ...]:
        """``(unique, columns)`` of each index of ``table`` (cached: the schema does not change while serving)."""
        found = self._indexes.get(table)
        if found is None:
            conn = self.conn()
            found = self._indexes[table] = tuple(
                (bool(index[2]), tuple(info[2] for info in conn.execute(f'PRAGMA index_info("{index[1]}")')
                                       if info[2]))
                for index in conn.execute(f'PRAGMA index_list("{table}")').fetchall())
        return found

    def indexed_columns(self, table: str) -> frozenset[str]:
        """Columns of ``table`` that some index covers."""
        return frozenset(c for _, columns in self.indexes(table) for c in columns)

    def variable_limit(self, conn: sqlite3.Connection) -> int:
        if not self._variable_limit:
            self._variable_limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return self._variable_limit

    def write(self, sql: str, params: tuple = ()) -> None:
        """A small write in its own transaction (job state changes)."""
        with self.write_lock:
            c = self.writer()
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
        """Batches processed at once: the org's thread pool. In an untimed profile the work is pure CPU under the
        GIL and more threads only add contention: one batch at a time (its statements are long enough that a
        second thread gains nothing measurable on two cores), or ``UNTIMED_PARALLELISM`` when the contention knob
        needs concurrent batches."""
        profile = self.org.profile
        threads = max(1, int(profile.org_worker_threads))
        if profile.per_record_ms > 0:
            return threads
        return min(threads, UNTIMED_PARALLELISM if profile.lock_contention_rate > 0 else FAST_PARALLELISM)

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
                group = self._take_group(fn)
                self.active += 1
            try:
                if group:
                    self._run_tasks(group)
                else:
                    fn()
            except Exception:
                log.exception("bulk task %s failed", label)
            finally:
                with self.cond:
                    self.active -= 1
                    self.cond.notify()

    def _take_group(self, first: Callable[[], None]) -> list[BatchTask] | None:
        """``first`` and the fast-path batches queued right behind it, up to :data:`GROUP_MAX_RECORDS` records
        (called under ``self.cond``); ``None`` when there is nothing to group."""
        if not isinstance(first, BatchTask) or not self.queue or not self._fast_path(first.job):
            return None
        per_batch = max(1, int(self.org.profile.internal_batch_records))
        group = [first]
        while self.queue and (len(group) + 1) * per_batch <= GROUP_MAX_RECORDS:
            task = self.queue[0][0]
            if not isinstance(task, BatchTask) or not self._fast_path(task.job):
                break
            group.append(task)
            self.queue.popleft()
        return group if len(group) > 1 else None

    def start(self) -> None:
        tune_gc()
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
            c = self.writer()
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
            c = self.writer()
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
            c = self.writer()
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
                c = self.writer()
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
    def _batch_task(self, job: Job, b: Batch, gen: int) -> BatchTask:
        return BatchTask(self, job, b, gen)

    def _run_tasks(self, tasks: list[BatchTask]) -> None:
        """Run queued batches: one as :meth:`_run_batch` does, several (consecutive fast-path batches) through
        :meth:`_run_group`."""
        entered = []
        for t in tasks:
            if self._enter(t.job, t.gen):
                entered.append(t)
                continue
            with t.job.lock:
                idle = t.job.running == 0 and t.job.stop_reason in ("Aborted", "Failed")
            if idle:
                self._finalize_stopped(t.job)
        completed = [False] * len(entered)
        try:
            if len(entered) > 1 and all(self._fast_path(t.job) for t in entered):
                self._run_group(entered, completed)
            else:  # one batch, or the profile changed since the batches were grouped
                for k, t in enumerate(entered):
                    completed[k] = self._run_guarded(t.job, t.batch, t.gen)
        finally:
            for t, done in zip(entered, completed, strict=True):
                self._leave(t.job, done)

    def _run_guarded(self, job: Job, b: Batch, gen: int) -> bool:
        """:meth:`_run_batch`; an unexpected error fails the job. ``True`` when the batch is finished."""
        try:
            return self._run_batch(job, b, gen)
        except Exception as exc:
            log.exception("batch %s/%s failed", job.id, b.seq)
            with job.lock:
                if job.stop_reason is None:
                    job.stop_reason = "Failed"
                    job.error_message = f"Unknown : {exc}"
            return False

    def _read_rows(self, job: Job, b: Batch) -> list[list[str]]:
        return read_rows(job.data_path, b.start, b.end, job.delimiter)

    def _run_batch(self, job: Job, b: Batch, gen: int) -> bool:
        """Process the rest of one internal batch; ``True`` when it is finished."""
        if self._fast_path(job):
            return self._run_batch_fast(job, b, gen)
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
            conn = self.writer()
            if job.operation in ("insert", "upsert"):
                alloc.ensure(len(items), conn)
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
        # QUOTE_ALL: with an LF line ending QUOTE_MINIMAL leaves a lone CR inside a value unquoted, which splits
        # the record for every RFC 4180 reader of unprocessedrecords.
        csv.writer(buf, delimiter=job.delimiter, lineterminator=job.line_ending,
                   quoting=csv.QUOTE_ALL).writerows(rows)
        return self._append_bytes(path, offset, buf.getvalue().encode("utf-8"))

    @staticmethod
    def _append_bytes(path: Path, offset: int, data: bytes) -> int:
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(offset)
            f.write(data)
            f.truncate()
        return offset + len(data)

    # -- the fast path: untimed profiles ---------------------------------------------------------------------------
    def _fast_path(self, job: Job) -> bool:
        """Whether this job's batches may run column by column in one go (see :class:`Columns`).

        Only where chunks change nothing but the commit points: an untimed profile without the lock-contention and
        fail-after faults, and a batch time limit no batch comes near. The results are the same as the chunked path's
        (``tests/emulator/test_bulk_fast_path.py`` compares them)."""
        p = self.org.profile
        return (p.per_record_ms <= 0 and p.lock_contention_rate <= 0
                and not int(getattr(p, "fail_job_after_records", 0) or 0)
                and p.scaled(p.batch_time_limit_s) >= FAST_MIN_TIME_LIMIT_S
                and job.operation in ("insert", "upsert", "update"))

    def _run_batch_fast(self, job: Job, b: Batch, gen: int) -> bool:
        """:meth:`_run_batch` for the fast path: the rest of the batch is converted, checked and written at once."""
        completed = [False]
        self._run_group([BatchTask(self, job, b, gen)], completed)
        return completed[0]

    def _run_group(self, tasks: list[BatchTask], completed: list[bool]) -> None:
        """Fast-path batches in queue order (all entered); ``completed[k]`` tells whether ``tasks[k]`` is finished.

        Each batch is read, converted and written in full (:meth:`_write_fast`); batches that were queued back to
        back share a transaction. Batches whose keys land all over the key indexes (a load ordered by Account)
        dirty thousands of index pages each; a commit writes every dirty page to the WAL and the checkpoint copies
        it once more, and five batches in one transaction share most of those pages. A transaction ends early when
        another thread waits to write (job creation, uploads, state changes), which then never waits longer than
        for one batch. A failing transaction is rolled back with everything it changed; a single batch then raises
        (the job fails, as on the chunked path), several run again one by one."""
        k = 0
        while k < len(tasks):
            first = k
            outcomes: list[FastOutcome] = []
            self._let_writers_in()
            with self.write_lock:
                conn = self.writer()
                conn.execute("BEGIN IMMEDIATE")
                saved = self._save_fast_state(tasks[first:])
                try:
                    records = 0
                    while k < len(tasks):
                        outcome = self._write_fast(conn, tasks[k])
                        k += 1
                        outcomes.append(outcome)
                        records += outcome.records
                        if self.write_lock.contended or records >= GROUP_MAX_RECORDS:
                            break
                    conn.commit()
                except BaseException as exc:
                    conn.rollback()
                    self._restore_fast_state(saved)
                    if len(tasks) == 1 or not isinstance(exc, Exception):
                        raise
                    log.exception("a transaction of %d bulk batches failed; running them one by one", k - first)
                    outcomes = []
            if not outcomes:
                for j in range(first, len(tasks)):
                    t = tasks[j]
                    completed[j] = self._run_guarded(t.job, t.batch, t.gen)
                return
            for j, outcome in enumerate(outcomes, first):
                completed[j] = self._committed_fast(tasks[j].job, tasks[j].batch, outcome)

    def _let_writers_in(self) -> None:
        """Wait (briefly) until threads already waiting for ``write_lock`` have had it. A released lock is not handed
        to a waiter: the worker, back for its next transaction within microseconds, would take it again and again."""
        deadline = time.monotonic() + 0.05
        while self.write_lock.contended and time.monotonic() < deadline:
            time.sleep(0.001)

    def _save_fast_state(self, tasks: list[BatchTask]) -> tuple[list[tuple[Batch, tuple[int, ...]]], dict[str, Any]]:
        """What a rolled-back transaction of :meth:`_run_group` must restore: batch checkpoints and id blocks."""
        batches = [(t.batch, (t.batch.next_record, t.batch.ok_off, t.batch.err_off)) for t in tasks]
        return batches, {name: (a.next, a.end) for name, a in self.allocators.items()}

    def _restore_fast_state(self, saved: tuple[list[tuple[Batch, tuple[int, ...]]], dict[str, Any]]) -> None:
        batches, allocators = saved
        for b, (next_record, ok_off, err_off) in batches:
            # The result files are rewritten from these offsets (see _append_bytes).
            b.next_record, b.ok_off, b.err_off = next_record, ok_off, err_off
        for name, a in list(self.allocators.items()):
            if name in allocators:
                a.next, a.end = allocators[name]
            else:  # created in the transaction: its numbers were rolled back too
                del self.allocators[name]

    def _write_fast(self, conn: sqlite3.Connection, task: BatchTask) -> FastOutcome:
        """One batch of :meth:`_run_group` inside its transaction: what :meth:`_commit` and :meth:`_mark_completed`
        write on the chunked path, for the rest of the batch at once. Counters wait for the commit."""
        job, b, gen = task.job, task.batch, task.gen
        plan = job.plan
        assert plan is not None
        rows = self._read_rows(job, b)
        start = b.next_record
        outcome = FastOutcome(first_attempt=b.retries == 0 and start == 0)
        n = len(rows)
        if start >= n:
            conn.execute("UPDATE bulk_batches SET state='Completed' WHERE job_id=? AND seq=?", (job.id, b.seq))
            outcome.finished = True
            return outcome
        if job.stop_reason is not None or gen != self.generation or self.stopping:
            return outcome
        # Parents are looked up through the writer: it sees what earlier batches of the transaction wrote.
        data = self._convert_fast(job, plan, rows, start, conn)
        del rows  # the batch lives on column by column
        if job.stop_reason is not None or gen != self.generation or self.stopping:
            return outcome
        self.registry.register(data.parents)
        try:
            attempt_started = time.monotonic()
            writer = Writer(self, job, plan)
            alloc = self.allocator(job.obj)
            if job.operation in ("insert", "upsert"):
                alloc.ensure(data.n, conn)
            writer.apply_columns(conn, data, alloc)
            errors = data.errors
            b.ok_off = self._append_bytes(job.dir / f"b{b.seq:05d}.ids", b.ok_off, data.outcomes().encode("ascii"))
            bad = sorted(errors)
            ids, record = data.ids, data.record
            b.err_off = self._append_results(job.dir / f"b{b.seq:05d}.err", b.err_off,
                                             [(ids[i], errors[i].text(), *record(i)) for i in bad], job)
            b.next_record = n
            active_ms = int((time.monotonic() - attempt_started) * 1000)
            conn.execute("UPDATE bulk_batches SET next_record=?, ok_off=?, err_off=?, state='Completed' "
                         "WHERE job_id=? AND seq=?", (n, b.ok_off, b.err_off, job.id, b.seq))
            conn.execute("UPDATE bulk_jobs SET records_processed=records_processed+?, "
                         "records_failed=records_failed+?, api_active_ms=api_active_ms+?, system_modstamp=? "
                         "WHERE id=?", (data.n, len(bad), active_ms, sf_time(), job.id))
            conn.execute("INSERT INTO api_usage(day, requests, bulk_batches, bulk_records) VALUES(?, 0, 0, ?) "
                         "ON CONFLICT(day) DO UPDATE SET bulk_records=bulk_records+excluded.bulk_records",
                         (time.strftime("%Y-%m-%d", time.gmtime()), data.n))
        finally:
            self.registry.unregister(data.parents)
        outcome.finished = True
        outcome.records = data.n
        outcome.failures = Counter(errors[i].code for i in bad)
        return outcome

    def _committed_fast(self, job: Job, b: Batch, outcome: FastOutcome) -> bool:
        """After the commit of :meth:`_write_fast`: batch state and counters; ``True`` when the batch is finished."""
        stats = self.org.stats
        if outcome.first_attempt:
            stats.add("bulk_batches", 1)
        if not outcome.finished:
            return False
        b.state = "Completed"
        if outcome.records:
            stats.add("bulk_records", outcome.records)
        failed = sum(outcome.failures.values())
        if failed:
            stats.add("bulk_records_failed", failed)
            for code, k in outcome.failures.items():
                stats.failure(code, k)
        return True

    def _convert_fast(self, job: Job, plan: Plan, rows: list[list[str]], start: int,
                      conn: sqlite3.Connection) -> Columns:
        """:meth:`_convert` column by column: the same checks in the same order, per row only for failing rows;
        parents and references are looked up through ``conn``."""
        todo = rows[start:] if start else rows
        data = Columns(plan.convert_columns(todo), len(todo))
        cols, errors = data.cols, data.errors
        n = data.n
        key_col = plan.key_column
        op = job.operation
        if op in ("upsert", "update"):
            key_name = plan.key_field.name if plan.key_field is not None else (job.ext_field or "Id")
            dups: set[str] = set()
            if op == "upsert" and key_col is not None:
                # Duplicates count over the whole batch, also rows before a resume point.
                if start == 0 and not data.odd:
                    keys = list(data.raw[key_col])
                else:
                    keys = [r[key_col] for r in rows if key_col < len(r)]
                folded = fold_all(keys)
                if len(set(folded)) != len(folded):
                    counts = Counter(folded)
                    dups = {k for k, c in counts.items() if c > 1 and k and k != "#n/a"}
            key_values = cols[key_col] if key_col is not None else None
            if dups or key_values is None or IGNORE in key_values or None in key_values:
                for i in range(n):
                    if i in errors:
                        continue
                    key = key_values[i] if key_values is not None else IGNORE
                    if key is IGNORE or key is None:
                        msg = "Id not specified in an update call" if op == "update" else f"{key_name} not specified"
                        errors[i] = RowError("MISSING_ARGUMENT", msg)
                    elif dups and fold(key) in dups:
                        errors[i] = RowError("DUPLICATE_VALUE", f"Duplicate external id specified: {key}")
        for rel in plan.relationships:
            col = cols[rel.column]
            wanted = text_values(col)
            if not wanted:
                continue
            found: dict[str, list[str]] = {}
            sql = match_sql(rel.target.name, rel.lookup_field.name, rel.lookup_field.type in TEXT_TYPES)
            for value, rid in conn.execute(sql, (json.dumps(list(wanted)),)):
                found.setdefault(value, []).append(rid)
            if found.keys() == wanted and all(len(ids) == 1 for ids in found.values()):
                # Every parent exists once: swap the column for the parents' ids (failed rows do not matter).
                single = {value: ids[0] for value, ids in found.items()}
                cols[rel.column] = list(map(single.get, col, col))
                continue
            for i, v in enumerate(col):
                if i in errors or not isinstance(v, str):
                    continue
                ids = found.get(v)
                if not ids:
                    errors[i] = RowError("INVALID_FIELD", f"Foreign key external ID: {v} not found for field "
                                         f"{rel.lookup_field.name} in entity {rel.target.name}")
                elif len(ids) > 1:
                    errors[i] = RowError("DUPLICATE_EXTERNAL_ID", f"{rel.lookup_field.label}: more than one record "
                                         f"found for external id field: [{', '.join(ids)}]", (rel.header,))
                else:
                    col[i] = ids[0]
        for c, f in plan.reference_columns:
            col = cols[c]
            wanted = text_values(col)
            if not wanted:
                continue
            target = f.reference_to[0]
            present = {r[0] for r in conn.execute(f'SELECT t."Id" FROM json_each(?) j JOIN "{target}" t '
                                                   f'ON t."Id" = j.value', (json.dumps(list(wanted)),))}
            if wanted <= present:
                continue
            for i, v in enumerate(col):
                if i not in errors and isinstance(v, str) and v not in present:
                    errors[i] = RowError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
        parent_cols = [i for i, f in enumerate(plan.write_fields)
                       if f.type == "reference" and f.reference_to and f.reference_to[0] not in ("User",)]
        if len(parent_cols) == 1:
            col = cols[parent_cols[0]]
            data.parents = text_values(col) if not errors else \
                {v for i, v in enumerate(col) if isinstance(v, str) and i not in errors}
        elif parent_cols:
            for i in range(n):
                if i not in errors:
                    for c in parent_cols:
                        v = cols[c][i]
                        if isinstance(v, str):
                            data.parents.add(v)
                            break
        return data

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
            c = self.writer()
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
    return parse_records(data.decode("utf-8", "replace"), delimiter)


def parse_records(text: str, delimiter: str) -> list[list[str]]:
    """``[r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]``, about twice as fast.

    A line without a quote character (and no CR anywhere) is exactly ``line.split(delimiter)`` to the csv module;
    every record that has a quote is read by one csv reader fed the same lines from where it starts."""
    if "\r" in text or "\x00" in text:
        return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
    lines = text.split("\n")
    ends_with_newline = lines[-1] == ""
    if ends_with_newline:
        lines.pop()
    n = len(lines)
    if not n:
        return []
    if max(map(len, lines)) > csv.field_size_limit():  # let the csv module raise its error
        return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
    if '"' not in text:
        return [line.split(delimiter) for line in lines if line]
    pos = 0

    def feed() -> Iterator[str]:
        nonlocal pos
        while pos < n:
            line = lines[pos]
            pos += 1
            yield line + "\n" if (pos < n or ends_with_newline) else line

    reader = csv.reader(feed(), delimiter=delimiter)
    rows: list[list[str]] = []
    for q in [i for i, line in enumerate(lines) if '"' in line]:
        if q < pos:
            continue  # inside a record the reader already took
        rows.extend([line.split(delimiter) for line in lines[pos:q] if line])
        pos = q
        rows.append(next(reader))
    rows.extend([line.split(delimiter) for line in lines[pos:] if line])
    return rows


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
_IGNORED_AS_NULL: dict[Any, Any] = {IGNORE: None}
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

    @property
    def indexed(self) -> set[int]:
        """Update columns (text) with an index on them: worth leaving out of an update when unchanged."""
        names = self.engine.indexed_columns(self.obj.name)
        fields = self.plan.write_fields
        return {c for c in self.update_cols if fields[c].sql_type == "TEXT" and fields[c].name in names}

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

    def _insert_sql(self, now: str | None = None) -> str:
        """``INSERT`` with ``?1`` = Id, ``?2…`` = the header's values; defaults and derived fields computed in SQL."""
        cols, exprs = self._insert_parts(lambda k: f"?{k + 1}", f"'{now or now_ms_string()}'", f"'{self.user}'")
        quoted = ", ".join(f'"{c}"' for c in cols)
        return f'INSERT INTO "{self.obj.name}" ({quoted}) VALUES ({", ".join(exprs)})'

    def _insert_many_sql(self, rows: int, verb: str = "INSERT") -> str:
        """:meth:`_insert_sql` for ``rows`` records in one statement: ``?1`` = now, ``?2`` = the user, then Id and the
        header's values of each record (one prepared statement per job and size, the expressions written once)."""
        cols, exprs = self._insert_parts(lambda k: f"v.column{k + 1}", "?1", "?2")
        quoted = ", ".join(f'"{c}"' for c in cols)
        return f'{verb} INTO "{self.obj.name}" ({quoted}) SELECT {", ".join(exprs)} FROM (VALUES ' \
            f'{values_sql(rows, len(self.value_names) + 1, 3)}) AS v'

    def _insert_parts(self, param_of: Callable[[int], str], now: str, user: str) -> tuple[list[str], list[str]]:
        """Columns and value expressions of an insert; ``param_of(0)`` is the Id, ``param_of(k)`` the k-th value."""
        names = self.value_names
        cols = ["Id"]
        exprs = [param_of(0)]
        param = {name: param_of(k + 1) for k, name in enumerate(names)}
        for name, value in (("IsDeleted", "0"), ("CreatedDate", now), ("CreatedById", user),
                            ("LastModifiedDate", now), ("LastModifiedById", user),
                            ("SystemModstamp", now)):
            if name in self.has:
                cols.append(name)
                exprs.append(value)
        for name in names:
            cols.append(name)
            exprs.append(param[name])
        if "OwnerId" in self.has:
            if "OwnerId" in param:
                exprs[cols.index("OwnerId")] = f"COALESCE({param['OwnerId']}, {user})"
            else:
                cols.append("OwnerId")
                exprs.append(user)
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
        return cols, exprs

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
        for pattern, params in groups.items():
            conn.executemany(self._update_sql(pattern, now), params)

    def _update_sql(self, pattern: tuple[int, ...], now: str) -> str:
        """``UPDATE`` of the columns in ``pattern`` (``?1…``) of the record with rowid ``?n+1``."""
        sets = self._update_sets(pattern, lambda k: f"?{k + 1}", f"'{now}'", f"'{self.user}'")
        return f'UPDATE "{self.obj.name}" SET {", ".join(sets)} WHERE rowid=?{len(pattern) + 1}'

    def _update_many_sql(self, pattern: tuple[int, ...], rows: int) -> str:
        """:meth:`_update_sql` for ``rows`` different records at once: ``?1`` = now, ``?2`` = the user, then each
        record's values and rowid. (With a rowid twice, which row wins would be undefined: callers check.)"""
        sets = self._update_sets(pattern, lambda k: f"v.column{k + 1}", "?1", "?2")
        values = values_sql(rows, len(pattern) + 1, 3)
        return (f'UPDATE "{self.obj.name}" SET {", ".join(sets)} FROM (VALUES {values}) AS v '
                f'WHERE "{self.obj.name}".rowid = v.column{len(pattern) + 1}')

    def _update_sets(self, pattern: tuple[int, ...], param_of: Callable[[int], str], now: str,
                     user: str) -> list[str]:
        names = [self.plan.write_fields[c].name for c in pattern]
        sets = [f'"{name}"={param_of(k)}' for k, name in enumerate(names)]
        if self.obj.name == "Opportunity" and "StageName" in names:
            closed, won, _ = stage_sql(param_of(names.index("StageName")))
            sets += [f'"IsClosed"={closed}', f'"IsWon"={won}']
        sets += [f'"LastModifiedDate"={now}', f'"LastModifiedById"={user}', f'"SystemModstamp"={now}']
        return sets

    # -- the fast path: whole columns ------------------------------------------------------------------------
    def apply_columns(self, conn: sqlite3.Connection, data: Columns, alloc: IdAllocator) -> None:
        """:meth:`apply` for a :class:`Columns` batch: the same outcomes, errors and statements."""
        op = self.job.operation
        errors = data.errors
        cols = data.cols
        n = data.n
        live: list[int] = list(range(n)) if not errors else [i for i in range(n) if i not in errors]
        if not live:
            return
        everyone = len(live) == n
        key_col = self.plan.key_column
        obj = self.obj.name
        if op == "update":
            key_values = cols[key_col]
            ids = list({key_values[i] for i in live})
            found = dict(conn.execute(f'SELECT t."Id", t.rowid FROM json_each(?) j JOIN "{obj}" t ON t."Id" = '
                                      'j.value', (json.dumps(ids),)).fetchall())
            targets: list[int] = []
            rowids = [0] * n
            for i in live:
                rid = key_values[i]
                rowid = found.get(rid)
                if rowid is None:
                    errors[i] = RowError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
                else:
                    data.ids[i] = rid
                    rowids[i] = rowid
                    targets.append(i)
            self._update_columns(conn, data, targets, rowids)
            return
        key_field = self.plan.key_field
        if op == "insert":
            rel_cols = {r.column for r in self.plan.relationships}
            key_col, key_field = next(((i, f) for i, f in enumerate(self.plan.write_fields)
                                       if f.unique and f.name != "Id" and i not in rel_cols), (None, None))
        existing: dict[str, list[tuple[str, int]]] = {}
        key_values = cols[key_col] if key_col is not None else None
        if key_values is not None and key_field is not None:
            if everyone and IGNORE not in key_values and None not in key_values:
                keys = key_values
            else:
                keys = [k for i in live if isinstance(k := key_values[i], str)]
            text = key_field.type in TEXT_TYPES
            if keys and self._may_exist(conn, key_field, keys, text):
                collate = " COLLATE NOCASE" if text else ""
                # Current values of indexed columns come along: an update leaves those that do not change alone.
                watched = [c for c in self.update_cols if c in self.indexed] if op == "upsert" else []
                extra = "".join(f', t."{self.plan.write_fields[c].name}"' for c in watched)
                sql = (f'SELECT j.value, t."Id", t.rowid{extra} FROM json_each(?) j JOIN "{obj}" t '
                       f'ON t."{key_field.name}" = j.value{collate}')
                matches = conn.execute(sql, (json.dumps(keys),)).fetchall()
                if op == "upsert" and keys is key_values and len(matches) == n:
                    found_cols = list(zip(*matches, strict=True))
                    if list(found_cols[0]) == keys:
                        # Every row matched one record, in order (the nightly re-run of the same keys).
                        data.ids = list(found_cols[1])
                        current = {c: found_cols[3 + k] for k, c in enumerate(watched)}
                        self._update_columns(conn, data, live, list(found_cols[2]), current)
                        return
                existing = {m[0]: [(m[1], m[2])] for m in matches}
                single = len(existing) == len(matches)
                if not single:  # a key matched several records (case variants)
                    existing = {}
                    for m in matches:
                        existing.setdefault(m[0], []).append((m[1], m[2]))
        # The key values of every live row were just looked up (case-insensitively) inside this write transaction:
        # those that insert exist nowhere yet.
        checked = (key_col, key_field) if key_values is not None and key_field is not None else None
        if not existing:
            self._insert_columns(conn, data, live, alloc, checked)
            return
        inserts: list[int] = []
        updates: list[int] = []
        rowids = [0] * n
        ids = data.ids
        for i in live:
            key = key_values[i] if key_values is not None else None
            found = existing.get(key) if isinstance(key, str) else None
            if op == "insert":
                if found:
                    errors[i] = RowError("DUPLICATE_VALUE", f"duplicate value found: {key_field.name} duplicates "
                                         f"value on record with id: {found[0][0]}", (key_field.name,))
                else:
                    inserts.append(i)
            elif not found:
                inserts.append(i)
            elif len(found) > 1:
                errors[i] = RowError("DUPLICATE_EXTERNAL_ID", f"{key_field.label}: more than one record found "
                                     f"for external id field: [{', '.join(f[0] for f in found)}]",
                                     (key_field.name,))
            else:
                ids[i], rowids[i] = found[0]
                updates.append(i)
        if inserts:
            self._insert_columns(conn, data, inserts, alloc, checked)
        if updates:
            self._update_columns(conn, data, updates, rowids)

    def _may_exist(self, conn: sqlite3.Connection, key_field: Field, keys: list[str], text: bool) -> bool:
        """``False`` when no record can match any of ``keys``: one index probe for the range of the batch's keys
        saves a lookup per row when a batch brings only new keys. (NOCASE orders as :func:`fold` and code points.)"""
        if not text:
            return True
        if "\x00" in "".join(keys):  # NOCASE compares up to a NUL; keep it simple
            return True
        folded = fold_all(keys)
        low, high = min(folded), max(folded)
        sql = f'SELECT 1 FROM "{self.obj.name}" WHERE "{key_field.name}" COLLATE NOCASE BETWEEN ? AND ? LIMIT 1'
        return conn.execute(sql, (low, high)).fetchone() is not None

    def _insert_columns(self, conn: sqlite3.Connection, data: Columns, rows: list[int], alloc: IdAllocator,
                        checked: tuple[int, Field] | None = None) -> None:
        """:meth:`_insert` for the rows ``rows`` (ascending) of a :class:`Columns` batch; ``checked``: the key column
        and field whose values no record has (looked up in this transaction), see :meth:`_cannot_clash`."""
        plan = self.plan
        errors, cols, n = data.errors, data.cols, data.n
        everyone = len(rows) == n
        pick = picker(rows)

        def column(c: int) -> Sequence[Any]:
            return cols[c] if everyone else pick(cols[c])

        req_cols = {f.name: None for f in plan.required_on_create}
        for i, f in enumerate(plan.write_fields):
            if f.name in req_cols:
                req_cols[f.name] = i
        bad_cols = plan.not_createable
        absent = [name for name, c in req_cols.items() if c is None]
        present = [(name, c) for name, c in req_cols.items() if c is not None]
        suspect = bool(absent) or any(any(v is not IGNORE for v in column(c)) for c in bad_cols) or \
            any(IGNORE in (values := column(c)) or None in values for _, c in present)
        ok = rows
        if suspect:
            ok = []
            header = plan.header
            for i in rows:
                if bad_cols:
                    names = [header[c] for c in bad_cols if cols[c][i] is not IGNORE]
                    if names:
                        errors[i] = RowError("INVALID_FIELD_FOR_INSERT_UPDATE",
                                             _INVALID_FIELD_FOR_INSERT_UPDATE.format(names=", ".join(names)), names)
                        continue
                if present:
                    missing = [name for name, c in present if cols[c][i] is IGNORE or cols[c][i] is None]
                    if missing or absent:
                        errors[i] = required_missing([f.name for f in plan.required_on_create
                                                      if f.name in missing or f.name in absent])
                        continue
                elif absent:
                    errors[i] = required_missing(absent)
                    continue
                ok.append(i)
        if not ok:
            return
        now = now_ms_string()
        ids = alloc.take(len(ok))
        whole = len(ok) == n
        pick_ok = picker(ok)
        values = [cols[c] if whole else list(pick_ok(cols[c])) for c in self.value_cols]
        # An ignored value binds as NULL; mapping it here saves the adapter call per value.
        values = [list(map(_IGNORED_AS_NULL.get, v, v)) if IGNORE in v else v for v in values]
        if whole:
            data.ids = ids
            data.created = True
            created = None
        else:
            created = data.created = data.created if isinstance(data.created, list) else [data.created] * n
            for i, rid in zip(ok, ids, strict=True):
                data.ids[i] = rid
                created[i] = True
        key_values = None
        if checked is not None and checked[1].name in self.value_names:
            k = self.value_names.index(checked[1].name)
            if self.value_cols[k] == checked[0]:  # the checked column is the one written (not a later duplicate)
                key_values = values[k]
        if key_values is not None and self._cannot_clash(conn, checked[1], key_values, ids):
            # Nothing to roll back to: no savepoint, and OR ROLLBACK spares each statement its statement journal.
            self._execute_rows(conn, ("insert or rollback", *self.value_names),
                               lambda k: self._insert_many_sql(k, "INSERT OR ROLLBACK"), [ids, *values], now)
            return
        try:
            conn.execute("SAVEPOINT bulk_insert")
            self._execute_rows(conn, ("insert", *self.value_names), self._insert_many_sql, [ids, *values], now)
            conn.execute("RELEASE bulk_insert")
        except sqlite3.IntegrityError:
            # A unique field clashed: find the offending rows one by one, as Salesforce reports them per row.
            conn.execute("ROLLBACK TO bulk_insert")
            conn.execute("RELEASE bulk_insert")
            if created is None:
                created = data.created = [True] * n
            sql = self._insert_sql(now)
            for i, p in zip(ok, zip(ids, *values, strict=True), strict=True):
                try:
                    conn.execute(sql, p)
                except sqlite3.IntegrityError as exc:
                    errors[i] = RowError("DUPLICATE_VALUE", f"duplicate value found: {exc}")
                    data.ids[i] = ""
                    created[i] = False

    def _cannot_clash(self, conn: sqlite3.Connection, key_field: Field, keys: Sequence[Any], ids: list[str]) -> bool:
        """Whether inserting records with the new ``ids`` and ``keys`` (the values the insert writes to the checked
        key field, which no record has) cannot violate a unique index of the object.

        The insert then needs neither the ``bulk_insert`` savepoint nor SQLite's statement journal, both of which
        copy every page the insert changes to a temporary file first: for a batch whose keys land all over the key
        indexes (rows ordered by Account), tens of MB per batch, about as much as its commit writes. Holds when the
        only unique indexes are on ``Id`` and on the key, the keys are distinct (an upsert has already failed the
        duplicates, an insert job may repeat a key) and no record has an id in the range of the new ids (they come
        from a sequence). Inside the write transaction nobody else can add a record in between."""
        table = self.obj.name
        if any(unique and columns not in (("Id",), (key_field.name,)) for unique, columns in self.engine.indexes(table)):
            return False
        present = [k for k in keys if k is not None]  # NULLs never clash
        if len(set(present)) != len(present):
            return False
        return conn.execute(f'SELECT 1 FROM "{table}" WHERE "Id" BETWEEN ? AND ? LIMIT 1',
                            (min(ids), max(ids))).fetchone() is None

    def _update_columns(self, conn: sqlite3.Connection, data: Columns, rows: list[int], rowids: list[int],
                        current: dict[int, Sequence[Any]] | None = None) -> None:
        """:meth:`_update` for the rows ``rows`` (ascending) of a :class:`Columns` batch; ``rowids`` by row.

        ``current`` (only for distinct records, all rows of the batch): stored values of indexed columns by row; a
        row leaves such a column out of its ``UPDATE`` when the value does not change (same record state, two index
        writes fewer)."""
        if not rows:
            return
        plan = self.plan
        errors, cols, n = data.errors, data.cols, data.n
        everyone = len(rows) == n
        pick = picker(rows)

        def column(c: int) -> Sequence[Any]:
            return cols[c] if everyone else pick(cols[c])

        bad_cols = plan.not_updateable
        update_cols = self.update_cols
        # Only columns that hold a #N/A somewhere can null a required field.
        non_null = [c for c in plan.non_nillable_columns if None in column(c)]
        good = rows
        if non_null or any(any(v is not IGNORE for v in column(c)) for c in bad_cols):
            good = []
            header = plan.header
            for i in rows:
                if bad_cols:
                    names = [header[c] for c in bad_cols if cols[c][i] is not IGNORE]
                    if names:
                        errors[i] = RowError("INVALID_FIELD_FOR_INSERT_UPDATE",
                                             _INVALID_FIELD_FOR_INSERT_UPDATE.format(names=", ".join(names)), names)
                        continue
                if non_null:
                    nulled = [plan.write_fields[c].name for c in non_null if cols[c][i] is None]
                    if nulled:
                        errors[i] = required_missing(nulled)
                        continue
                good.append(i)
        if not good:
            return
        whole = len(good) == n
        pick_good = picker(good)
        # Per column: which rows leave it out (an empty value; an unchanged indexed value). Columns some rows set
        # and others leave out split the rows into groups, in order of first appearance (as _update groups them).
        always: set[int] = set()
        split: list[tuple[int, list[bool]]] = []
        for c in update_cols:
            values = cols[c] if whole else pick_good(cols[c])
            skip = [v is IGNORE for v in values] if IGNORE in values else None
            if current is not None and c in current:
                stored = current[c] if whole else pick_good(current[c])
                same = list(map(eq, values, stored))
                skip = same if skip is None else list(map(or_, skip, same))
            if skip is None or not any(skip):
                always.add(c)
            elif not all(skip):
                split.append((c, skip))
        by_shape: dict[tuple[bool, ...], list[int]] = {}
        if not split:
            by_shape[()] = good
        elif len(split) == 1:
            flags = split[0][1]
            skipped = list(compress(good, flags))
            kept = list(compress(good, map(not_, flags)))
            shapes = [((True,), skipped), ((False,), kept)]
            for key, group in shapes if flags[0] else shapes[::-1]:
                by_shape[key] = group
        else:
            for i, key in zip(good, zip(*(flags for _, flags in split), strict=True), strict=True):
                group = by_shape.get(key)
                if group is None:
                    group = by_shape[key] = []
                group.append(i)
        now = now_ms_string()
        split_cols = [c for c, _ in split]
        for key, group in by_shape.items():
            kept_cols = {c for c, ign in zip(split_cols, key, strict=True) if not ign}
            pattern = tuple(c for c in update_cols if c in always or c in kept_cols)
            whole = len(group) == n
            pick_group = picker(group)
            values = [cols[c] if whole else pick_group(cols[c]) for c in pattern]
            group_rowids = rowids if whole else pick_group(rowids)
            if len(set(group_rowids)) == len(group_rowids):
                names = tuple(self.plan.write_fields[c].name for c in pattern)
                self._execute_rows(conn, ("update", *names), lambda k, p=pattern: self._update_many_sql(p, k),
                                   [*values, group_rowids], now)
            else:  # a record twice: one statement per row, in order, so that the last row wins
                conn.executemany(self._update_sql(pattern, now), zip(*values, group_rowids, strict=True))

    def _execute_rows(self, conn: sqlite3.Connection, kind: tuple, sql_for: Callable[[int], str],
                      columns: list[Sequence[Any]], now: str) -> None:
        """Run a multi-row statement (``?1`` = now, ``?2`` = user, then the rows' parameters) over the rows of
        ``columns``, up to :data:`ROWS_PER_STATEMENT` rows at a time; far fewer steps into SQLite than a statement
        per row. ``kind`` names the statement in the engine's cache (with the object and the row count)."""
        width = len(columns)
        nrows = len(columns[0])
        per = max(1, min(ROWS_PER_STATEMENT, (self.engine.variable_limit(conn) - 2) // width))
        flat: list[Any] = [None] * (width * nrows)  # row by row, without a tuple per row
        for k, column in enumerate(columns):
            flat[k::width] = column
        head = [now, self.user]
        full = nrows // per
        cache = self.engine.sql_cache
        if full:
            key = (self.obj.name, kind, per)
            sql = cache.get(key)
            if sql is None:
                sql = cache[key] = sql_for(per)
            step = per * width
            conn.executemany(sql, [head + flat[k:k + step] for k in range(0, full * step, step)])
        rest = nrows - full * per
        if rest:
            key = (self.obj.name, kind, rest)
            sql = cache.get(key)
            if sql is None:
                sql = cache[key] = sql_for(rest)
            conn.execute(sql, head + flat[full * per * width:])


def picker(rows: list[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """``lambda values: [values[i] for i in rows]`` (as a tuple), in C."""
    if len(rows) == 1:
        return lambda values, _i=rows[0]: (values[_i],)
    return itemgetter(*rows) if rows else (lambda values: ())


def values_sql(rows: int, width: int, first: int) -> str:
    """``(?3, ?4), (?, ?)`` for ``values_sql(2, 2, 3)``: the rows of a multi-row ``VALUES``, parameters ``first`` on.

    Only the first row numbers its parameters; a bare ``?`` takes the number after the highest so far. SQLite looks
    up every numbered parameter in a list while compiling the statement, quadratic in their number: a 500-row
    statement of 12 columns took 30 ms to prepare."""
    head = "(" + ", ".join(f"?{first + k}" for k in range(width)) + ")"
    return ", ".join([head] + ["(" + ", ".join("?" * width) + ")"] * (rows - 1))


def stage_sql(stage: str) -> tuple[str, str, str]:
    """SQL for IsClosed, IsWon and the default Probability of the StageName in parameter ``stage``."""
    closed = [name for name, (_p, c, _w) in STAGE_FLAGS.items() if c]
    won = [name for name, (_p, _c, w) in STAGE_FLAGS.items() if w]
    quote = lambda names: ", ".join("'" + n.replace("'", "''") + "'" for n in names)  # noqa: E731
    prob = " ".join(f"WHEN '{name}' THEN {float(p)}" for name, (p, _c, _w) in STAGE_FLAGS.items())
    return (f"({stage} IS NOT NULL AND {stage} IN ({quote(closed)}))",
            f"({stage} IS NOT NULL AND {stage} IN ({quote(won)}))",
            f"(CASE {stage} {prob} END)")

"""Data Cloud: the a360 token exchange, the Query Connect API (``/ssot/query-sql``) and the tenant's Query API
v1/v2/v3.

Every query runs once, for real, over the DMO in ``datacloud.sqlite`` (SQL translated by :mod:`emulator.dcsql`).
SQLite renders each result row as a JSON array; a worker thread appends the rows, comma-separated, to one file per
query under ``DATA_DIR/datacloud_results/`` and records where each row starts. A page of rows is then one
``pread`` of a byte range, sent as is: serving costs nothing per value. Rows are readable as soon as they are
written, which is how a real ``Running`` query already returns its first chunk. Finished results (rows, row index,
metadata) survive an emulator restart until they expire.

Timing (``org.profile``): each call costs ``dc_request_latency_ms`` plus bytes at ``download_mbps`` (MB/s); a
query's results are visible ``dc_execution_s`` after submission (0 when the same SQL ran within the result TTL on
unchanged data, as Data Cloud's result cache does); results expire after ``dc_result_ttl_s``.

Where the reference leaves the wire format open, this emulator chooses (clients should accept both variants):

* values: Varchar/Date/TimestampTZ as JSON strings (``"2026-01-31"``, ``"2026-01-31T10:00:00.000Z"``), Numeric and
  integers as JSON numbers (exact: 17 significant digits when 15 do not round-trip), NULL as ``null``; the v1/v2
  tenant APIs print DECIMAL as strings with 18 decimals, as their docs show;
* DMO number fields are ``{"type": "Numeric", "precision": 38, "scale": 18}`` (Data Cloud's Number);
  ``count(*)``/window ranks are ``BigInt``, booleans ``Boolean``;
* the status GET returns the flat status object (as the official MCP client reads it); ``completionStatus`` is
  ``Running`` until every row exists, then ``Finished``; ``rowCount`` counts the rows readable so far;
* SQL errors: HTTP 400 ``[{"errorCode": "BAD_REQUEST", "message": "{\"errorMessage\": ..., \"customerDetail\":
  ..., \"customerHint\": ...}"}]`` with PostgreSQL-worded messages; an offset past the end says "Request out of
  range"; a cancelled or expired query answers 400 with "was canceled" / "has expired" (an unknown id 404
  ``NOT_FOUND``); DELETE always answers 204;
* the POST's first chunk stops at ``dc_first_page_max_rows`` rows, ``rowLimit`` and 1 MB; ``/rows`` pages at
  ``rowLimit`` and ``dc_page_max_bytes`` of row data; a ``Running`` query's ``/rows`` serves the rows that exist
  (long-polling for more); ``adaptiveTimeout`` (default and maximum 15 s) ends the POST's wait early;
* the a360 exchange returns ``instance_url`` as a bare ``localhost:<port>`` (the same server) and a HS256 JWT with
  ``audienceTenantId`` and ``exp``; only the ``default`` data space exists;
* Query API v3 (``/api/v3/query``, a360 token only): query ids are base64url("127.0.0.1:<port>") + ``_`` + 8 hex;
  every answer carries ``x-hyperdb-status`` (compact JSON; the status GET also sends it as the body) with
  ``completionStatus`` ``RUNNING_OR_UNSPECIFIED`` until every row exists, then ``FINISHED`` (``RESULTS_PRODUCED`` is
  never sent) and ``chunkCount`` counting complete chunks of 100,000 rows (the last, partial one once finished);
  ``waitTimeMs`` defaults to 10,000 as documented; ADAPTIVE returns the first chunk as query-sql's POST does, ASYNC
  no rows; ``queryRowLimit`` caps the result itself (``rowCount`` never exceeds it); ``?``/``$n`` placeholders are
  bound as parameters (a count mismatch is SQLSTATE 08P01); types are lowercase (``varchar``, ``numeric``,
  ``bigint``, ``timestamptz``...); ``/rows`` pages at ``limit`` and ``byteLimit`` (1..20,000,000, else 400);
  errors are the tenant body plus ``path`` and ``tenantId``, with the SQLSTATE in ``internalErrorCode`` (400); a
  cancelled or expired query answers 410 ("was canceled" / "has expired"), an unknown id 404; JSON only (an
  Accept of only Arrow answers 406).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
import weakref
from array import array
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from itertools import accumulate, islice
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from . import auth, dcsql
from .errors import JSON_TYPE, json_response, not_found, oauth_error, sf_error
from .schema import DMO_NAME
from .state import Org

log = logging.getLogger(__name__)
router = APIRouter()

FETCH_ROWS = 1_000  # result rows per fetch from SQLite and per file write
# Results are "available for up to 24 hours" but "may become unavailable sooner due to cache eviction": the
# oldest finished results go first once they take more disk than this.
RESULTS_MAX_BYTES = int(os.environ.get("EMULATOR_DC_RESULTS_MAX_BYTES", 4_000_000_000))
NOTIFY_S = 0.05  # how often a running query wakes its waiters
MAX_TOMBSTONES = 100_000  # cancelled/expired ids remembered for their specific error
FIRST_PAGE_MAX_BYTES = 1_000_000  # the POST's first chunk: "~1400-1700 rows, seems to be a payload-size limit"
CHUNK_ROWS = 100_000  # what status.chunkCount counts
ADAPTIVE_TIMEOUT_MAX_S = 15  # QuerySqlInput.adaptiveTimeout: "The maximum value is 15."
STATUS_WAIT_MAX_MS = 10_000  # waitTimeMs cap
MIN_API_VERSION = 62.0  # query-sql exists from v62.0
V1_MAX_ROWS = 49_999
V2_MAX_ROWS = 49_999
V2_MAX_BYTES = 8_000_000
V2_TOTAL_S = 3_600.0  # "You must fetch the complete result set ... within one hour."
V2_GAP_S = 180.0  # "The time interval between two batch calls must not exceed three minutes."
CDP_GRANT = "urn:salesforce:grant-type:external:cdp"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
# java.sql.Types and the v1/v2 type names of each Data Cloud type.
V2_TYPES: dict[str, tuple[str, int]] = {
    "Varchar": ("VARCHAR", 12), "Char": ("CHAR", 1), "Numeric": ("DECIMAL", 3), "BigInt": ("BIGINT", -5),
    "Integer": ("INTEGER", 4), "SmallInt": ("SMALLINT", 5), "Double": ("DOUBLE", 8), "Float": ("FLOAT", 6),
    "Boolean": ("BOOLEAN", 16), "Date": ("DATE", 91), "Time": ("TIME", 92), "Timestamp": ("TIMESTAMP", 93),
    "TimestampTZ": ("TIMESTAMP WITH TIME ZONE", 2014),
}
_DECIMAL_QUANTUM = Decimal(1).scaleb(-dcsql.NUMERIC_SCALE)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


class ApiError(Exception):
    """A Connect REST error: ``[{"errorCode", "message"}]``; SQL errors carry a JSON ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def sql(cls, err: dcsql.SqlError, status: int = 400) -> ApiError:
        return cls(status, "BAD_REQUEST", json.dumps(err.details(), ensure_ascii=False))

    @classmethod
    def bad(cls, message: str, detail: str = "", hint: str = "") -> ApiError:
        return cls.sql(dcsql.SqlError(message, detail, hint))

    def response(self) -> Response:
        return sf_error(self.status, self.code, self.message)


# -- one query -----------------------------------------------------------------------------------------------------

@dataclass
class Query:
    id: str
    sql: str
    translation: dcsql.Translation | None
    names: list[str]
    types: list[dcsql.ColumnType | None]
    path: Path  # the rows file
    created: float  # epoch seconds
    expires_at: float  # epoch seconds
    ready_at: float  # time.monotonic() when results become visible (modelled execution time)
    started: float = 0.0  # time.monotonic() at submission
    workload: str | None = None
    max_rows: int | None = None  # v3 ``queryRowLimit``: the result stops after this many rows
    produced: int = 0  # rows written to the rows file
    # starts[i] = byte offset of row i in the file; starts[produced] = end (each row is followed by a comma)
    starts: array = field(default_factory=lambda: array("Q", [0]))
    done: bool = False  # materialisation finished
    error: dcsql.SqlError | None = None
    gone: str | None = None  # "cancelled" or "expired"
    rows_processed: int = 0
    finished_at: float | None = None
    metadata: list[dict[str, Any]] | None = None  # frozen once data shows the types
    conn: sqlite3.Connection | None = None  # the executing connection, for interrupt()
    event: asyncio.Event = field(default_factory=asyncio.Event)
    # v2 cursor: batch id -> offset; single use, forward only
    v2_batches: dict[str, int] = field(default_factory=dict)
    v2_last_call: float = 0.0

    def visible(self) -> int:
        return self.produced if time.monotonic() >= self.ready_at else 0

    def finished(self) -> bool:
        return self.done and self.error is None and time.monotonic() >= self.ready_at

    def notify(self) -> None:
        """Wake every waiter (runs on the event loop thread)."""
        old, self.event = self.event, asyncio.Event()
        old.set()


class DataCloud:
    """The query registry, result store and worker pool of one org."""

    def __init__(self, org: Org) -> None:
        self.org = org
        self.results_dir = org.data_dir / "datacloud_results"
        self.queries: dict[str, Query] = {}
        self.tombstones: dict[str, str] = {}  # query id -> "cancelled"/"expired"
        self.v2_cursors: dict[str, str] = {}  # v2 nextBatchId -> query id
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dc-query")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sweeper: asyncio.Task | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._recent: dict[str, tuple[float, tuple]] = {}  # result cache: sql key -> (expiry, data fingerprint)
        self._dmo_count: tuple[tuple, int] | None = None
        self._load_results()

    # -- storage ---------------------------------------------------------------------------------------------------
    def dmo_db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "dmo", None)
        if conn is None:
            conn = self._local.dmo = dcsql.open_dmo(self.org.datacloud_db_path)
        return conn

    def _load_results(self) -> None:
        """Keep the finished, unexpired results of an earlier run; delete everything else."""
        self.results_dir.mkdir(exist_ok=True)
        now = time.time()
        keep: set[str] = set()
        for meta_path in self.results_dir.glob("*.meta.json"):
            try:
                m = json.loads(meta_path.read_text())
                qid = m["id"]
                rows_path = self.results_dir / f"{qid}.rows"
                starts = array("Q")
                with open(self.results_dir / f"{qid}.idx", "rb") as f:
                    starts.frombytes(f.read())
                if m["expires_at"] <= now or len(starts) != m["rows"] + 1 or not rows_path.exists():
                    continue
            except (OSError, ValueError, KeyError):
                continue
            types = [dcsql.ColumnType(**t) if t else None for t in m["types"]]
            self.queries[qid] = Query(qid, m["sql"], None, m["names"], types, rows_path, m["created"],
                                      m["expires_at"], ready_at=0.0, produced=m["rows"], starts=starts, done=True,
                                      rows_processed=m["rows_processed"], finished_at=m["finished_at"],
                                      metadata=m["metadata"])
            keep.update({f"{qid}.rows", f"{qid}.idx", f"{qid}.meta.json"})
        for path in self.results_dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _save(self, q: Query) -> None:
        meta = {"id": q.id, "sql": q.sql, "names": q.names, "created": q.created, "expires_at": q.expires_at,
                "rows": q.produced, "rows_processed": q.rows_processed, "finished_at": q.finished_at,
                "types": [t.__dict__ if t else None for t in q.types], "metadata": self.metadata(q)}
        with open(self.results_dir / f"{q.id}.idx", "wb") as f:
            q.starts.tofile(f)
        tmp = self.results_dir / f"{q.id}.meta.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.results_dir / f"{q.id}.meta.json")  # the meta file marks a complete result

    def _drop(self, q: Query) -> None:
        for suffix in (".meta.json", ".idx", ".rows"):
            (self.results_dir / f"{q.id}{suffix}").unlink(missing_ok=True)

    def _fingerprint(self) -> tuple:
        """Changes whenever the DMO's database changes (another module or a re-seed writes it)."""
        parts = []
        for suffix in ("", "-wal"):
            try:
                st = (self.org.datacloud_db_path.parent / (self.org.datacloud_db_path.name + suffix)).stat()
                parts.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                parts.append(None)
        return tuple(parts)

    def dmo_rows(self) -> int:
        fp = self._fingerprint()
        cached = self._dmo_count
        if cached is not None and cached[0] == fp:
            return cached[1]
        count = self.dmo_db().execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone()[0]
        self._dmo_count = (fp, count)
        return count

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.sweeper = self.loop.create_task(self._sweep())

    def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for q in list(self.queries.values()):
            if not q.done and q.conn is not None:
                q.gone = "cancelled"
                q.conn.interrupt()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                now = time.time()
                for q in list(self.queries.values()):
                    if q.expires_at <= now:
                        await self.expire(q.id)
                for key in [k for k, (until, _) in self._recent.items() if until <= now]:
                    del self._recent[key]
                while len(self.tombstones) > MAX_TOMBSTONES:  # oldest first (insertion order)
                    del self.tombstones[next(iter(self.tombstones))]
            except Exception:  # the sweeper must outlive one bad query
                log.exception("datacloud sweeper")

    # -- submitting ------------------------------------------------------------------------------------------------
    def submit(self, sql: Any, sql_parameters: Any = None, query_settings: Any = None, workload: str | None = None,
               query_id: str | None = None, translation: dcsql.Translation | None = None,
               max_rows: int | None = None) -> Query:
        """Translate and prepare ``sql`` (raising :class:`dcsql.SqlError`), then start it on a worker."""
        self.loop = asyncio.get_running_loop()
        tr = translation or dcsql.translate(sql, sql_parameters)
        conn = self.dmo_db()
        names = dcsql.result_names(conn, tr)
        types = tr.column_types(names)
        timeout_s = _query_timeout(query_settings)
        org = self.org
        now = time.time()
        key = json.dumps([tr.sql, tr.bindings], sort_keys=True, default=str)
        fp = self._fingerprint()
        cached = self._recent.get(key)
        hit = cached is not None and cached[0] > now and cached[1] == fp
        exec_s = 0.0 if hit else org.profile.scaled(org.profile.dc_execution_s)
        ttl = org.profile.scaled(org.profile.dc_result_ttl_s)
        self._recent[key] = (now + ttl, fp)
        qid = query_id or str(uuid.uuid4())
        started = time.monotonic()
        q = Query(qid, sql if isinstance(sql, str) else "", tr, names, types, self.results_dir / f"{qid}.rows", now,
                  now + ttl, started + exec_s, started=started, workload=workload, max_rows=max_rows)
        self.queries[qid] = q
        self.org.stats.add("dc_queries", 1)
        future = self.loop.run_in_executor(self.executor, self._materialise, q, timeout_s)
        future.add_done_callback(lambda f: f.exception())  # errors are recorded on the query itself
        if exec_s > 0:
            self.loop.call_later(exec_s + 0.001, q.notify)  # results become visible then
        return q

    def _materialise(self, q: Query, timeout_s: float | None) -> None:
        """Worker thread: run the query and append its rows to the rows file."""
        assert q.translation is not None
        notify = self._notifier(q)
        conn = self.dmo_db()
        auth_guard = dcsql.guard(conn)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        if deadline is not None:
            conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 100_000)
        q.conn = conn  # set before the statement starts, so a cancel can interrupt it
        fd = os.open(q.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if q.translation.tables:
                q.rows_processed = self.dmo_rows()
            if q.gone:
                raise sqlite3.OperationalError("interrupted")
            cur = conn.execute(dcsql.execution_sql(q.translation, len(q.names), q.types), q.translation.bindings)
            starts = q.starts
            last_notify = 0.0
            while True:
                want = FETCH_ROWS if q.max_rows is None else min(FETCH_ROWS, q.max_rows - q.produced)
                rows = cur.fetchmany(want) if want > 0 else []
                if not rows or q.gone:
                    break
                js = [r[0] for r in rows]
                _write_all(fd, b",".join(js) + b",")  # every row is followed by a comma
                starts.extend(islice(accumulate((len(j) + 1 for j in js), initial=starts[-1]), 1, None))
                q.produced += len(js)  # after the bytes and offsets exist: readers go by this count
                now = time.monotonic()
                if q.produced <= 10 * FETCH_ROWS or now - last_notify > NOTIFY_S:  # the first chunk: at once
                    last_notify = now
                    notify()
            cur.close()
        except sqlite3.Error as exc:
            if deadline is not None and time.monotonic() > deadline and "interrupt" in str(exc):
                q.error = dcsql.SqlError("canceling statement due to statement timeout", sqlstate="57014",
                                         hint="Raise querySettings.query_timeout or narrow the query.")
            else:
                q.error = dcsql.map_error(exc, auth_guard)
        finally:
            os.close(fd)
            conn.set_progress_handler(None, 0)
            q.conn = None
        q.rows_processed = max(q.rows_processed, q.produced)
        q.finished_at = time.time()
        q.done = True
        if q.gone or q.error is not None:
            self._drop(q)
        else:
            self._save(q)
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self._evict)
        notify()

    def _evict(self) -> None:
        """Expire the oldest finished results while all results together exceed :data:`RESULTS_MAX_BYTES`."""
        finished = sorted((q for q in self.queries.values() if q.done), key=lambda q: q.finished_at or 0)
        total = sum(q.starts[-1] for q in self.queries.values())
        for q in finished[:-1]:  # never the newest
            if total <= RESULTS_MAX_BYTES:
                break
            total -= q.starts[-1]
            self._expire_now(q)

    def _notifier(self, q: Query):
        loop = self.loop

        def notify() -> None:
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(q.notify)
        return notify

    # -- reading ---------------------------------------------------------------------------------------------------
    def get(self, qid: str) -> Query:
        q = self.queries.get(qid)
        if q is not None and q.gone is None and q.expires_at <= time.time():
            self._expire_now(q)
        if q is None or q.gone is not None:
            reason = self.tombstones.get(qid) or (q.gone if q is not None else None)
            if reason == "expired":
                raise ApiError.bad(f"Query {qid} has expired", detail="You can't make requests to an expired query.",
                                   hint="Submit the query again.")
            if reason == "cancelled":
                raise ApiError.bad(f"Query {qid} was canceled", detail="The query was canceled by a DELETE request.",
                                   hint="Submit the query again.")
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        return q

    def read_rows(self, q: Query, offset: int, limit: int, max_bytes: int) -> tuple[bytes, int]:
        """Rows ``[offset, offset + n)`` as comma-joined JSON arrays, ``n`` bounded by ``limit`` and ``max_bytes``
        (at least one row when any is available)."""
        end = min(q.visible(), offset + limit)
        if end <= offset:
            return b"", 0
        starts = q.starts
        first = starts[offset]
        # the last row index b with starts[b] - 1 - first <= max_bytes
        stop = bisect_right(starts, first + max_bytes + 1, offset + 1, end + 1) - 1
        stop = max(stop, offset + 1)
        try:
            fd = os.open(q.path, os.O_RDONLY)
        except FileNotFoundError:  # dropped under us: cancelled or expired
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist") from None
        try:
            return _read_all(fd, starts[stop] - 1 - first, first), stop - offset
        finally:
            os.close(fd)

    def metadata(self, q: Query) -> list[dict[str, Any]]:
        """``[{name, type, nullable, precision?, scale?}]``; unknown types are read off the first rows."""
        if q.metadata is not None:
            return q.metadata
        types = list(q.types)
        settled = all(t is not None for t in types)
        if not settled and q.visible() > 0:
            sample, count = self.read_rows(q, 0, FETCH_ROWS, 1 << 30)
            for row in json.loads(b"[" + sample + b"]") if count else []:
                for k, v in enumerate(row):
                    if types[k] is None and v is not None:
                        types[k] = _type_of(v)
            settled = True
        elif not settled and q.done:
            settled = True
        meta = []
        for name, t in zip(q.names, types, strict=True):
            t = t or dcsql.ColumnType("Varchar")
            item: dict[str, Any] = {"name": name, "type": t.name, "nullable": True}
            if t.precision is not None:
                item["precision"] = t.precision
                item["scale"] = t.scale
            meta.append(item)
        if settled:
            q.metadata = meta
        return meta

    def status(self, q: Query) -> dict[str, Any]:
        finished = q.finished()
        rows = q.visible()
        if finished:
            progress = 1.0
        elif q.ready_at > q.started:  # modelled execution: progress with the clock
            progress = round(min(0.99, (time.monotonic() - q.started) / (q.ready_at - q.started)), 2)
        else:
            progress = 0.0
        return {
            "queryId": q.id,
            "completionStatus": "Finished" if finished else "Running",
            "progress": progress,
            "rowCount": rows,
            "chunkCount": math.ceil(rows / CHUNK_ROWS),
            "rowsProcessed": max(q.rows_processed, rows) if finished else rows,
            "expirationTime": _iso(q.expires_at),
        }

    async def wait(self, q: Query, ready, timeout_s: float) -> None:
        """Return when ``ready()`` holds, the query ends, or ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while not ready() and q.error is None and q.gone is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            until_visible = q.ready_at - time.monotonic()
            if until_visible > 0:
                remaining = min(remaining, until_visible + 0.001)
            ev = q.event
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                pass

    # -- ending ----------------------------------------------------------------------------------------------------
    def _expire_now(self, q: Query, reason: str = "expired") -> None:
        if q.gone is not None:
            return
        q.gone = reason
        self.tombstones[q.id] = reason
        self.queries.pop(q.id, None)
        for bid in [b for b, qid in self.v2_cursors.items() if qid == q.id]:
            self.v2_cursors.pop(bid, None)
        if not q.done:
            if q.conn is not None:
                q.conn.interrupt()  # the worker drops the table when it stops
        elif self.loop is not None:
            self.loop.run_in_executor(self.executor, self._drop, q)
        else:
            self._drop(q)
        q.notify()

    async def expire(self, qid: str, reason: str = "expired") -> bool:
        q = self.queries.get(qid)
        if q is None:
            return False
        self._expire_now(q, reason)
        return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(f"rows file ended early at byte {offset + got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _type_of(v: Any) -> dcsql.ColumnType:
    if isinstance(v, bool):
        return dcsql.ColumnType("Boolean")
    if isinstance(v, int):
        return dcsql.ColumnType("BigInt")
    if isinstance(v, float):
        return dcsql.column_type("Numeric")
    return dcsql.ColumnType("Varchar")


def _query_timeout(settings: Any) -> float | None:
    """``querySettings.query_timeout`` ("1800000ms", "30s", "1800000") in seconds."""
    if not isinstance(settings, dict) or settings.get("query_timeout") in (None, ""):
        return None
    text = str(settings["query_timeout"]).strip().lower()
    factor = 1.0
    for suffix, f in (("ms", 0.001), ("min", 60.0), ("s", 1.0)):
        if text.endswith(suffix):
            text, factor = text[: -len(suffix)], f
            break
    else:
        factor = 0.001
    try:
        value = float(text) * factor
    except ValueError:
        raise ApiError.bad(f'invalid value for parameter "query_timeout": "{settings["query_timeout"]}"') from None
    return value if value > 0 else None


_SERVICES: weakref.WeakKeyDictionary[Org, DataCloud] = weakref.WeakKeyDictionary()


def service(org: Org) -> DataCloud:
    svc = _SERVICES.get(org)
    if svc is None:
        svc = _SERVICES[org] = DataCloud(org)
    return svc


def extra_stats(org: Org) -> dict[str, Any]:
    svc = _SERVICES.get(org)
    if svc is None:
        return {}
    return {"dc_queries_running": sum(1 for q in svc.queries.values() if not q.done),
            "dc_queries_stored": sum(1 for q in svc.queries.values() if q.done),
            "dc_results_bytes": sum(q.starts[-1] for q in svc.queries.values())}


def on_startup(org: Org) -> None:
    service(org).start()


def on_shutdown(org: Org) -> None:
    svc = _SERVICES.pop(org, None)
    if svc is not None:
        svc.stop()


# -- shared request helpers --------------------------------------------------------------------------------------

async def _delay(org: Org, nbytes: int = 0, latency: bool = True) -> None:
    """The modelled cost of one Data Cloud call: request latency, and transfer time of ``nbytes``."""
    p = org.profile
    seconds = p.dc_request_latency_ms / 1000 if latency else 0.0
    if nbytes and p.download_mbps:
        seconds += nbytes / (p.download_mbps * 1_000_000)
    if seconds > 0:
        await asyncio.sleep(p.scaled(seconds))


def _raw(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type=JSON_TYPE)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _int_param(request: Request, name: str, default: int | None, minimum: int = 0,
               maximum: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", f"Invalid value for parameter {name}: {raw}") from None
    if value < minimum:
        raise ApiError(400, "BAD_REQUEST", f"Invalid value for parameter {name}: {raw}")
    if maximum is not None and value > maximum:
        raise ApiError(400, "BAD_REQUEST", f"Invalid value for parameter {name}: {raw} (must be between {minimum} "
                       f"and {maximum})")
    return value


def _bool_param(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ApiError(400, "BAD_REQUEST", f"Invalid value for parameter {name}: {raw}")


def _check_version(version: str) -> None:
    try:
        ok = float(version) >= MIN_API_VERSION and version.count(".") == 1
    except ValueError:
        ok = False
    if not ok:
        raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")


def _check_dataspace(request: Request) -> None:
    ds = request.query_params.get("dataspace") or request.headers.get("dataspace")
    if ds and ds.lower() != "default":
        raise ApiError(400, "BAD_REQUEST", f"Dataspace '{ds}' doesn't exist or you don't have access to it.")


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "JSON_PARSER_ERROR", f"The request body is not valid JSON: {exc}") from None


def _page_body(data: bytes, n: int, meta: list[dict[str, Any]] | None = None,
               status: dict[str, Any] | None = None) -> bytes:
    parts = [b'{"data":[', data, b"]"]
    if meta is not None:
        parts += [b',"metadata":', _dumps(meta)]
    parts.append(b',"returnedRows":%d' % n)
    if status is not None:
        parts += [b',"status":', _dumps(status)]
    parts.append(b"}")
    return b"".join(parts)


def _count_page(org: Org, n: int) -> None:
    org.stats.add("dc_pages", 1)
    org.stats.add("dc_rows_served", n)


# -- Query Connect API on the core host ----------------------------------------------------------------------------

@router.post("/services/data/v{version}/ssot/query-sql")
async def query_sql_submit(version: str, request: Request) -> Response:
    org = auth.org_of(request)
    auth.require_session(request)
    try:
        _check_version(version)
        await _delay(org)
        _check_dataspace(request)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object.")
        row_limit = body.get("rowLimit")
        if row_limit is not None and (isinstance(row_limit, bool) or not isinstance(row_limit, int) or row_limit < 0):
            raise ApiError(400, "BAD_REQUEST", f"Invalid value for rowLimit: {row_limit}")
        adaptive = body.get("adaptiveTimeout", ADAPTIVE_TIMEOUT_MAX_S)
        if isinstance(adaptive, bool) or not isinstance(adaptive, (int, float)) or adaptive < 0:
            raise ApiError(400, "BAD_REQUEST", f"Invalid value for adaptiveTimeout: {adaptive}")
        adaptive = min(float(adaptive), ADAPTIVE_TIMEOUT_MAX_S)
        svc = service(org)
        try:
            q = svc.submit(body.get("sql"), body.get("sqlParameters"), body.get("querySettings"),
                           request.query_params.get("workloadName"))
        except dcsql.SqlError as err:
            raise ApiError.sql(err) from None
        p = org.profile
        first_rows = min(p.dc_first_page_max_rows, row_limit if row_limit is not None else p.dc_first_page_max_rows)
        data, n = b"", 0
        if adaptive > 0:
            await svc.wait(q, lambda: q.finished() or q.visible() >= first_rows, p.scaled(adaptive))
            if q.error is not None:
                raise ApiError.sql(q.error)
            data, n = svc.read_rows(q, 0, first_rows, min(p.dc_page_max_bytes, FIRST_PAGE_MAX_BYTES))
        out = _page_body(data, n, svc.metadata(q), svc.status(q))
        if n:
            _count_page(org, n)
        await _delay(org, len(out), latency=False)
        return _raw(out)
    except ApiError as err:
        return err.response()


@router.get("/services/data/v{version}/ssot/query-sql/{query_id}")
async def query_sql_status(version: str, query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    auth.require_session(request)
    try:
        _check_version(version)
        await _delay(org)
        _check_dataspace(request)
        wait_ms = min(_int_param(request, "waitTimeMs", 0) or 0, STATUS_WAIT_MAX_MS,
                      org.profile.dc_status_long_poll_max_ms)
        svc = service(org)
        q = svc.get(query_id)
        if wait_ms:
            await svc.wait(q, q.finished, org.profile.scaled(wait_ms / 1000))
            q = svc.get(query_id)
        if q.error is not None:
            raise ApiError.sql(q.error)
        return json_response(svc.status(q))
    except ApiError as err:
        return err.response()


@router.get("/services/data/v{version}/ssot/query-sql/{query_id}/rows")
async def query_sql_rows(version: str, query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    auth.require_session(request)
    try:
        _check_version(version)
        await _delay(org)
        _check_dataspace(request)
        offset = _int_param(request, "offset", 0) or 0
        row_limit = _int_param(request, "rowLimit", None)
        omit_schema = _bool_param(request, "omitSchema", False)
        svc = service(org)
        q = svc.get(query_id)
        if q.error is not None:
            raise ApiError.sql(q.error)
        if offset >= q.visible() and not q.finished():
            # Still running: wait a while for the rows to exist (a long poll, like the status call).
            await svc.wait(q, lambda: q.visible() > offset or q.finished(),
                           org.profile.scaled(org.profile.dc_status_long_poll_max_ms / 1000))
            q = svc.get(query_id)
            if q.error is not None:
                raise ApiError.sql(q.error)
        total = q.visible()
        if q.finished() and offset >= total and not (offset == 0 and total == 0):
            raise ApiError.bad(f"Request out of range: offset {offset} is beyond the last row of the result "
                               f"({total} rows)", detail=f"Valid offsets are 0 to {max(0, total - 1)}.",
                               hint="Stop paging when offset reaches status.rowCount.")
        limit = row_limit if row_limit is not None else total
        data, n = svc.read_rows(q, offset, limit, org.profile.dc_page_max_bytes)
        out = _page_body(data, n, None if omit_schema else svc.metadata(q))
        _count_page(org, n)
        await _delay(org, len(out), latency=False)
        return _raw(out)
    except ApiError as err:
        return err.response()


@router.delete("/services/data/v{version}/ssot/query-sql/{query_id}")
async def query_sql_cancel(version: str, query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    auth.require_session(request)
    try:
        _check_version(version)
        await _delay(org)
        await service(org).expire(query_id, reason="cancelled")
        return Response(status_code=204)  # idempotent, as the v3 DELETE: "Always returns 204 No Content"
    except ApiError as err:
        return err.response()


# -- a360 token exchange -------------------------------------------------------------------------------------------

async def _form(request: Request) -> dict[str, str]:
    """Form body merged with the query string: the JDBC driver sends a form, the Python connector query params."""
    raw = (await request.body()).decode("utf-8", "replace")
    merged = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    for k, v in request.query_params.items():
        merged.setdefault(k, v)
    return merged


def tenant_host(org: Org) -> str:
    """The tenant endpoint as Data Cloud returns it: a bare host name (clients prepend https://)."""
    host = "localhost" if org.host in ("127.0.0.1", "localhost") else org.host
    return f"{host}:{org.port}"


@router.post("/services/a360/token")
async def a360_token(request: Request) -> Response:
    org = auth.org_of(request)
    await org.profile.rest_delay()
    form = await _form(request)
    if form.get("grant_type") != CDP_GRANT:
        return oauth_error("unsupported_grant_type", "grant type not supported")
    if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
        return oauth_error("invalid_request", "invalid subject_token_type")
    subject = form.get("subject_token", "")
    found = auth.lookup_token(org, subject) if subject else None
    if found is None or found[2] != auth.CORE_AUDIENCE:
        return oauth_error("invalid_token", "Token is invalid", status=401)
    dataspace = form.get("dataspace") or "default"
    if dataspace.lower() != "default":
        return oauth_error("invalid_request", f"Dataspace {dataspace} not found")
    lifetime = org.profile.session_lifetime_s
    now = int(time.time())
    claims = {
        "sub": found[0],
        "iss": org.instance_url,
        "aud": tenant_host(org),
        "audienceTenantId": _tenant_id(org),
        "dataspace": dataspace,
        "iat": now,
        "nbf": now,
        "exp": now + int(lifetime),
        "jti": secrets.token_urlsafe(16),
    }
    token = jwt.encode(claims, org.credentials.client_secret, algorithm="HS256")
    auth.issue_token(org, found[0], found[1], audience=auth.DATA_CLOUD_AUDIENCE, lifetime_s=lifetime, token=token)
    return json_response({
        "access_token": token,
        "instance_url": tenant_host(org),
        "token_type": "Bearer",
        "issued_token_type": JWT_TOKEN_TYPE,
        "expires_in": int(lifetime),
    }, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


# -- tenant Query API v1 / v2 --------------------------------------------------------------------------------------

def _tenant_error(status: int, error: str, message: str, status_text: str | None = None,
                  request: Request | None = None, code: str = "COMMON_ERROR_GENERIC",
                  details: dict[str, Any] | None = None) -> Response:
    """The tenant's error body (datacloud-jdbc fixtures): timestamp, error, message, internalErrorCode, details.

    With ``request`` (Query API v3) it also carries ``path`` and ``tenantId``, as the v3 connector documents."""
    now = datetime.now(UTC)
    body: dict[str, Any] = {"timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}+0000",
                            "error": error, "message": message}
    if request is not None:
        body["path"] = request.url.path
        body["tenantId"] = _tenant_id(auth.org_of(request))
    body["internalErrorCode"] = code
    body["details"] = {"status": status_text or message, "statusCode": status, **(details or {})}
    return json_response(body, status)


def _tenant_id(org: Org) -> str:
    return f"a360/emulator/{org.credentials.org_id.lower()}"  # the token's audienceTenantId


def _tenant_session(request: Request, v3: bool = False) -> Response | None:
    try:
        auth.require_session(request, audience=auth.DATA_CLOUD_AUDIENCE)
    except auth.InvalidSession:
        return _tenant_error(401, "Unauthorized", "Authorization header verification failed",
                             status_text="UNAUTHENTICATED: Invalid JWT (not before or expired)",
                             request=request if v3 else None)
    return None


def _v2_metadata(q: Query, svc: DataCloud) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, item in enumerate(svc.metadata(q)):
        name, code = V2_TYPES.get(item["type"], ("VARCHAR", 12))
        out[item["name"]] = {"type": name, "placeInOrder": k, "typeCode": code}
    return out


def _decimal_text(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    try:
        return str(Decimal(repr(v)).quantize(_DECIMAL_QUANTUM))
    except InvalidOperation:
        return repr(v)


def _v2_rows(q: Query, svc: DataCloud, data: bytes, as_objects: bool = False) -> list[Any]:
    """v1/v2 value encoding: decimals as strings with 18 decimals (as in the v2 docs), the rest as query-sql."""
    meta = svc.metadata(q)
    numeric = [k for k, m in enumerate(meta) if m["type"] == "Numeric"]
    rows = json.loads(b"[" + data + b"]")
    if numeric:
        for row in rows:
            for k in numeric:
                row[k] = _decimal_text(row[k])
    if as_objects:
        names = [m["name"] for m in meta]
        return [dict(zip(names, row, strict=True)) for row in rows]
    return rows


def _v2_query_id() -> str:
    now = datetime.now(UTC)
    return f"{now:%Y%m%d_%H%M%S}_{secrets.randbelow(100000):05d}_" + "".join(
        secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))


def _v2_batch(org: Org, svc: DataCloud, q: Query, offset: int) -> Response:
    data, n = svc.read_rows(q, offset, V2_MAX_ROWS, V2_MAX_BYTES)
    done = offset + n >= q.visible()
    next_id = ""
    if not done:
        next_id = str(uuid.uuid4())
        q.v2_batches[next_id] = offset + n
        svc.v2_cursors[next_id] = q.id
    q.v2_last_call = time.monotonic()
    _count_page(org, n)
    return json_response({
        "data": _v2_rows(q, svc, data),
        "startTime": _iso(q.created),
        "endTime": _iso(q.finished_at or time.time()),
        "rowCount": n,
        "queryId": q.id,
        "nextBatchId": next_id,
        "done": done,
        "metadata": _v2_metadata(q, svc),
    })


async def _run_to_end(svc: DataCloud, q: Query) -> None:
    """The tenant APIs are synchronous: wait for the whole result."""
    while not q.finished() and q.error is None and q.gone is None:
        await svc.wait(q, q.finished, 60.0)


def _tenant_sql_error(err: dcsql.SqlError) -> Response:
    return _tenant_error(400, "Bad Request", err.message)


@router.post("/api/v2/query")
async def v2_query(request: Request) -> Response:
    org = auth.org_of(request)
    denied = _tenant_session(request)
    if denied is not None:
        return denied
    await _delay(org)
    try:
        body = await _json_body(request)
    except ApiError as err:
        return _tenant_error(400, "Bad Request", err.message)
    svc = service(org)
    try:
        q = svc.submit(body.get("sql") if isinstance(body, dict) else None, query_id=_v2_query_id())
    except dcsql.SqlError as err:
        return _tenant_sql_error(err)
    await _run_to_end(svc, q)
    if q.error is not None:
        return _tenant_sql_error(q.error)
    resp = _v2_batch(org, svc, q, 0)
    await _delay(org, len(resp.body), latency=False)
    return resp


@router.get("/api/v2/query/{batch_id}")
async def v2_next_batch(batch_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    denied = _tenant_session(request)
    if denied is not None:
        return denied
    await _delay(org)
    svc = service(org)
    qid = svc.v2_cursors.pop(batch_id, None)  # forward only: a batch id works once
    q = svc.queries.get(qid) if qid else None
    if q is None or batch_id not in q.v2_batches:
        return _tenant_error(404, "Not Found", "Not Found")
    offset = q.v2_batches.pop(batch_id)
    p = org.profile
    if time.time() - q.created > p.scaled(V2_TOTAL_S) or time.monotonic() - q.v2_last_call > p.scaled(V2_GAP_S):
        return _tenant_error(400, "Bad Request", f"The batch {batch_id} has expired: fetch the whole result within "
                             "one hour and call again within three minutes.")
    resp = _v2_batch(org, svc, q, offset)
    await _delay(org, len(resp.body), latency=False)
    return resp


@router.post("/api/v1/query")
async def v1_query(request: Request) -> Response:
    org = auth.org_of(request)
    denied = _tenant_session(request)
    if denied is not None:
        return denied
    await _delay(org)
    try:
        body = await _json_body(request)
        limit = _int_param(request, "limit", V1_MAX_ROWS, minimum=1) or V1_MAX_ROWS
        offset = _int_param(request, "offset", 0) or 0
    except ApiError as err:
        return _tenant_error(400, "Bad Request", err.message)
    limit = min(limit, V1_MAX_ROWS)
    orderby = request.query_params.get("orderby")
    sql = body.get("sql") if isinstance(body, dict) else None
    svc = service(org)
    try:
        translation = None
        if orderby:
            # The v1 paging contract: the query's rows ordered by ``orderby``, then limit/offset.
            tr = dcsql.translate(sql)
            translation = dcsql.Translation(f"SELECT * FROM ({tr.sql}) ORDER BY {dcsql.translate_order_by(orderby)}",
                                            tr.bindings, tr.columns, tr.tables, tr.star_table)
        q = svc.submit(sql, translation=translation)
    except dcsql.SqlError as err:
        return _tenant_sql_error(err)
    await _run_to_end(svc, q)
    if q.error is not None:
        return _tenant_sql_error(q.error)
    total = q.visible()
    data, n = svc.read_rows(q, offset, limit, 1 << 62) if offset < total else (b"", 0)
    _count_page(org, n)
    meta = _v2_metadata(q, svc)
    resp = json_response({
        "data": _v2_rows(q, svc, data, as_objects=True),
        "startTime": _iso(q.created),
        "endTime": _iso(q.finished_at or time.time()),
        "rowCount": n,
        "queryId": str(uuid.uuid4()),
        "done": offset + n >= total,
        "metadata": meta,
    })
    await svc.expire(q.id, reason="cancelled")  # v1 keeps no cursor
    await _delay(org, len(resp.body), latency=False)
    return resp


_V1_FIELD_TYPES = {"Varchar": "STRING", "Numeric": "NUMBER", "Date": "DATE", "TimestampTZ": "DATE_TIME"}


@router.get("/api/v1/metadata")
async def v1_metadata(request: Request) -> Response:
    """The DMOs (the Python connector's ``list_tables``); filters ``entityName``, ``entityType``, ``entityCategory``."""
    denied = _tenant_session(request)
    if denied is not None:
        return denied
    await _delay(auth.org_of(request))
    q = request.query_params
    out = []
    for name, cols in dcsql.CATALOG.items():
        if q.get("entityName") not in (None, "", name) or q.get("entityType") not in (None, "", "DataModelObject") \
                or q.get("entityCategory") not in (None, "", "Related"):
            continue
        out.append({
            "name": name,
            "displayName": name.removesuffix("__dlm").replace("_", " "),
            "category": "Related",
            "fields": [{"name": c, "displayName": c.removesuffix("__c").replace("_", " "),
                        "type": _V1_FIELD_TYPES.get(t, "STRING")} for c, t in cols.items()],
            "primaryKeys": [{"name": "ExternalId__c", "displayName": "ExternalId", "indexOrder": "1"}],
        })
    return json_response({"metadata": out})


# -- tenant Query API v3 -------------------------------------------------------------------------------------------

V3_BYTE_LIMIT_MAX = 20_000_000  # /rows byteLimit: "Default and maximum is 20 MB (20000000)"
V3_STREAM_SLICE = 256 * 1024  # a chunk is streamed from the rows file in slices of this size
V3_TRANSFER_MODES = ("ADAPTIVE", "ASYNC")
V3_PARAM_STYLES = ("QUESTION_MARK", "NAMED", "DOLLARED")
# Data Cloud's type names in v3 metadata: lowercase (Hyper's).
V3_TYPES = {"Varchar": "varchar", "Char": "char", "Numeric": "numeric", "BigInt": "bigint", "Integer": "integer",
            "SmallInt": "smallint", "Double": "double", "Float": "double", "Boolean": "boolean", "Date": "date",
            "Time": "time", "Timestamp": "timestamp", "TimestampTZ": "timestamptz"}
# Parameter type spellings dcsql does not know, mapped to its names (it compares case-insensitively).
_V3_PARAM_ALIASES = {"int": "Integer", "int2": "SmallInt", "int4": "Integer", "int8": "BigInt", "float4": "Float",
                     "real": "Float", "float8": "Double", "double precision": "Double", "bpchar": "Char",
                     "character varying": "Varchar", "character": "Char",
                     "timestamp with time zone": "TimestampTZ", "timestamp without time zone": "Timestamp",
                     "time without time zone": "Time"}
_DOLLAR_PARAM = re.compile(r"\$(\d+)")


class V3Error(Exception):
    """An error on the v3 API: the tenant body with ``path``/``tenantId``; SQL errors carry their SQLSTATE."""

    def __init__(self, status: int, message: str, code: str = "COMMON_ERROR_GENERIC",
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.details = details

    @classmethod
    def of(cls, exc: Exception) -> V3Error:
        if isinstance(exc, V3Error):
            return exc
        if isinstance(exc, dcsql.SqlError):
            return cls(400, exc.message, exc.sqlstate, {"sqlState": exc.sqlstate, "customerDetail": exc.detail,
                                                        "customerHint": exc.hint})
        assert isinstance(exc, ApiError)
        try:
            parsed = json.loads(exc.message)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "errorMessage" in parsed:  # ApiError.sql / ApiError.bad
            return cls(exc.status, parsed["errorMessage"], details={
                "customerDetail": parsed.get("customerDetail", ""), "customerHint": parsed.get("customerHint", "")})
        return cls(exc.status, exc.message)

    def response(self, request: Request) -> Response:
        phrase = HTTPStatus(self.status).phrase
        return _tenant_error(self.status, phrase, self.message, phrase, request=request, code=self.code,
                             details=self.details)


def _v3_query_id(org: Org) -> str:
    """base64("ip:port") + "_" + 8 hex digits, like ``MTAuMjQuMTIzLjE5NDo3NDg0_cb6991ab``."""
    host = "127.0.0.1" if org.host == "localhost" else org.host
    node = base64.urlsafe_b64encode(f"{host}:{org.port}".encode()).decode().rstrip("=")
    return f"{node}_{secrets.token_hex(4)}"


def _v3_get(svc: DataCloud, qid: str) -> Query:
    """The live query, else 410 (cancelled or expired, with the reason) or 404."""
    try:
        q = svc.get(qid)
    except ApiError:
        reason = svc.tombstones.get(qid)
        if reason == "cancelled":
            raise V3Error(410, f"Query {qid} was canceled", "57014",
                          {"customerDetail": "The query was canceled by a DELETE request."}) from None
        if reason == "expired":
            raise V3Error(410, f"Query {qid} has expired", details={
                "customerDetail": "You can't make requests to an expired query."}) from None
        raise V3Error(404, f"Query {qid} not found") from None
    if q.error is not None:
        raise V3Error.of(q.error)
    return q


def _v3_status(q: Query) -> dict[str, Any]:
    """The ``x-hyperdb-status`` object. ``chunkCount`` counts complete chunks (every chunk once finished)."""
    finished = q.finished()
    rows = q.visible()
    if finished:
        progress = 1.0
    elif q.ready_at > q.started:
        progress = round(min(0.99, (time.monotonic() - q.started) / (q.ready_at - q.started)), 2)
    else:
        progress = 0.0
    end = max(q.finished_at or 0.0, q.created + (q.ready_at - q.started)) if finished else time.time()
    return {
        "queryId": q.id,
        "completionStatus": "FINISHED" if finished else "RUNNING_OR_UNSPECIFIED",
        "chunkCount": math.ceil(rows / CHUNK_ROWS) if finished else rows // CHUNK_ROWS,
        "rowCount": rows,
        "progress": progress,
        "expirationTime": _iso(q.expires_at),
        "executionStats": {"wallClockTime": round(max(0.0, end - q.created), 6),
                           "rowsProcessed": max(q.rows_processed, rows) if finished else rows},
    }


def _v3_headers(q: Query) -> dict[str, str]:
    return {"x-hyperdb-status": json.dumps(_v3_status(q), separators=(",", ":"))}


def _v3_columns(svc: DataCloud, q: Query) -> list[dict[str, Any]]:
    return [{**m, "type": V3_TYPES.get(m["type"], m["type"].lower())} for m in svc.metadata(q)]


def _v3_body_head(svc: DataCloud, q: Query, omit_schema: bool) -> bytes:
    head = b"{"
    if not omit_schema:
        head += b'"metadata":' + _dumps({"columns": _v3_columns(svc, q)}) + b","
    return head + b'"data":['


def _v3_page(svc: DataCloud, q: Query, data: bytes, n: int, omit_schema: bool = False) -> bytes:
    return b"".join((_v3_body_head(svc, q, omit_schema), data, b'],"returnedRows":%d}' % n))


def _v3_response(body: bytes, q: Query) -> Response:
    return Response(body, media_type=JSON_TYPE, headers=_v3_headers(q))


def _v3_params(sql: Any, style: str, parameters: Any) -> tuple[Any, list[dict[str, Any]] | None]:
    """``sql`` and the ``{name, type, value}`` list dcsql binds: ``?`` and ``$n`` become ``:p<n>``.

    Placeholders are found with dcsql's token grammar, so ``?``/``$1`` inside string literals, quoted identifiers
    and comments stay as they are."""
    if parameters is not None and not isinstance(parameters, list):
        raise V3Error(400, "parameters must be an array of {type, value} objects")
    params = parameters or []
    out: list[dict[str, Any]] = []
    for k, item in enumerate(params, 1):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not item["type"].strip():
            raise V3Error(400, f"parameters[{k - 1}]: each parameter requires type (string) and value (string)")
        type_name = " ".join(item["type"].lower().split())
        entry = {"name": f"p{k}", "type": _V3_PARAM_ALIASES.get(type_name, type_name), "value": item.get("value")}
        if style == "NAMED":
            if not isinstance(item.get("name"), str) or not item["name"].strip():
                raise V3Error(400, f"parameters[{k - 1}]: paramStyle NAMED requires a name for every parameter")
            entry["name"] = item["name"]
        out.append(entry)
    if style == "NAMED" or not isinstance(sql, str):
        return sql, out if parameters is not None else None
    parts: list[str] = []
    used: set[int] = set()
    count = 0
    pos = last = 0
    while pos < len(sql):
        m = dcsql._TOKEN_RE.match(sql, pos)
        if m is not None:
            if m.lastgroup == "param":  # ``:name`` only with paramStyle NAMED
                raise dcsql.SqlError(f'syntax error at or near "{m.group()}"',
                                     hint="Named placeholders need paramStyle NAMED.", sqlstate="42601")
            pos = m.end()
            continue
        if style == "QUESTION_MARK" and sql[pos] == "?":
            count += 1
            parts += [sql[last:pos], f":p{count}"]
            used.add(count)
            pos = last = pos + 1
            continue
        d = _DOLLAR_PARAM.match(sql, pos) if style == "DOLLARED" else None
        if d is None:
            break  # not SQL dcsql can read: its tokenizer reports the error
        k = int(d.group(1))
        if k < 1:
            raise dcsql.SqlError(f"there is no parameter ${k}", sqlstate="42P02")
        count = max(count, k)
        parts += [sql[last:pos], f":p{k}"]
        used.add(k)
        pos = last = d.end()
    parts.append(sql[last:])
    if count != len(params):
        raise dcsql.SqlError(f"bind message supplies {len(params)} parameters, but prepared statement requires "
                             f"{count}", hint=f"paramStyle {style}: send one parameter per placeholder.",
                             sqlstate="08P01")
    return "".join(parts), out if out else None


def _v3_check_request(request: Request) -> None:
    ds = request.headers.get("ctx-dataspace-ds_name")
    if ds and ds.lower() != "default":
        raise V3Error(400, f"Dataspace '{ds}' doesn't exist or you don't have access to it.")
    accept = request.headers.get("accept", "")
    if "application/vnd.apache.arrow.stream" in accept and "json" not in accept and "*/*" not in accept:
        raise V3Error(406, "This emulator serves application/json only (no Arrow IPC streams).")


def _v3_endpoint(handler):
    """What every v3 route does first: check the a360 token, the data space header and the Accept header, and charge
    the request's latency; a :class:`V3Error`, or an error of the helpers query-sql shares (``_int_param``...), becomes
    the tenant error body."""

    @functools.wraps(handler)  # FastAPI reads the handler's signature through __wrapped__
    async def endpoint(*args: Any, **kwargs: Any) -> Response:
        request: Request = kwargs["request"]
        denied = _tenant_session(request, v3=True)
        if denied is not None:
            return denied
        try:
            _v3_check_request(request)
            await _delay(auth.org_of(request))
            return await handler(*args, **kwargs)
        except (V3Error, ApiError, dcsql.SqlError) as err:
            return V3Error.of(err).response(request)

    return endpoint


@router.post("/api/v3/query")
@_v3_endpoint
async def v3_submit(request: Request) -> Response:
    org = auth.org_of(request)
    try:
        body = await _json_body(request)
    except ApiError as err:
        raise V3Error(400, err.message) from None
    if not isinstance(body, dict):
        raise V3Error(400, "The request body must be a JSON object.")
    sql = body.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise V3Error(400, "sql is required")
    mode = body.get("transferMode", "ADAPTIVE")
    if mode not in V3_TRANSFER_MODES:
        raise V3Error(400, f"Invalid transferMode: {mode!r} (ASYNC or ADAPTIVE)")
    style = body.get("paramStyle", "QUESTION_MARK")
    if style not in V3_PARAM_STYLES:
        raise V3Error(400, f"Invalid paramStyle: {style!r} (QUESTION_MARK, NAMED or DOLLARED)")
    row_limit = body.get("queryRowLimit")
    if row_limit is not None and (isinstance(row_limit, bool) or not isinstance(row_limit, int) or row_limit < 0):
        raise V3Error(400, f"Invalid queryRowLimit: {row_limit!r}")
    settings = body.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise V3Error(400, "settings must be an object")
    # settings.timezone / settings.language and resultRange are accepted and ignored.
    sql, parameters = _v3_params(sql, style, body.get("parameters"))
    svc = service(org)
    q = svc.submit(sql, parameters, settings, request.headers.get("x-hyperdb-workload"),
                   query_id=_v3_query_id(org), max_rows=row_limit)
    data, n = b"", 0
    if mode == "ADAPTIVE":
        p = org.profile
        first_rows = p.dc_first_page_max_rows if row_limit is None else min(p.dc_first_page_max_rows, row_limit)
        cap = math.inf if row_limit is None else row_limit  # all of a capped result: wait for FINISHED
        await svc.wait(q, lambda: q.finished() or first_rows <= q.visible() < cap,
                       p.scaled(ADAPTIVE_TIMEOUT_MAX_S))
        q = _v3_get(svc, q.id)
        data, n = svc.read_rows(q, 0, first_rows, min(p.dc_page_max_bytes, FIRST_PAGE_MAX_BYTES))
        if n:
            _count_page(org, n)
    out = _v3_page(svc, q, data, n)
    await _delay(org, len(out), latency=False)
    return _v3_response(out, q)


@router.get("/api/v3/query/{query_id}")
@_v3_endpoint
async def v3_status(query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    # "waitTimeMs ... Default and maximum: 10000"
    wait_ms = min(_int_param(request, "waitTimeMs", STATUS_WAIT_MAX_MS) or 0, STATUS_WAIT_MAX_MS,
                  org.profile.dc_status_long_poll_max_ms)
    svc = service(org)
    q = _v3_get(svc, query_id)
    if wait_ms:
        await svc.wait(q, q.finished, org.profile.scaled(wait_ms / 1000))
        q = _v3_get(svc, query_id)
    status = _v3_status(q)
    return json_response(status, headers={"x-hyperdb-status": json.dumps(status, separators=(",", ":"))})


@router.get("/api/v3/query/{query_id}/rows")
@_v3_endpoint
async def v3_rows(query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    if request.query_params.get("offset") in (None, ""):
        raise V3Error(400, "Missing required parameter offset")
    offset = _int_param(request, "offset", 0) or 0
    limit = _int_param(request, "limit", None, minimum=1)
    byte_limit = _int_param(request, "byteLimit", V3_BYTE_LIMIT_MAX, minimum=1, maximum=V3_BYTE_LIMIT_MAX)
    omit_schema = _bool_param(request, "omitSchema", False)
    svc = service(org)
    q = _v3_get(svc, query_id)
    if offset >= q.visible() and not q.finished():
        # Still running: long-poll for the rows at ``offset``, as query-sql's /rows does.
        await svc.wait(q, lambda: q.visible() > offset or q.finished(),
                       org.profile.scaled(org.profile.dc_status_long_poll_max_ms / 1000))
        q = _v3_get(svc, query_id)
    total = q.visible()
    if q.finished() and offset >= total and not (offset == 0 and total == 0):
        raise V3Error(400, f"Request out of range: offset {offset} is beyond the last row of the result "
                      f"({total} rows)", details={"customerHint": "Stop paging when offset reaches rowCount."})
    head = _v3_body_head(svc, q, omit_schema)
    # byteLimit bounds the whole body (the envelope's tail is at most 40 bytes); at least one row is sent
    data, n = svc.read_rows(q, offset, limit if limit is not None else max(total - offset, 0),
                            max(0, byte_limit - len(head) - 40))
    out = b"".join((head, data, b'],"returnedRows":%d}' % n))
    _count_page(org, n)
    await _delay(org, len(out), latency=False)
    return _v3_response(out, q)


@router.get("/api/v3/query/{query_id}/chunks/{chunk_id}")
@_v3_endpoint
async def v3_chunk(query_id: str, chunk_id: str, request: Request) -> Response:
    """Chunk n = rows [n * CHUNK_ROWS, (n + 1) * CHUNK_ROWS), streamed from the rows file (chunked encoding)."""
    org = auth.org_of(request)
    omit_schema = _bool_param(request, "omitSchema", False)
    try:
        n = int(chunk_id)
    except ValueError:
        raise V3Error(400, f"Invalid chunkId: {chunk_id}") from None
    svc = service(org)
    q = _v3_get(svc, query_id)
    if n >= 0 and not q.finished() and q.visible() < (n + 1) * CHUNK_ROWS:
        await svc.wait(q, lambda: q.finished() or q.visible() >= (n + 1) * CHUNK_ROWS,
                       org.profile.scaled(org.profile.dc_status_long_poll_max_ms / 1000))
        q = _v3_get(svc, query_id)
    count = _v3_status(q)["chunkCount"]
    if not 0 <= n < count:
        raise V3Error(400, f"Request out of range: chunk {n} does not exist (chunkCount {count}"
                      + ("" if q.finished() else ", the query is still running") + ")")
    first, stop = n * CHUNK_ROWS, min(q.visible(), (n + 1) * CHUNK_ROWS)
    head = _v3_body_head(svc, q, omit_schema)
    headers = _v3_headers(q)
    try:
        fd = os.open(q.path, os.O_RDONLY)
    except FileNotFoundError:  # dropped under us: cancelled or expired
        raise V3Error(410, f"Query {query_id} has expired") from None
    begin, end = q.starts[first], q.starts[stop] - 1  # row data without the trailing comma
    _count_page(org, stop - first)

    async def body():
        try:
            yield head
            pos = begin
            while pos < end:
                piece = os.pread(fd, min(V3_STREAM_SLICE, end - pos), pos)
                if not piece:
                    raise OSError(f"rows file ended early at byte {pos}")
                pos += len(piece)
                await _delay(org, len(piece), latency=False)
                yield piece
            yield b'],"returnedRows":%d}' % (stop - first)
        finally:
            os.close(fd)

    return StreamingResponse(body(), media_type=JSON_TYPE, headers=headers)


@router.get("/api/v3/query/{query_id}/metadata")
@_v3_endpoint
async def v3_metadata(query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    svc = service(org)
    q = _v3_get(svc, query_id)
    if q.metadata is None and any(t is None for t in q.types):  # types read off the first rows
        await svc.wait(q, lambda: q.visible() > 0 or q.finished(),
                       org.profile.scaled(org.profile.dc_status_long_poll_max_ms / 1000))
        q = _v3_get(svc, query_id)
    return json_response({"metadata": {"columns": _v3_columns(svc, q)}}, headers=_v3_headers(q))


@router.delete("/api/v3/query/{query_id}")
@_v3_endpoint
async def v3_cancel(query_id: str, request: Request) -> Response:
    org = auth.org_of(request)
    await service(org).expire(query_id, reason="cancelled")
    return Response(status_code=204)  # "Always returns 204 No Content"


# -- control plane -------------------------------------------------------------------------------------------------

@router.post("/__emulator/datacloud/expire")
async def control_expire(request: Request) -> Response:
    """Expire one query (``{"queryId": ...}``) or every query (empty body) now: later calls get the expiry error."""
    svc = service(auth.org_of(request))
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return sf_error(400, "JSON_PARSER_ERROR", "invalid JSON")
    qid = body.get("queryId") if isinstance(body, dict) else None
    targets = [qid] if qid else list(svc.queries)
    expired = [t for t in targets if await svc.expire(t)]
    if qid and not expired:
        return not_found()
    return json_response({"expired": expired})


@router.get("/__emulator/datacloud/queries")
async def control_queries(request: Request) -> Response:
    svc = service(auth.org_of(request))
    return json_response({"queries": [{"sql": q.sql, **svc.status(q), "done": q.done,
                                       "error": q.error.message if q.error else None}
                                      for q in svc.queries.values()]})

"""Read Data Cloud rows through the Query Connect API (``/services/data/vXX.X/ssot/query-sql``).

The query runs once on the server; rows then come page by page from ``/rows?offset=&rowLimit=`` until
``status.rowCount`` is reached, so a result of any size is read with flat memory. The submit response holds
only a first slice (the server decides how much), and the query may still be running when it answers:
the hook long-polls the status (``waitTimeMs``) before reading further. Values from data never enter the
SQL text; they travel as typed ``sqlParameters``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from sf_datacloud_sync.hooks._http import ApiRequest, SalesforceApiError, SalesforceClient
from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
from sf_datacloud_sync.utils.csv_encoder import format_datetime, format_decimal, format_float

log = logging.getLogger(__name__)

DONE_STATES = frozenset({"resultsproduced", "finished"})
FAILED_STATES = frozenset({"failed", "error", "cancelled", "canceled", "aborted"})
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SENTINEL_END = object()


class DataCloudQueryError(SalesforceApiError):
    """Data Cloud refused or failed the query (SQL errors carry Hyper's message and hint)."""


class DataCloudQueryExpired(RuntimeError):
    """The query's results are gone (expired or evicted) before all rows were read.

    :param query_id: The expired query.
    :param offset: Rows already read; a new query may resume after the last row's key.
    """

    def __init__(self, query_id: str, offset: int, detail: str = "") -> None:
        self.query_id = query_id
        self.offset = offset
        super().__init__(f"Data Cloud query {query_id} expired after {offset} rows were read"
                         + (f" ({detail})" if detail else "") + "; submit the query again to continue")

    def __reduce__(self):
        return (type(self), (self.query_id, self.offset))


# -- parameters ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SqlParam:
    """A parameter with an explicit Data Cloud type, e.g. ``SqlParam("42", "Varchar")``."""

    value: Any
    type: str


def sql_parameter(name: str, value: Any) -> dict[str, str]:
    """One ``sqlParameters`` entry ``{name, type, value}``; the value is always a string.

    Types: ``str`` → Varchar, ``bool`` → Bool, ``int`` → BigInt, ``float``/``Decimal`` → Numeric,
    ``datetime`` → TimestampTZ (naive = UTC), ``date`` → Date, ``time`` → Time; :class:`SqlParam` sets the
    type explicitly. ``None`` is refused: write ``IS NULL`` in the SQL.
    """
    if not _PARAM_NAME.match(name):
        raise ValueError(f"SQL parameter name {name!r} must be letters, digits and underscores")
    if isinstance(value, SqlParam):
        type_name, value = value.type, value.value
        text = value if isinstance(value, str) else _param_text(value)[1]
        return {"name": name, "type": type_name, "value": text}
    type_name, text = _param_text(value)
    return {"name": name, "type": type_name, "value": text}


def _param_text(value: Any) -> tuple[str, str]:
    if value is None:
        raise TypeError("a SQL parameter cannot be None; write IS NULL in the SQL instead")
    if isinstance(value, bool):
        return "Bool", "true" if value else "false"
    if isinstance(value, int):
        return "BigInt", str(value)
    if isinstance(value, float):
        return "Numeric", format_float(value)
    if isinstance(value, Decimal):
        return "Numeric", format_decimal(value)
    if isinstance(value, dt.datetime):
        return "TimestampTZ", format_datetime(value)
    if isinstance(value, dt.date):
        return "Date", value.isoformat()
    if isinstance(value, dt.time):
        return "Time", value.isoformat()
    if isinstance(value, str):
        return "Varchar", value
    raise TypeError(f"unsupported SQL parameter type {type(value).__name__}; use SqlParam(value, type)")


def sql_parameters(parameters: Mapping[str, Any]) -> list[dict[str, str]]:
    return [sql_parameter(name, value) for name, value in parameters.items()]


# -- values ------------------------------------------------------------------------------------------------------
def _to_decimal(v: Any) -> Any:
    if v.__class__ is float:
        return Decimal(repr(v))
    try:
        return Decimal(v)
    except (InvalidOperation, TypeError, ValueError):
        return v


def _to_int(v: Any) -> Any:
    if v.__class__ is int:
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(Decimal(v))
        except (InvalidOperation, TypeError, ValueError):
            return v


def _to_float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _to_bool(v: Any) -> Any:
    if v.__class__ is bool:
        return v
    if isinstance(v, str):
        return v.strip().lower() in ("true", "t", "1", "yes")
    return bool(v)


def _to_date(v: Any) -> Any:
    try:
        return dt.date.fromisoformat(v[:10])
    except (TypeError, ValueError):
        return v


def _to_datetime(v: Any) -> Any:
    try:
        return dt.datetime.fromisoformat(v.replace(" UTC", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return v


def _to_time(v: Any) -> Any:
    try:
        return dt.time.fromisoformat(v)
    except (TypeError, ValueError):
        return v


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "numeric": _to_decimal, "decimal": _to_decimal,
    "bigint": _to_int, "integer": _to_int, "int": _to_int, "smallint": _to_int,
    "double": _to_float, "float": _to_float, "real": _to_float,
    "bool": _to_bool, "boolean": _to_bool,
    "date": _to_date,
    "timestamp": _to_datetime, "timestamptz": _to_datetime, "timestamp with time zone": _to_datetime,
    "time": _to_time,
}


def row_converter(types: Sequence[str]) -> Callable[[list], tuple]:
    """Turn a JSON row (numbers may arrive as strings) into a tuple of Python values by column type."""
    convs = [(i, _CONVERTERS[t.lower()]) for i, t in enumerate(types) if t and t.lower() in _CONVERTERS]
    if not convs:
        return tuple

    def convert(row: list) -> tuple:
        for i, fn in convs:
            v = row[i]
            if v is not None:
                row[i] = fn(v)
        return tuple(row)

    return convert


# -- result ------------------------------------------------------------------------------------------------------
def _status_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The status object of a submit or status response: nested under ``status`` or flat."""
    status = body.get("status")
    return dict(status) if isinstance(status, Mapping) else dict(body)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return None


class _Pages:
    """Fetches the pages of one query; runs in the caller's thread or in a prefetch thread."""

    def __init__(self, hook: DataCloudHook, query_id: str, status: dict[str, Any], offset: int,
                 row_limit: int | None, page_rows: int) -> None:
        self.hook = hook
        self.query_id = query_id
        self.status = status
        self.offset = offset
        self.row_limit = row_limit
        self.page_rows = page_rows
        self.stop = threading.Event()

    @property
    def row_count(self) -> int | None:
        return _int_or_none(self.status.get("rowCount"))

    @property
    def done(self) -> bool:
        return str(self.status.get("completionStatus", "")).lower() in DONE_STATES

    def wanted(self) -> int | None:
        """Rows still to read (``None`` = unknown until the query finishes)."""
        total = self.row_count if self.done else None
        if self.row_limit is not None:
            total = self.row_limit if total is None else min(total, self.row_limit)
        return None if total is None else max(0, total - self.offset)

    def next_request(self) -> tuple[int, int | None] | None:
        """``(offset, rowLimit)`` of the next page, after waiting for the query to finish; ``None`` at the end."""
        while not self.done:
            if self.stop.is_set():
                return None
            self.status = self.hook._poll_status(self.query_id, self.offset)
        left = self.wanted()
        if left == 0 or self.stop.is_set():
            return None
        return self.offset, left

    def advance(self, rows: int, left: int | None) -> bool:
        """Count a page of ``rows`` rows; ``False`` when it was the (empty) last one."""
        if rows == 0:
            if left is None:  # no rowCount given: an empty page is the end
                return False
            raise DataCloudQueryError(200, "NO_ROWS", f"query {self.query_id} returned no rows at offset "
                                      f"{self.offset} of {self.row_count}")
        self.offset += rows
        return True

    def fetch(self, offset: int, left: int | None) -> bytes:
        """One page's raw JSON (decoded by whoever consumes it)."""
        return self.hook._fetch_rows(self.query_id, offset, self.page_rows if left is None else
                                     min(self.page_rows, left))

    def __iter__(self) -> Iterator[list[list[Any]]]:
        """Pages in the caller's thread."""
        while (request := self.next_request()) is not None:
            data = _page_rows(self.fetch(*request))
            if not self.advance(len(data), request[1]):
                return
            yield data


def _page_rows(raw: bytes) -> list[list[Any]]:
    return list(json.loads(raw).get("data") or [])


def _take_rows(holder: list[bytes]) -> list[list[Any]]:
    """Decode a page whose only reference is ``holder[0]``: the bytes are freed before parsing starts."""
    text = holder.pop().decode("utf-8")
    return list(json.loads(text).get("data") or [])


class DataCloudResult(Iterator[tuple]):
    """Rows of one Data Cloud query as tuples (SELECT order); use as a context manager.

    Only one decoded page is held (plus the raw JSON of the next page when prefetching). Closing the result
    before the last row cancels the query on the server (``DELETE .../query-sql/{queryId}``).

    :ivar columns: Column names.
    :ivar types: Data Cloud type names (``Varchar``, ``Numeric``, ``Date``, ``TimestampTZ``, ...).
    :ivar row_count: Total rows of the result (``None`` while unknown).
    :ivar query_id: Server-side query id.
    """

    def __init__(self, hook: DataCloudHook, pages: _Pages, first_rows: list[list[Any]],
                 metadata: list[Mapping[str, Any]], convert: bool, prefetch: bool) -> None:
        self._hook = hook
        self._pages = pages
        self.query_id = pages.query_id
        self.columns: list[str] = [str(m.get("name")) for m in metadata]
        self.types: list[str] = [str(m.get("type") or "") for m in metadata]
        self._convert = row_converter(self.types) if convert else tuple
        self.rows_read = 0
        self._exhausted = False
        self._closed = False
        if pages.row_limit is not None:
            first_rows = first_rows[: pages.row_limit]
        self._rows: Iterator[tuple] = iter(map(self._convert, first_rows))
        self._page_iter = self._prefetched() if prefetch else iter(pages)
        self._queue: queue.Queue[Any] | None = None
        self._counts: queue.Queue[int | None] | None = None
        self._thread: threading.Thread | None = None
        self._finalizer = weakref.finalize(self, pages.stop.set)

    @property
    def row_count(self) -> int | None:
        total = self._pages.row_count
        if total is not None and self._pages.row_limit is not None and self._pages.done:
            total = min(total, self._pages.row_limit)
        return total

    # -- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self) -> DataCloudResult:
        return self

    def __next__(self) -> tuple:
        while True:
            row = next(self._rows, _SENTINEL_END)
            if row is not _SENTINEL_END:
                self.rows_read += 1
                return row  # type: ignore[return-value]
            if self._closed:
                raise StopIteration
            self._rows = iter(())  # let the consumed page go before the next one is decoded
            try:
                page = next(self._page_iter)
            except StopIteration:
                self._exhausted = True
                self.close()
                raise
            except BaseException:
                self.close()
                raise
            self._rows = iter(map(self._convert, page))

    def _prefetched(self) -> Iterator[list[list[Any]]]:
        """Pages downloaded one ahead in a thread while this one is consumed.

        The thread holds the next page as raw JSON only; it is decoded here, when taken, and its row count
        (which the next request's offset needs) is handed back. So at most one decoded page and one raw page
        exist at a time, however large the result.
        """
        self._queue = q = queue.Queue()
        counts: queue.Queue[int | None] = queue.Queue()
        self._counts = counts
        pages = self._pages

        def run() -> None:
            try:
                while (request := pages.next_request()) is not None:
                    q.put((pages.fetch(*request), request[1]))
                    while True:  # wait for the consumer to decode it: its row count moves the offset
                        try:
                            rows = counts.get(timeout=0.5)
                            break
                        except queue.Empty:
                            if pages.stop.is_set():
                                return
                    if rows is None or not pages.advance(rows, request[1]):
                        break
                q.put(_SENTINEL_END)
            except BaseException as exc:
                q.put(exc)

        self._thread = threading.Thread(target=run, name=f"datacloud-prefetch-{self.query_id[:12]}", daemon=True)
        self._thread.start()
        while True:
            item = q.get()
            if item is _SENTINEL_END:
                return
            if isinstance(item, BaseException):
                raise item
            holder = [item[0]]
            del item
            try:
                data = _take_rows(holder)
            except ValueError:
                counts.put(None)
                raise
            counts.put(len(data))  # the thread fetches the next page while this one is consumed
            if not data:
                continue
            yield data
            del data

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading; cancel the query on the server unless every row was read."""
        if self._closed:
            return
        self._closed = True
        self._pages.stop.set()
        if self._queue is not None:  # drop a page fetched ahead
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        if self._counts is not None:  # release a prefetcher waiting for a row count
            self._counts.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._rows = iter(())
        total = self._pages.row_count
        # Complete = the server has nothing left for us (a row_limit stop leaves rows behind: cancel those).
        complete = (self._pages.done and total is not None and self._pages.offset >= total) or \
            (self._exhausted and total is None)
        if not complete:
            self._hook.cancel(self.query_id)

    def __enter__(self) -> DataCloudResult:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# -- hook --------------------------------------------------------------------------------------------------------
class DataCloudHook(BaseHook):
    """
    Run SQL on Data Cloud through the Query Connect API, on the same ``salesforce`` connection as
    :class:`~sf_datacloud_sync.hooks.salesforce_bulk2.SalesforceBulk2Hook` (core token, core host).

    Extras read in addition to the Salesforce ones: ``dataspace`` (default ``default``) and ``workload_name``
    (shown to Salesforce support).

    :param salesforce_conn_id: Airflow connection id.
    :param salesforce_hook: A Bulk API 2.0 hook whose session (and token) to share.
    :param dataspace: Data space (overrides the connection extra).
    :param prefetch: Read the next page in a background thread while the current one is consumed.
    :param status_wait_ms: Long-poll time per status request (Data Cloud caps it at 10,000).
    :param query_timeout: Seconds to wait for a running query before giving up.
    """

    conn_name_attr = "salesforce_conn_id"
    default_conn_name = "salesforce_default"
    conn_type = "salesforce"
    hook_name = "Salesforce Data Cloud (Query Connect API)"

    def __init__(self, salesforce_conn_id: str = default_conn_name, *,
                 salesforce_hook: SalesforceBulk2Hook | None = None, dataspace: str | None = None,
                 workload_name: str | None = None, prefetch: bool = True, status_wait_ms: int = 10_000,
                 query_timeout: float = 3600.0) -> None:
        super().__init__()
        self.salesforce_conn_id = salesforce_hook.conn_id if salesforce_hook else salesforce_conn_id
        self._salesforce_hook = salesforce_hook
        self._dataspace = dataspace
        self._workload_name = workload_name
        self.prefetch = prefetch
        self.status_wait_ms = max(0, min(int(status_wait_ms), 10_000))
        self.query_timeout = query_timeout

    @cached_property
    def salesforce(self) -> SalesforceBulk2Hook:
        """The Salesforce hook providing auth, session and retries."""
        return self._salesforce_hook or SalesforceBulk2Hook(salesforce_conn_id=self.salesforce_conn_id)

    @property
    def client(self) -> SalesforceClient:
        return self.salesforce.client

    def get_conn(self) -> SalesforceClient:
        return self.client

    def _params(self, **extra: Any) -> dict[str, Any]:
        cfg = self.client.config
        return {"dataspace": self._dataspace or cfg.dataspace,
                "workloadName": self._workload_name or cfg.workload_name, **extra}

    def test_connection(self) -> tuple[bool, str]:
        """Log in and run ``SELECT 1``."""
        try:
            self.scalar("SELECT 1")
        except Exception as exc:
            return False, str(exc)
        return True, "Data Cloud query API reachable"

    # -- public API ----------------------------------------------------------------------------------------------
    def query(self, sql: str, parameters: Mapping[str, Any] | None = None, *, row_limit: int | None = None,
              page_rows: int = 100_000, convert: bool = True) -> DataCloudResult:
        """Submit ``sql`` and return its rows as an iterator of tuples.

        :param sql: Data 360 SQL; placeholders ``:name`` take values from ``parameters``. Quote identifiers.
        :param parameters: Values for the placeholders, sent as typed ``sqlParameters`` (see
            :func:`sql_parameter`), never formatted into the SQL.
        :param row_limit: Stop after this many rows (the rest of the query is cancelled).
        :param page_rows: Rows asked for per request (``rowLimit``); the server may send fewer.
        :param convert: Turn values into Python types by column type (``Decimal``, ``int``, ``date``,
            ``datetime``, ``bool``); ``False`` keeps them as JSON delivered them (strings or numbers).
        """
        if page_rows < 1:
            raise ValueError("page_rows must be at least 1")
        body: dict[str, Any] = {"sql": sql, "rowLimit": page_rows if row_limit is None else
                                max(1, min(page_rows, row_limit))}
        if parameters:
            body["sqlParameters"] = sql_parameters(parameters)
        response = self._call("POST", "ssot/query-sql", None, 0, params=self._params(), json_body=body)
        status = _status_of(response)
        query_id = str(status.get("queryId") or response.get("queryId") or "")
        if not query_id:
            raise DataCloudQueryError(200, "NO_QUERY_ID", "the query-sql response carries no queryId")
        first_rows = list(response.get("data") or [])
        metadata = response.get("metadata") or []
        pages = _Pages(self, query_id, status, len(first_rows), row_limit, page_rows)
        if not metadata:
            # adaptiveTimeout ran out before the schema was known: wait, then read it with the first page.
            try:
                while not pages.done:
                    pages.status = self._poll_status(query_id, 0)
                if pages.wanted() != 0:
                    page = self._call("GET", f"ssot/query-sql/{query_id}/rows", query_id, 0, params=self._params(
                        offset=0, rowLimit=min(page_rows, pages.wanted() or page_rows), omitSchema="false"))
                    metadata = page.get("metadata") or []
                    first_rows = list(page.get("data") or [])
                    pages.offset = len(first_rows)
            except BaseException:
                self.cancel(query_id)  # nobody will read it
                raise
        log.info("Data Cloud query %s: %s rows (%s), first response %d rows", query_id, status.get("rowCount"),
                 status.get("completionStatus"), len(first_rows))
        return DataCloudResult(self, pages, first_rows, metadata, convert, self.prefetch)

    def scalar(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row (``None`` without rows)."""
        with self.query(sql, parameters, row_limit=1) as result:
            row = next(result, None)
        return row[0] if row else None

    def cancel(self, query_id: str) -> None:
        """Cancel a query (best effort: a query that is gone already is fine)."""
        try:
            self.client.send(ApiRequest("DELETE", f"ssot/query-sql/{query_id}", params=self._params(),
                                        ok=(200, 202, 204, 404)))
            log.info("Cancelled Data Cloud query %s", query_id)
        except Exception as exc:
            log.warning("Could not cancel Data Cloud query %s: %s", query_id, exc)

    # -- internals -----------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, query_id: str | None, offset: int, **kwargs: Any) -> Any:
        try:
            return self.client.request_json(method, path, **kwargs)
        except SalesforceApiError as exc:
            raise _translate(exc, query_id, offset) from None

    def _poll_status(self, query_id: str, offset: int) -> dict[str, Any]:
        started = time.monotonic()
        while True:
            body = self._call("GET", f"ssot/query-sql/{query_id}", query_id, offset,
                              params=self._params(waitTimeMs=self.status_wait_ms))
            status = _status_of(body)
            state = str(status.get("completionStatus", "")).lower()
            if state in FAILED_STATES:
                raise DataCloudQueryError(200, "QUERY_FAILED", f"query {query_id} ended "
                                          f"{status.get('completionStatus')}: {status.get('errorMessage') or status}")
            if state in DONE_STATES or time.monotonic() - started > self.query_timeout:
                if state not in DONE_STATES:
                    raise TimeoutError(f"Data Cloud query {query_id} still {status.get('completionStatus')} after "
                                       f"{self.query_timeout:.0f}s")
                return status
            if self.status_wait_ms == 0:
                time.sleep(1.0)

    def _fetch_rows(self, query_id: str, offset: int, limit: int) -> bytes:
        """The raw JSON of one ``/rows`` page (``{"data": [...], "returnedRows": n}``)."""
        try:
            return self.client.send(ApiRequest("GET", f"ssot/query-sql/{query_id}/rows", params=self._params(
                offset=offset, rowLimit=limit, omitSchema="true"))).content
        except SalesforceApiError as exc:
            raise _translate(exc, query_id, offset) from None


def _translate(exc: SalesforceApiError, query_id: str | None, offset: int) -> Exception:
    """Data Cloud's errors as :class:`DataCloudQueryError` / :class:`DataCloudQueryExpired`."""
    message = exc.message
    try:
        details = json.loads(message)
    except ValueError:
        details = None
    if isinstance(details, dict):
        parts = [details.get(k) for k in ("errorMessage", "primaryMessage", "customerDetail", "customerHint")]
        message = " | ".join(str(p) for p in parts if p) or message
    text = f"{exc.error_code} {message}".lower()
    if query_id and (exc.status in (404, 410) or "expired" in text):
        return DataCloudQueryExpired(query_id, offset, f"HTTP {exc.status} {exc.error_code}: {message}")
    if exc.status == 0:
        return exc  # connection trouble keeps its own (retryable) type
    return DataCloudQueryError(exc.status, exc.error_code, message, exc.fields, method=exc.method, url=exc.url,
                               attempts=exc.attempts)

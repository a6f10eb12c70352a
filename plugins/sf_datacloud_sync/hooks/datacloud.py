"""Read Data Cloud rows through Query API v3 (tenant host) or the Query Connect API (``ssot/query-sql``).

The query runs once on the server; rows then come page by page (``/rows?offset=``) until ``rowCount`` is reached.
Each page is downloaded whole into a temporary file and decoded in small blocks as rows are taken, so a result of any
size, in pages of any size, is read with flat memory. The submit response holds only a first slice (the server decides how much), and the query may still be
running when it answers: the hook long-polls the status (``waitTimeMs``) before reading further. Values from data
never enter the SQL text; they travel as typed parameters.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import queue
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cached_property, partial
from typing import IO, Any

import requests
from airflow.sdk import BaseHook

from sf_datacloud_sync.hooks._http import (
    DATACLOUD_QUERY_APIS,
    ApiRequest,
    Credential,
    SalesforceApiError,
    SalesforceAuthError,
    SalesforceClient,
    SalesforceConnectionError,
    TokenGrant,
    _mask,
)
from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
from sf_datacloud_sync.utils.csv_encoder import format_datetime, format_decimal, format_float

log = logging.getLogger(__name__)

# query-sql says "ResultsProduced"/"Finished", v3 "RESULTS_PRODUCED"/"FINISHED" (and "RUNNING_OR_UNSPECIFIED").
DONE_STATES = frozenset({"resultsproduced", "results_produced", "finished"})
FAILED_STATES = frozenset({"failed", "error", "cancelled", "canceled", "aborted"})
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SENTINEL_END = object()
V3_MAX_PAGE_BYTES = 20_000_000  # /rows byteLimit: "Default and maximum is 20 MB (20000000)"
CDP_GRANT = "urn:salesforce:grant-type:external:cdp"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


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


# -- streamed pages ----------------------------------------------------------------------------------------------
# Text decoded per json.loads call (~300 rows of a typical DMO). Measured with 5 paced streams of 2M rows in one
# process: +90 MB of RSS at 64 KB, +112 MB at 256 KB.
BLOCK_CHARS = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
_WHITESPACE = frozenset(" \t\r\n")
_DECODER = json.JSONDecoder()


class _TruncatedPage(ValueError):
    """The body ended (or stopped making sense) before the page's JSON did."""


# A page that stops mid-body is downloaded again.
_BROKEN_BODY = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError, _TruncatedPage)
_RETURNED_ROWS_AT_END = re.compile(rb'"returnedRows"\s*:\s*(\d+)\s*}\s*$')
_MAX_VALUE_CHARS = 32 * BLOCK_CHARS  # a single value (a row) longer than this means the body is not a page


class _JsonText:
    """The text of a JSON body as it downloads: a window that grows at the end and is trimmed at the front."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.last_chars = 0  # length of the last value read

    def more(self) -> bool:
        """Append the next piece of the body; ``False`` once it has all arrived."""
        while not self.eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                text = self._utf8.decode(b"", final=True)
            else:
                text = self._utf8.decode(chunk)
            if text:
                self.buf = self.buf[self.pos:] + text
                self.pos = 0
                return True
        return False

    def peek(self) -> str:
        """The next character that is not whitespace (``""`` at the end of the body)."""
        while True:
            buf, pos = self.buf, self.pos
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            self.pos = pos
            if pos < len(buf):
                return buf[pos]
            if not self.more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c:
            raise _TruncatedPage(f"JSON page ended where {chars!r} was expected")
        if c not in chars:
            raise ValueError(f"malformed JSON page: expected {chars!r}, found {c!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """One JSON value; a value reaching the end of the window may be cut short (``12`` of ``123``): read on."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
                self.last_chars = end - self.pos
            except ValueError as exc:
                if len(self.buf) - self.pos < _MAX_VALUE_CHARS and self.more():
                    continue
                raise _TruncatedPage(f"JSON page: {exc}") from None
            if end == len(self.buf) and self.more():
                continue
            self.pos = end
            return value

    def rows(self, block_chars: int) -> Iterator[list[Any]]:
        """The elements of the array starting here, in blocks of about ``block_chars`` characters.

        A block is cut at the last ``],[`` within ``block_chars`` and decoded by one ``json.loads``. A cut inside a string
        leaves an unterminated string, so that decode fails and the rows are read one at a time instead; rows of
        scalars (all Data Cloud returns) can be cut nowhere else.
        """
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            while len(self.buf) - self.pos < block_chars and self.more():
                pass
            cut = self.buf.rfind("],[", self.pos, self.pos + block_chars)
            if cut > self.pos:
                try:
                    block = json.loads("[" + self.buf[self.pos:cut + 1] + "]")
                except ValueError:
                    block = None
                if block is not None:
                    self.pos = cut + 2
                    yield block
                    continue
            block, chars = [], 0
            while chars < block_chars:
                block.append(self.value())
                chars += self.last_chars
                if self.expect(",]") == "]":
                    yield block
                    return
            yield block


def iter_page_rows(chunks: Iterable[bytes], block_chars: int = BLOCK_CHARS) -> Iterator[list[list[Any]]]:
    """The rows of a ``{"data": [[...], ...], ...}`` page in blocks of about ``block_chars`` characters, read from
    ``chunks`` as they come: a 20 MB page never exists whole in memory, as text or as Python lists. Other members are
    skipped."""
    text = _JsonText(chunks)
    text.expect("{")
    if text.peek() == "}":
        return
    while True:
        key = text.value()
        text.expect(":")
        if key == "data" and text.peek() == "[":
            yield from text.rows(block_chars)
        else:
            text.value()
        if text.expect(",}") == "}":
            return

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
    """Reads the pages of one query; runs in the caller's thread or in a prefetch thread."""

    def __init__(
        self, api: _QueryApi, query_id: str, status: dict[str, Any], offset: int, row_limit: int | None, page_rows: int
    ) -> None:
        self.api = api
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

    def wait(self) -> None:
        """Long-poll the status until the query has finished (unless reading stopped)."""
        if not self.done and not self.stop.is_set():
            self.status = self.api.wait_done(self.query_id, self.offset)

    def pages(self) -> Iterator[tuple[IO[bytes], int, str]]:
        """Pages from the current offset to the end: a temporary file positioned at its start, its row count, and
        where it is (for errors).

        A page is downloaded whole, at full speed, so no connection stays open while rows are consumed at Bulk
        API's pace (pages read at that pace broke off mid-body). Only blocks of decoded rows are ever in memory, whatever the page
        size.
        """
        while True:
            self.wait()
            left = self.wanted()
            if left == 0 or self.stop.is_set():
                return
            spool, rows = self._download(self.offset, self.page_rows if left is None else min(self.page_rows, left))
            if rows == 0:
                spool.close()
                if left is None:  # no rowCount given: an empty page is the end
                    return
                raise DataCloudQueryError(200, "NO_ROWS", f"query {self.query_id} returned no rows at offset "
                                          f"{self.offset} of {self.row_count}")
            where = f"query {self.query_id} at row {self.offset}"
            self.offset += rows
            yield spool, rows, where

    def _download(self, offset: int, limit: int) -> tuple[IO[bytes], int]:
        """One page into a temporary file, and its row count; a body cut off midway (connection reset, truncated
        chunked encoding) is downloaded again, within the client's retry budget."""
        broken = 0
        while True:
            spool = tempfile.TemporaryFile(prefix="datacloud-page-")  # noqa: SIM115 - handed over open
            try:
                rows = self.api.download_page(self.query_id, offset, limit, spool)
                spool.seek(0)
                return spool, rows
            except _BROKEN_BODY as exc:
                spool.close()
                broken += 1
                if broken >= self.api.client.retry.max_attempts:
                    raise SalesforceConnectionError(0, type(exc).__name__, f"the page of query {self.query_id} at "
                                                    f"row {offset} broke off {broken} times: {exc}") from None
                log.warning("Data Cloud page of query %s at row %d broke off (%s: %s); downloading it again",
                            self.query_id, offset, type(exc).__name__, exc)
            except BaseException:
                spool.close()
                raise


def _file_blocks(spool: IO[bytes]) -> Iterator[list[list[Any]]]:
    return iter_page_rows(iter(partial(spool.read, READ_CHUNK_BYTES), b""))


def _page_blocks(spool: IO[bytes], rows: int, where: str) -> Iterator[list[list[Any]]]:
    """The ``rows`` rows of a downloaded page in blocks; the file is closed (and so deleted) at the end."""
    try:
        seen = 0
        for block in _file_blocks(spool):
            seen += len(block)
            yield block
        if seen != rows:  # the next page was asked for after `rows`: rows would be skipped or repeated
            raise DataCloudQueryError(200, "ROW_COUNT_MISMATCH", f"the page of {where} said returnedRows {rows} "
                                      f"but held {seen} rows")
    finally:
        spool.close()


def _blocks_of(pages: Iterable[tuple[IO[bytes], int, str]]) -> Iterator[list[list[Any]]]:
    for page in pages:
        yield from _page_blocks(*page)


class DataCloudResult(Iterator[tuple]):
    """Rows of one Data Cloud query as tuples (SELECT order); use as a context manager.

    Pages wait in temporary files and are decoded in blocks as rows are taken, so memory stays a few blocks per
    query however large the pages are (Query API v3 sends up to 20 MB). Closing the result before the last row
    cancels the query on the server.

    :ivar columns: Column names.
    :ivar types: Data Cloud type names (``Varchar``/``varchar``, ``Numeric``, ``Date``, ``TimestampTZ``, ...).
    :ivar row_count: Total rows of the result (``None`` while unknown).
    :ivar query_id: Server-side query id.
    """

    def __init__(
        self,
        pages: _Pages,
        first_rows: list[list[Any]],
        metadata: list[Mapping[str, Any]],
        convert: bool,
        prefetch: bool,
    ) -> None:
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
        self._blocks = self._prefetched() if prefetch else _blocks_of(pages.pages())
        self._queue: queue.Queue[Any] | None = None
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
            self._rows = iter(())  # let the consumed block go before the next one is decoded
            try:
                block = next(self._blocks)
            except StopIteration:
                self._exhausted = True
                self.close()
                raise
            except BaseException:
                self.close()
                raise
            self._rows = iter(map(self._convert, block))

    def _prefetched(self) -> Iterator[list[list[Any]]]:
        """Pages downloaded in a thread, one ahead of the one being read, and decoded here as rows are taken."""
        self._queue = q = queue.Queue(maxsize=1)
        pages = self._pages

        def put(item: Any) -> bool:
            while not pages.stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            spools = pages.pages()
            try:
                for page in spools:
                    if not put(page):
                        page[0].close()
                        return
                put(_SENTINEL_END)
            except BaseException as exc:
                put(exc)
            finally:
                spools.close()

        self._thread = threading.Thread(target=run, name=f"datacloud-prefetch-{self.query_id[:12]}", daemon=True)
        self._thread.start()
        while True:
            item = q.get()
            if item is _SENTINEL_END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from _page_blocks(*item)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading; cancel the query on the server unless every row was read."""
        if self._closed:
            return
        self._closed = True
        self._pages.stop.set()
        if self._queue is not None:  # drop a page downloaded ahead
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple):
                    item[0].close()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._blocks.close()  # closes the page being read
        self._rows = iter(())
        total = self._pages.row_count
        # Complete = the server has nothing left for us (a row_limit stop leaves rows behind: cancel those).
        complete = (self._pages.done and total is not None and self._pages.offset >= total) or (
            self._exhausted and total is None
        )
        if not complete:
            self._pages.api.cancel(self.query_id)

    def __enter__(self) -> DataCloudResult:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# -- the two query APIs ------------------------------------------------------------------------------------------
@dataclass
class _Submitted:
    query_id: str
    status: dict[str, Any]
    rows: list[list[Any]]
    metadata: list[Mapping[str, Any]]


class _QueryApi:
    """The wire calls of one Data Cloud query API; :class:`DataCloudHook` drives them the same way."""

    name = ""
    credential: Credential | None = None  # None: the Salesforce session, on the core host

    def __init__(self, hook: DataCloudHook) -> None:
        self.hook = hook
        self.client = hook.client

    def submit(self, sql: str, parameters: Mapping[str, Any] | None, first_rows: int) -> _Submitted:
        """Submit ``sql``; the answer holds the first rows (query-sql: at most ``first_rows``; v3: as many as the
        server decides)."""
        raise NotImplementedError

    def status(self, query_id: str, offset: int) -> dict[str, Any]:
        """One status request (long-polled up to the hook's ``status_wait_ms``)."""
        raise NotImplementedError

    def first_page(self, query_id: str, limit: int) -> tuple[list[Mapping[str, Any]], list[list[Any]]]:
        """Metadata and rows from offset 0, for a submit that answered before the schema was known."""
        raise NotImplementedError

    def open_page(self, query_id: str, offset: int, limit: int) -> requests.Response:
        """The streamed response of one page of rows (schema omitted)."""
        raise NotImplementedError

    def cancel(self, query_id: str) -> None:
        raise NotImplementedError

    def download_page(self, query_id: str, offset: int, limit: int, spool: IO[bytes]) -> int:
        """Write the page at ``offset`` to ``spool``; its row count is the ``returnedRows`` that ends it (both APIs
        send it last), else the rows counted in the file."""
        tail = b""
        with self.open_page(query_id, offset, limit) as resp:
            for chunk in resp.iter_content(READ_CHUNK_BYTES):
                spool.write(chunk)
                tail = (tail + chunk)[-64:]
        found = _RETURNED_ROWS_AT_END.search(tail)
        if found:
            return int(found.group(1))
        spool.seek(0)
        return sum(len(block) for block in _file_blocks(spool))

    def wait_done(self, query_id: str, offset: int) -> dict[str, Any]:
        """Long-poll until the query has produced all its rows; raise if it failed or took too long."""
        started = time.monotonic()
        wait_ms = self.hook.status_wait_ms
        while True:
            status = self.status(query_id, offset)
            state = str(status.get("completionStatus", "")).lower()
            if state in FAILED_STATES:
                raise DataCloudQueryError(
                    200,
                    "QUERY_FAILED",
                    f"query {query_id} ended {status.get('completionStatus')}: {status.get('errorMessage') or status}",
                )
            if state in DONE_STATES:
                return status
            if time.monotonic() - started > self.hook.query_timeout:
                raise TimeoutError(
                    f"Data Cloud query {query_id} still {status.get('completionStatus')} after "
                    f"{self.hook.query_timeout:.0f}s"
                )
            if wait_ms == 0:
                time.sleep(1.0)

    def _send(self, query_id: str | None, offset: int, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A request of ``query_id`` (read up to ``offset``), with Data Cloud's errors translated."""
        try:
            return self.client.send(ApiRequest(method, path, credential=self.credential, **kwargs))
        except SalesforceApiError as exc:
            raise _translate(exc, query_id, offset) from None


class _QuerySqlApi(_QueryApi):
    """The Query Connect API (``/services/data/vXX.X/ssot/query-sql``): core host, core token, ~2 MB pages."""

    name = "query-sql"

    def _params(self, **extra: Any) -> dict[str, Any]:
        return self.hook._params(**extra)

    def submit(self, sql: str, parameters: Mapping[str, Any] | None, first_rows: int) -> _Submitted:
        body: dict[str, Any] = {"sql": sql, "rowLimit": first_rows}
        if parameters:
            body["sqlParameters"] = sql_parameters(parameters)
        response = json.loads(
            self._send(None, 0, "POST", "ssot/query-sql", params=self._params(), json_body=body).content
        )
        status = _status_of(response)
        query_id = str(status.get("queryId") or response.get("queryId") or "")
        return _Submitted(query_id, status, list(response.get("data") or []), response.get("metadata") or [])

    def status(self, query_id: str, offset: int) -> dict[str, Any]:
        resp = self._send(
            query_id,
            offset,
            "GET",
            f"ssot/query-sql/{query_id}",
            params=self._params(waitTimeMs=self.hook.status_wait_ms),
        )
        return _status_of(json.loads(resp.content))

    def first_page(self, query_id: str, limit: int) -> tuple[list[Mapping[str, Any]], list[list[Any]]]:
        page = json.loads(
            self._send(
                query_id,
                0,
                "GET",
                f"ssot/query-sql/{query_id}/rows",
                params=self._params(offset=0, rowLimit=limit, omitSchema="false"),
            ).content
        )
        return page.get("metadata") or [], list(page.get("data") or [])

    def open_page(self, query_id: str, offset: int, limit: int) -> requests.Response:
        return self._send(
            query_id,
            offset,
            "GET",
            f"ssot/query-sql/{query_id}/rows",
            stream=True,
            params=self._params(offset=offset, rowLimit=limit, omitSchema="true"),
        )

    def cancel(self, query_id: str) -> None:
        self._send(query_id, 0, "DELETE", f"ssot/query-sql/{query_id}", params=self._params(), ok=(200, 202, 204, 404))


# v3 spells types in lower case ("varchar", "bigint", ...); sqlParameters' names map onto them.
_V3_PARAM_TYPES = {"bool": "boolean"}


class _TenantSession:
    """The Data Cloud (a360) token for the tenant host, from exchanging the core token; renewed when it expires or
    the tenant refuses it (a :class:`~sf_datacloud_sync.hooks._http.Credential` of the client's requests).

    Re-exchanging logs in to Salesforce again first: a core token from the password flow works for one exchange only
    (Salesforce help article 005104785), and a fresh one costs a single request.
    """

    EXPIRY_MARGIN_S = 60.0
    name = "Data Cloud token"

    def __init__(self, client: SalesforceClient, dataspace: str) -> None:
        self.client = client
        self.dataspace = dataspace
        self._lock = threading.Lock()
        self._grant: TokenGrant | None = None
        self._expires_at = 0.0

    def grant(self) -> TokenGrant:
        grant = self._grant
        if grant is None or time.monotonic() > self._expires_at:
            grant = self.renew(grant)
        return grant

    def renew(self, stale: TokenGrant | None) -> TokenGrant:
        with self._lock:
            if self._grant is not None and self._grant is not stale and time.monotonic() < self._expires_at:
                return self._grant  # another thread exchanged meanwhile
            if stale is not None and self.client.can_renew:
                self.client._renew(self.client._current_token())
            self._grant = self._exchange()
            return self._grant

    def _exchange(self) -> TokenGrant:
        form = {
            "grant_type": CDP_GRANT,
            "subject_token": self.client._current_token(),
            "subject_token_type": ACCESS_TOKEN_TYPE,
        }
        if self.dataspace and self.dataspace != "default":
            form["dataspace"] = self.dataspace
        url = f"{self.client.instance_url}/services/a360/token"
        resp = self.client.send(ApiRequest("POST", url, form=form, authenticated=False, ok=(200,)))
        try:
            body = json.loads(resp.content)
            token, host = str(body["access_token"]), str(body["instance_url"]).rstrip("/")
        except (ValueError, KeyError, TypeError):
            raise SalesforceAuthError(
                resp.status_code,
                "INVALID_TOKEN_EXCHANGE",
                f"the Data Cloud token exchange answered without access_token and instance_url: {resp.content[:200]!r}",
                method="POST",
                url=url,
            ) from None
        _mask(token)
        lifetime = _int_or_none(body.get("expires_in")) or 7_200
        self._expires_at = time.monotonic() + max(0.0, lifetime - self.EXPIRY_MARGIN_S)
        base = host if host.startswith("https://") else f"https://{host}"  # Data Cloud returns a bare host name
        log.info("Exchanged the Salesforce session for a Data Cloud token (tenant %s)", base)
        return TokenGrant(token, base)


class _QueryApiV3(_QueryApi):
    """Query API v3 (``/api/v3/query``): tenant host, a360 token, pages of up to 20 MB (``byteLimit``)."""

    name = "v3"

    def __init__(self, hook: DataCloudHook) -> None:
        super().__init__(hook)
        self.credential = self.tenant = _TenantSession(self.client, hook.dataspace)

    def submit(self, sql: str, parameters: Mapping[str, Any] | None, first_rows: int) -> _Submitted:
        body: dict[str, Any] = {"sql": sql, "transferMode": "ADAPTIVE"}
        if parameters:
            body["paramStyle"] = "NAMED"
            body["parameters"] = [
                {**p, "type": _V3_PARAM_TYPES.get(p["type"].lower(), p["type"].lower())}
                for p in sql_parameters(parameters)
            ]
        resp = self._send(None, 0, "POST", "/api/v3/query", json_body=body)
        payload = json.loads(resp.content) if resp.content else {}
        status = _v3_status(resp, payload)
        return _Submitted(str(status.get("queryId") or ""), status, list(payload.get("data") or []),
                          _v3_columns(payload))

    def status(self, query_id: str, offset: int) -> dict[str, Any]:
        resp = self._send(
            query_id, offset, "GET", f"/api/v3/query/{query_id}", params={"waitTimeMs": self.hook.status_wait_ms}
        )
        return _v3_status(resp, json.loads(resp.content) if resp.content else {})

    def first_page(self, query_id: str, limit: int) -> tuple[list[Mapping[str, Any]], list[list[Any]]]:
        page = json.loads(
            self._send(
                query_id,
                0,
                "GET",
                f"/api/v3/query/{query_id}/rows",
                params={"offset": 0, "limit": limit, "omitSchema": "false"},
            ).content
        )
        return _v3_columns(page), list(page.get("data") or [])

    def open_page(self, query_id: str, offset: int, limit: int) -> requests.Response:
        return self._send(
            query_id,
            offset,
            "GET",
            f"/api/v3/query/{query_id}/rows",
            stream=True,
            params={"offset": offset, "limit": limit, "byteLimit": self.hook.page_bytes, "omitSchema": "true"},
        )

    def cancel(self, query_id: str) -> None:
        self._send(query_id, 0, "DELETE", f"/api/v3/query/{query_id}", ok=(200, 202, 204, 404))


def _v3_status(resp: requests.Response, body: Mapping[str, Any]) -> dict[str, Any]:
    """v3 puts the status in the ``x-hyperdb-status`` header (JSON); the status GET may also send it as the body."""
    header = resp.headers.get("x-hyperdb-status")
    if header:
        try:
            status = json.loads(header)
        except ValueError:
            raise DataCloudQueryError(
                resp.status_code, "BAD_STATUS_HEADER", f"x-hyperdb-status is not JSON: {header[:200]!r}"
            ) from None
        if isinstance(status, dict):
            return status
    return _status_of(body)


def _v3_columns(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    metadata = body.get("metadata")
    columns = metadata.get("columns") if isinstance(metadata, Mapping) else metadata
    return list(columns or [])


_QUERY_APIS: dict[str, type[_QueryApi]] = {"query-sql": _QuerySqlApi, "v3": _QueryApiV3}


# -- hook --------------------------------------------------------------------------------------------------------
class DataCloudHook(BaseHook):
    """
    Run SQL on Data Cloud on the same ``salesforce`` connection as
    :class:`~sf_datacloud_sync.hooks.salesforce_bulk2.SalesforceBulk2Hook`.

    Two query APIs, chosen by the connection extra ``datacloud_query_api``:

    * ``v3`` (default): Query API v3 on the tenant host, with a Data Cloud token exchanged for the Salesforce one
      (``/services/a360/token``); pages of up to 20 MB (2M rows in 15 partitions: 30 page requests).
    * ``query-sql``: the Query Connect API on the core host with the Salesforce token; pages of ~2 MB.

    Extras read in addition to the Salesforce ones: ``dataspace`` (default ``default``) and ``workload_name``
    (shown to Salesforce support).

    :param salesforce_conn_id: Airflow connection id.
    :param salesforce_hook: A Bulk API 2.0 hook whose session (and token) to share.
    :param dataspace: Data space (overrides the connection extra).
    :param query_api: ``v3`` or ``query-sql`` (overrides the connection extra).
    :param prefetch: Download the next page in a background thread while the current one is consumed.
    :param status_wait_ms: Long-poll time per status request (Data Cloud caps it at 10,000).
    :param query_timeout: Seconds to wait for a running query before giving up.
    :param page_bytes: ``byteLimit`` of a v3 page (Data Cloud's maximum is 20,000,000).
    """

    conn_name_attr = "salesforce_conn_id"
    default_conn_name = "salesforce_default"
    conn_type = "salesforce"
    hook_name = "Salesforce Data Cloud (Query API)"

    def __init__(
        self,
        salesforce_conn_id: str = default_conn_name,
        *,
        salesforce_hook: SalesforceBulk2Hook | None = None,
        dataspace: str | None = None,
        workload_name: str | None = None,
        query_api: str | None = None,
        prefetch: bool = True,
        status_wait_ms: int = 10_000,
        query_timeout: float = 3600.0,
        page_bytes: int = V3_MAX_PAGE_BYTES,
    ) -> None:
        super().__init__()
        if query_api is not None and query_api not in DATACLOUD_QUERY_APIS:
            raise ValueError(f"query_api must be one of {', '.join(DATACLOUD_QUERY_APIS)}, got {query_api!r}")
        if not 1 <= page_bytes <= V3_MAX_PAGE_BYTES:
            raise ValueError(f"page_bytes must be 1 to {V3_MAX_PAGE_BYTES:,}, got {page_bytes}")
        self.salesforce_conn_id = salesforce_hook.conn_id if salesforce_hook else salesforce_conn_id
        self._salesforce_hook = salesforce_hook
        self._dataspace = dataspace
        self._workload_name = workload_name
        self._query_api = query_api
        self.prefetch = prefetch
        self.status_wait_ms = max(0, min(int(status_wait_ms), 10_000))
        self.query_timeout = query_timeout
        self.page_bytes = page_bytes
        self._api: _QueryApi | None = None
        self._api_lock = threading.Lock()

    @cached_property
    def salesforce(self) -> SalesforceBulk2Hook:
        """The Salesforce hook providing auth, session and retries."""
        return self._salesforce_hook or SalesforceBulk2Hook(salesforce_conn_id=self.salesforce_conn_id)

    @property
    def client(self) -> SalesforceClient:
        return self.salesforce.client

    def get_conn(self) -> SalesforceClient:
        return self.client

    @property
    def dataspace(self) -> str:
        return self._dataspace or self.client.config.dataspace

    @property
    def api(self) -> _QueryApi:
        """The query API in use (``api.name``: ``v3`` or ``query-sql``); one per hook, so one token exchange."""
        if self._api is None:
            with self._api_lock:  # a group's queries are submitted from several threads at once
                if self._api is None:
                    self._api = _QUERY_APIS[self._query_api or self.client.config.datacloud_query_api](self)
        return self._api

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {
            "dataspace": self.dataspace,
            "workloadName": self._workload_name or self.client.config.workload_name,
            **extra,
        }

    def test_connection(self) -> tuple[bool, str]:
        """Log in and run ``SELECT 1``."""
        try:
            self.scalar("SELECT 1")
        except Exception as exc:
            return False, str(exc)
        return True, f"Data Cloud query API ({self.api.name}) reachable"

    # -- public API ----------------------------------------------------------------------------------------------
    def query(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        row_limit: int | None = None,
        page_rows: int = 100_000,
        convert: bool = True,
    ) -> DataCloudResult:
        """Submit ``sql`` and return its rows as an iterator of tuples.

        :param sql: Data 360 SQL; placeholders ``:name`` take values from ``parameters``. Quote identifiers.
        :param parameters: Values for the placeholders, sent as typed parameters (see :func:`sql_parameter`),
            never formatted into the SQL.
        :param row_limit: Stop after this many rows (the rest of the query is cancelled).
        :param page_rows: Rows asked for per request; the server may send fewer (v3: up to ``page_bytes``).
        :param convert: Turn values into Python types by column type (``Decimal``, ``int``, ``date``,
            ``datetime``, ``bool``); ``False`` keeps them as JSON delivered them (strings or numbers).
        """
        if page_rows < 1:
            raise ValueError("page_rows must be at least 1")
        api = self.api
        first_rows = page_rows if row_limit is None else max(1, min(page_rows, row_limit))
        submitted = api.submit(sql, parameters, first_rows)
        query_id = submitted.query_id
        if not query_id:
            raise DataCloudQueryError(200, "NO_QUERY_ID", f"the {api.name} submit response carries no queryId")
        metadata, rows = submitted.metadata, submitted.rows
        pages = _Pages(api, query_id, submitted.status, len(rows), row_limit, page_rows)
        if not metadata:
            # The submit answered before the schema was known: wait, then read it with the first page.
            try:
                pages.wait()
                if pages.wanted() != 0:
                    metadata, rows = api.first_page(query_id, min(page_rows, pages.wanted() or page_rows))
                    pages.offset = len(rows)
            except BaseException:
                self.cancel(query_id)  # nobody will read it
                raise
        log.info(
            "Data Cloud query %s (%s): %s rows (%s), first response %d rows",
            query_id,
            api.name,
            pages.status.get("rowCount"),
            pages.status.get("completionStatus"),
            len(rows),
        )
        return DataCloudResult(pages, rows, metadata, convert, self.prefetch)

    def scalar(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row (``None`` without rows)."""
        with self.query(sql, parameters, row_limit=1) as result:
            row = next(result, None)
        return row[0] if row else None

    def cancel(self, query_id: str) -> None:
        """Cancel a query (best effort: a query that is gone already is fine)."""
        try:
            self.api.cancel(query_id)
            log.info("Cancelled Data Cloud query %s", query_id)
        except Exception as exc:
            log.warning("Could not cancel Data Cloud query %s: %s", query_id, exc)


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

"""DataCloudHook against the emulator's Query Connect API over real HTTPS."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from decimal import Decimal

import pytest
import requests

from sf_datacloud_sync.hooks._http import SalesforceApiError
from sf_datacloud_sync.hooks.datacloud import (
    DataCloudHook,
    DataCloudQueryError,
    DataCloudQueryExpired,
    SqlParam,
    _blocks_of,
    _page_blocks,
    _Pages,
    _QuerySqlApi,
    _status_of,
    _TruncatedPage,
    iter_page_rows,
    row_converter,
    sql_parameter,
)
from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

from .conftest import FAST_RETRY, requests_to

DMO = '"Opportunity_Sync__dlm"'
TRICKY_KEYS = ["O'Brien\"; DROP TABLE x;--", "back\\slash\\'", "ünï 日本 🚀", "x' OR '1'='1", "%_*", "\n\r\t"]


# Where each query API's calls land on the emulator (its request counter keys).
ENDPOINTS = {
    "query-sql": {"submit": "/ssot/query-sql", "cancel": "query-sql/{id}", "rows": "/rows"},
    "v3": {"submit": "/api/v3/query", "cancel": "/api/v3/query/{id}", "rows": "/rows"},
}


@pytest.fixture(params=["query-sql", "v3"])
def dc(request, clean_emulator, sf_default) -> DataCloudHook:
    hook = DataCloudHook(salesforce_hook=SalesforceBulk2Hook(retry=FAST_RETRY), query_api=request.param)
    yield hook
    hook.salesforce.close()


def calls(emulator, dc: DataCloudHook, what: str, method: str) -> int:
    return requests_to(emulator, ENDPOINTS[dc.api.name][what], method)


def small_pages(emulator, dc: DataCloudHook, first_rows: int, page_bytes: int | None = None, **faults) -> None:
    """Cut the first response at ``first_rows`` and pages at ``page_bytes`` (query-sql: the server's cap; v3:
    the ``byteLimit`` the hook asks for)."""
    if page_bytes is not None:
        if dc.api.name == "v3":
            dc.page_bytes = page_bytes
        else:
            faults["dc_page_max_bytes"] = page_bytes
    emulator.set_faults(dc_first_page_max_rows=first_rows, **faults)


def all_keys(dc: DataCloudHook) -> list[str]:
    with dc.query(f'SELECT "ExternalId__c" FROM {DMO} ORDER BY "ExternalId__c"') as r:
        return [row[0] for row in r]


# -- reading ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [True, False])
def test_reads_every_row_across_odd_pages(dc, clean_emulator, prefetch):
    total = dc.scalar(f"SELECT COUNT(*) FROM {DMO}")
    assert total == 2_000
    small_pages(clean_emulator, dc, 37, 7_777)
    cancels = calls(clean_emulator, dc, "cancel", "DELETE")
    dc.prefetch = prefetch
    sql = f'SELECT "Amount__c", "ExternalId__c", "CloseDate__c" FROM {DMO} ORDER BY "ExternalId__c"'
    with dc.query(sql, page_rows=333) as result:
        assert result.columns == ["Amount__c", "ExternalId__c", "CloseDate__c"]  # SELECT order
        assert result.types[0].lower() == "numeric" and result.types[1].lower() == "varchar"
        rows = list(result)
        assert result.row_count == total and result.rows_read == total
    keys = [r[1] for r in rows]
    assert len(set(keys)) == total and keys == sorted(keys)
    assert all(isinstance(r[0], Decimal) or r[0] is None for r in rows)
    pages = calls(clean_emulator, dc, "rows", "GET")
    assert pages > total // 333  # pages cut short of rowLimit by their bytes; every one was followed
    assert calls(clean_emulator, dc, "cancel", "DELETE") == cancels  # read to the end: nothing to cancel


def test_row_limit_and_early_close_cancel_the_query(dc, clean_emulator):
    small_pages(clean_emulator, dc, 50)
    with dc.query(f"SELECT * FROM {DMO}", row_limit=120, page_rows=40) as result:
        rows = list(result)
    assert len(rows) == 120 and all(len(r) == len(result.columns) for r in rows)
    assert calls(clean_emulator, dc, "cancel", "DELETE") == 1

    with dc.query(f"SELECT * FROM {DMO}", page_rows=100) as result:
        first = [next(result) for _ in range(5)]
        query_id = result.query_id
    assert len(first) == 5
    assert calls(clean_emulator, dc, "cancel", "DELETE") == 2
    with pytest.raises((DataCloudQueryError, DataCloudQueryExpired), match="(?i)cancel"):
        dc.api.status(query_id, 5)


def test_expired_query_is_reported_with_its_offset(dc, clean_emulator):
    small_pages(clean_emulator, dc, 100, 20_000)
    dc.prefetch = False
    result = dc.query(f'SELECT * FROM {DMO} ORDER BY "ExternalId__c"', page_rows=100)
    got = [next(result) for _ in range(100)]
    clean_emulator.control("POST", "datacloud/expire", {"queryId": result.query_id})
    received = len(got)
    with pytest.raises(DataCloudQueryExpired) as info:
        for _ in result:  # rows already fetched are still delivered, then the expiry surfaces
            received += 1
    assert info.value.query_id == result.query_id
    assert info.value.offset == received == result.rows_read and 100 <= received < 2_000
    assert result.query_id in str(info.value) and f"{received} rows" in str(info.value)


def test_expiry_by_time_to_live(dc, clean_emulator):
    import time

    small_pages(clean_emulator, dc, 10, dc_result_ttl_s=1)
    dc.prefetch = False
    result = dc.query(f"SELECT * FROM {DMO}", page_rows=10)
    next(result)
    time.sleep(1.2)
    with pytest.raises(DataCloudQueryExpired):
        list(result)


def test_storms_and_session_expiry_while_paging(dc, clean_emulator):
    expected = all_keys(dc)
    small_pages(clean_emulator, dc, 100, 15_000,
                rules=[{"path": ENDPOINTS[dc.api.name]["submit"], "status": 503, "rate": 0.2},
                       {"path": "/rows", "status": 429, "rate": 0.1, "retry_after": 0}])
    with dc.query(f'SELECT "ExternalId__c" FROM {DMO} ORDER BY "ExternalId__c"', page_rows=250) as result:
        keys = []
        for i, row in enumerate(result):
            if i == 700:
                clean_emulator.control("POST", "sessions/expire")
            keys.append(row[0])
    assert keys == expected
    stats = clean_emulator.stats()
    assert sum(stats["faults_injected"].values()) >= 2
    assert requests_to(clean_emulator, "oauth2/token") >= 2


def test_parameters_never_enter_the_sql(dc, clean_emulator):
    count = dc.scalar(f"SELECT COUNT(*) FROM {DMO}")
    for key in TRICKY_KEYS:
        assert dc.scalar(f'SELECT COUNT(*) FROM {DMO} WHERE "ExternalId__c" = :k', {"k": key}) == 0
        assert dc.scalar("SELECT :k AS echo", {"k": key}) == key
    assert dc.scalar(f"SELECT COUNT(*) FROM {DMO}") == count
    keys = all_keys(dc)
    lo, hi = keys[100], keys[200]
    n = dc.scalar(f'SELECT COUNT(*) FROM {DMO} WHERE "ExternalId__c" >= :lo AND "ExternalId__c" < :hi',
                  {"lo": lo, "hi": hi})
    assert n == 100
    amount = dc.scalar(f'SELECT COUNT(*) FROM {DMO} WHERE "Amount__c" > :a', {"a": Decimal("50000.5")})
    assert 0 < amount < count


def test_sql_error_raises_at_once(dc, clean_emulator):
    with pytest.raises(DataCloudQueryError) as info:
        dc.query(f'SELECT "NoSuchColumn__c" FROM {DMO}')
    assert info.value.status == 400 and info.value.attempts == 1
    assert "NoSuchColumn__c" in info.value.message and not info.value.message.startswith("{")
    assert calls(clean_emulator, dc, "submit", "POST") == 1


def test_scalar_without_rows_and_test_connection(dc):
    assert dc.scalar(f"SELECT \"ExternalId__c\" FROM {DMO} WHERE \"ExternalId__c\" = :k", {"k": "nope"}) is None
    ok, message = dc.test_connection()
    assert ok, message


def test_v3_reads_through_the_tenant_with_an_exchanged_token(clean_emulator, sf_default, caplog):
    dc = DataCloudHook(salesforce_hook=SalesforceBulk2Hook(retry=FAST_RETRY))
    assert dc.api.name == "v3"  # the default
    clean_emulator.set_faults(dc_first_page_max_rows=100)
    with dc.query(f'SELECT * FROM {DMO} ORDER BY "ExternalId__c"') as result:
        rows = list(result)
    assert len(rows) == 2_000 and result.types[0].islower()
    assert requests_to(clean_emulator, "/api/v3/query/{id}/rows", "GET") == 1  # the other 1,900 rows: one page
    assert requests_to(clean_emulator, "/ssot/") == 0
    assert dc.scalar("SELECT :b AS b, :n AS n", {"b": True, "n": 2**40}) is True
    assert requests_to(clean_emulator, "a360/token") == 1 and requests_to(clean_emulator, "oauth2/token") == 1

    clean_emulator.control("POST", "sessions/expire")  # both tokens refused: log in again, exchange again
    assert dc.scalar(f"SELECT COUNT(*) FROM {DMO}") == 2_000
    assert requests_to(clean_emulator, "a360/token") == 2 and requests_to(clean_emulator, "oauth2/token") == 2
    token = dc.api.tenant.grant().access_token
    assert token not in caplog.text and dc.client._current_token() not in caplog.text
    dc.salesforce.close()


def test_shares_the_salesforce_session(clean_emulator, sf_default):
    bulk = SalesforceBulk2Hook(retry=FAST_RETRY)
    dc = DataCloudHook(salesforce_hook=bulk)
    assert bulk.query_count("SELECT COUNT() FROM Account") == 50
    assert dc.scalar(f"SELECT COUNT(*) FROM {DMO}") == 2_000
    assert requests_to(clean_emulator, "oauth2/token") == 1


class _Reshaped:
    """A page response whose body was rewritten."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def iter_content(self, size):
        return in_pieces(self.body, size)


def test_counts_and_numbers_as_strings(dc, clean_emulator, monkeypatch):
    """The connector's shapes (rowCount and numbers as strings) are read like the plain ones."""
    api = dc.api
    submit, status, open_page = api.submit, api.status, api.open_page

    def stringify(value):
        if isinstance(value, bool) or value is None:
            return value
        return str(value) if isinstance(value, (int, float)) else value

    def rows_as_strings(rows):
        return [[stringify(v) for v in row] for row in rows]

    def count_as_string(found):
        return {**found, "rowCount": str(found["rowCount"])}

    def submitted(*args):
        got = submit(*args)
        return replace(got, status=count_as_string(got.status), rows=rows_as_strings(got.rows))

    def page_as_strings(*args):
        with open_page(*args) as resp:
            page = json.loads(resp.content)
        return _Reshaped(json.dumps({**page, "data": rows_as_strings(page["data"])}).encode())

    monkeypatch.setattr(api, "submit", submitted)
    monkeypatch.setattr(api, "status", lambda *args: count_as_string(status(*args)))
    monkeypatch.setattr(api, "open_page", page_as_strings)
    small_pages(clean_emulator, dc, 60, 9_000)
    with dc.query(f'SELECT "ExternalId__c", "Amount__c" FROM {DMO} ORDER BY 1', page_rows=500) as result:
        rows = list(result)
    assert len(rows) == 2_000 and result.row_count == 2_000
    assert {type(r[1]) for r in rows} == {Decimal, type(None)}  # "86008.0" strings on every page, converted


# -- units --------------------------------------------------------------------------------------------------------
def test_status_shapes():
    flat = {"queryId": "q", "completionStatus": "Finished", "rowCount": 3}
    assert _status_of(flat) == flat
    assert _status_of({"data": [], "status": flat}) == flat


def test_sql_parameter_types():
    assert sql_parameter("s", "O'Brien") == {"name": "s", "type": "Varchar", "value": "O'Brien"}
    assert sql_parameter("b", True) == {"name": "b", "type": "Bool", "value": "true"}
    assert sql_parameter("i", 2**40) == {"name": "i", "type": "BigInt", "value": "1099511627776"}
    assert sql_parameter("f", 1e20)["value"] == "100000000000000000000"
    assert sql_parameter("d", Decimal("1.50")) == {"name": "d", "type": "Numeric", "value": "1.50"}
    assert sql_parameter("day", dt.date(2025, 1, 2)) == {"name": "day", "type": "Date", "value": "2025-01-02"}
    ts = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert sql_parameter("t", ts) == {"name": "t", "type": "TimestampTZ", "value": "2025-01-02T02:04:05.000Z"}
    assert sql_parameter("x", SqlParam(42, "Varchar")) == {"name": "x", "type": "Varchar", "value": "42"}
    with pytest.raises(TypeError, match="IS NULL"):
        sql_parameter("n", None)
    with pytest.raises(ValueError, match="letters"):
        sql_parameter("bad name; --", "x")
    json.dumps(sql_parameter("s", "ünï"))


def test_row_converter_accepts_strings_and_numbers():
    convert = row_converter(["Varchar", "Numeric", "BigInt", "Bool", "Date", "TimestampTZ", "Double", "Numeric"])
    assert convert(["a", "1.50", "7", "true", "2025-01-02", "2025-01-02T03:04:05.000Z", "2.5", None]) == (
        "a", Decimal("1.50"), 7, True, dt.date(2025, 1, 2), dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC), 2.5,
        None)
    assert convert(["a", 1.5, 7.0, False, "2025-01-02", "2025-01-02 03:04:05+00", 2, 3])[1:4] == (
        Decimal("1.5"), 7, False)


# -- streamed pages -----------------------------------------------------------------------------------------------
PAGE_ROWS = [[f"K'{i}],[\"x", i * 1.5, None, i % 2 == 0, "日本 🚀"] for i in range(3_000)] + [["last", 1, 2]]


def in_pieces(body: bytes, size: int):
    return (body[i:i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_page_rows_decoded_in_blocks(piece, separators):
    """Rows holding "],[" and multi-byte characters, in pieces split anywhere."""
    body = json.dumps({"metadata": {"columns": [{"name": "a]],[["}]}, "data": PAGE_ROWS, "returnedRows": 3_001},
                      ensure_ascii=False, separators=separators).encode()
    blocks = list(iter_page_rows(in_pieces(body, piece), block_chars=4_000))
    assert [row for block in blocks for row in block] == PAGE_ROWS  # the other members are skipped
    assert len(blocks) > 10  # never one block for the whole page


def test_page_rows_edge_shapes():
    assert list(iter_page_rows([b'{"data":[],"returnedRows":0}'])) == []
    assert list(iter_page_rows([b"{}"])) == []
    assert [r for b in iter_page_rows([b'{"returnedRows":1,', b'"data":[[12', b'3]]}']) for r in b] == [[123]]
    for cut in (b'{"data":[[1],[2', b'{"data":[[1],[2]]', b'{"data":[[1],["ab'):
        with pytest.raises(_TruncatedPage):
            list(iter_page_rows(in_pieces(cut, 3)))
    with pytest.raises(ValueError, match="expected"):
        list(iter_page_rows([b'{"data":[[1] [2]]}']))


class _BreakingApi:
    """Serves rows 0..total in pages of ``page`` rows; the first ``breaks`` downloads break off midway."""

    def __init__(self, total: int, page: int, breaks: int) -> None:
        self.total, self.page, self.breaks = total, page, breaks
        self.client = type("C", (), {"retry": type("R", (), {"max_attempts": 3})()})()
        self.reads: list[int] = []

    def download_page(self, query_id, offset, limit, spool):
        self.reads.append(offset)
        rows = [[i] for i in range(offset, min(self.total, offset + min(limit, self.page)))]
        body = json.dumps({"data": rows}).encode()
        if self.breaks:
            self.breaks -= 1
            spool.write(body[:len(body) // 2])
            raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")
        spool.write(body)
        return len(rows)


@pytest.mark.parametrize("returned", ["last", "first", "none"])
def test_a_page_is_counted_by_its_returned_rows_or_by_its_rows(returned, tmp_path):
    rows = [[i, "x"] for i in range(500)]
    page = {"data": rows}
    if returned == "last":
        page["returnedRows"] = 500
    elif returned == "first":
        page = {"returnedRows": 500, **page}
    api = _QuerySqlApi.__new__(_QuerySqlApi)
    api.open_page = lambda *args: _Reshaped(json.dumps(page, indent=1 if returned == "first" else None).encode())
    with open(tmp_path / "page", "w+b") as spool:
        assert api.download_page("q", 0, 1_000, spool) == 500
        spool.seek(0)
        assert [row for block in _page_blocks(spool, 500, "q") for row in block] == rows


def test_a_page_that_holds_other_than_it_says_fails(tmp_path):
    with open(tmp_path / "page", "w+b") as spool:
        spool.write(json.dumps({"data": [[1], [2]], "returnedRows": 3}).encode())
        spool.seek(0)
        with pytest.raises(DataCloudQueryError, match="page of query q at row 7 said returnedRows 3 but held 2"):
            list(_page_blocks(spool, 3, "query q at row 7"))


def test_a_page_broken_off_is_downloaded_again():
    api = _BreakingApi(total=95, page=40, breaks=2)
    pages = _Pages(api, "q", {"completionStatus": "Finished", "rowCount": 95}, 0, None, 1_000)
    assert [row[0] for block in _blocks_of(pages.pages()) for row in block] == list(range(95))
    assert api.reads == [0, 0, 0, 40, 80]

    stubborn = _BreakingApi(total=95, page=40, breaks=5)
    pages = _Pages(stubborn, "q", {"completionStatus": "Finished", "rowCount": 95}, 0, None, 1_000)
    with pytest.raises(SalesforceApiError, match="broke off 3 times"):
        list(pages.pages())

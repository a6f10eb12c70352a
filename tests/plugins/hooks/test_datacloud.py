"""DataCloudHook against the emulator's Query Connect API over real HTTPS."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest

from sf_datacloud_sync.hooks._http import SalesforceApiError
from sf_datacloud_sync.hooks.datacloud import (
    DataCloudHook,
    DataCloudQueryError,
    DataCloudQueryExpired,
    SqlParam,
    _status_of,
    row_converter,
    sql_parameter,
)
from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

from .conftest import FAST_RETRY, requests_to

DMO = '"Opportunity_Sync__dlm"'
TRICKY_KEYS = ["O'Brien\"; DROP TABLE x;--", "back\\slash\\'", "ünï 日本 🚀", "x' OR '1'='1", "%_*", "\n\r\t"]


@pytest.fixture
def dc(clean_emulator, sf_default) -> DataCloudHook:
    hook = DataCloudHook(salesforce_hook=SalesforceBulk2Hook(retry=FAST_RETRY))
    yield hook
    hook.salesforce.close()


def all_keys(dc: DataCloudHook) -> list[str]:
    with dc.query(f'SELECT "ExternalId__c" FROM {DMO} ORDER BY "ExternalId__c"') as r:
        return [row[0] for row in r]


# -- reading ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [True, False])
def test_reads_every_row_across_odd_pages(dc, clean_emulator, prefetch):
    total = dc.scalar(f"SELECT COUNT(*) FROM {DMO}")
    assert total == 2_000
    clean_emulator.set_faults(dc_first_page_max_rows=37, dc_page_max_bytes=7_777)
    cancels = requests_to(clean_emulator, "query-sql/{id}", "DELETE")
    dc.prefetch = prefetch
    sql = f'SELECT "Amount__c", "ExternalId__c", "CloseDate__c" FROM {DMO} ORDER BY "ExternalId__c"'
    with dc.query(sql, page_rows=333) as result:
        assert result.columns == ["Amount__c", "ExternalId__c", "CloseDate__c"]  # SELECT order
        assert result.types[0] == "Numeric" and result.types[1] == "Varchar"
        rows = list(result)
        assert result.row_count == total and result.rows_read == total
    keys = [r[1] for r in rows]
    assert len(set(keys)) == total and keys == sorted(keys)
    assert all(isinstance(r[0], Decimal) or r[0] is None for r in rows)
    pages = requests_to(clean_emulator, "/rows", "GET")
    assert pages > total // 333  # the server cut pages short of rowLimit; every one was followed
    assert requests_to(clean_emulator, "query-sql/{id}", "DELETE") == cancels  # read to the end: nothing to cancel


def test_row_limit_and_early_close_cancel_the_query(dc, clean_emulator):
    clean_emulator.set_faults(dc_first_page_max_rows=50)
    with dc.query(f"SELECT * FROM {DMO}", row_limit=120, page_rows=40) as result:
        rows = list(result)
    assert len(rows) == 120 and all(len(r) == len(result.columns) for r in rows)
    assert requests_to(clean_emulator, "query-sql/{id}", "DELETE") == 1

    with dc.query(f"SELECT * FROM {DMO}", page_rows=100) as result:
        first = [next(result) for _ in range(5)]
        query_id = result.query_id
    assert len(first) == 5
    assert requests_to(clean_emulator, "query-sql/{id}", "DELETE") == 2
    with pytest.raises(SalesforceApiError, match="canceled"):
        dc.client.request_json("GET", f"ssot/query-sql/{query_id}", params={"dataspace": "default"})


def test_expired_query_is_reported_with_its_offset(dc, clean_emulator):
    clean_emulator.set_faults(dc_first_page_max_rows=100, dc_page_max_bytes=20_000)
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

    clean_emulator.set_faults(dc_result_ttl_s=1, dc_first_page_max_rows=10)
    dc.prefetch = False
    result = dc.query(f"SELECT * FROM {DMO}", page_rows=10)
    next(result)
    time.sleep(1.2)
    with pytest.raises(DataCloudQueryExpired):
        list(result)


def test_storms_and_session_expiry_while_paging(dc, clean_emulator):
    expected = all_keys(dc)
    clean_emulator.set_faults(rules=[{"path": "/ssot/query-sql", "status": 503, "rate": 0.2},
                                     {"path": "/rows", "status": 429, "rate": 0.1, "retry_after": 0}],
                              dc_first_page_max_rows=100, dc_page_max_bytes=15_000)
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
    assert requests_to(clean_emulator, "/ssot/query-sql", "POST") == 1


def test_scalar_without_rows_and_test_connection(dc):
    assert dc.scalar(f"SELECT \"ExternalId__c\" FROM {DMO} WHERE \"ExternalId__c\" = :k", {"k": "nope"}) is None
    ok, message = dc.test_connection()
    assert ok, message


def test_shares_the_salesforce_session(clean_emulator, sf_default):
    bulk = SalesforceBulk2Hook(retry=FAST_RETRY)
    dc = DataCloudHook(salesforce_hook=bulk)
    assert bulk.query_count("SELECT COUNT() FROM Account") == 50
    assert dc.scalar(f"SELECT COUNT(*) FROM {DMO}") == 2_000
    assert requests_to(clean_emulator, "oauth2/token") == 1


def test_nested_status_and_numbers_as_strings(dc, clean_emulator, monkeypatch):
    """The connector's shape (status nested, numbers as strings) is read like the flat one."""
    original = dc.client.request_json

    def stringify(value):
        if isinstance(value, bool) or value is None:
            return value
        return str(value) if isinstance(value, (int, float)) else value

    def reshaped(method, path, **kwargs):
        body = original(method, path, **kwargs)
        if isinstance(body, dict):
            if "queryId" in body:  # flat status → nested
                body = {"status": {**body, "rowCount": str(body["rowCount"])}}
            if "status" in body:
                body["status"]["rowCount"] = str(body["status"]["rowCount"])
            if "data" in body:
                body["data"] = [[stringify(v) for v in row] for row in body["data"]]
        return body

    fetch_rows = dc._fetch_rows

    def stringified_rows(query_id, offset, limit):
        page = json.loads(fetch_rows(query_id, offset, limit))
        page["data"] = [[stringify(v) for v in row] for row in page["data"]]
        return json.dumps(page).encode()

    monkeypatch.setattr(dc.client, "request_json", reshaped)
    monkeypatch.setattr(dc, "_fetch_rows", stringified_rows)
    clean_emulator.set_faults(dc_first_page_max_rows=60, dc_page_max_bytes=9_000)
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

"""Data Cloud over real HTTPS: the a360 token exchange, the Query Connect API (query-sql) and Query API v1/v2/v3."""

from __future__ import annotations

import base64
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from emulator.harness import EmulatorProcess
from emulator.profiles import INSTANT
from emulator.schema import DMO_COLUMNS, DMO_NAME
from emulator.state import connect, init_datacloud_db

V = "v63.0"
N_ROWS = 3_000
CDP_GRANT = "urn:salesforce:grant-type:external:cdp"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TRICKY = ["it's", 'say "hi"', "a -- comment", "semi; colon", "x'; DROP TABLE \"Opportunity_Sync__dlm\"; --",
          "'; DELETE FROM \"Opportunity_Sync__dlm\" WHERE ''='", "back\\slash\\", "ünïcödé ✅ 数据 🚀 Straße",
          "line\nbreak\r\n\ttab", ":name and $1 and ?", "%_ wildcards", "unicode\u2028separator"]


def _rows() -> list[tuple]:
    rows = []
    formats = ("OPP-{:010d}", "SF-2019-{:05d}", "opp-x{:07d}", "{:010d}", "Zz-{:04d}")
    for i in range(N_ROWS):
        key = None if i % 997 == 500 else formats[i % 5].format(i * 7919 % 100_003)
        name = TRICKY[i // 7 % len(TRICKY)] if i % 7 == 0 else f"Deal {i} — Ünïcode"
        amount = None if i % 11 == 0 else round(i * 13.37 + 0.01, 2)
        rows.append((key, f"ACC-{i % 40:07d}", name, "Closed Won" if i % 3 else "Prospecting",
                     f"2026-{i % 12 + 1:02d}-{i % 28 + 1:02d}", amount, float(i % 101), "New Customer",
                     None if i % 2 else "Web", "x" * (i % 300), f"2026-01-{i % 28 + 1:02d}T{i % 24:02d}:00:00.000Z"))
    return rows


ROWS = _rows()
NON_NULL_KEYS = sorted(r[0] for r in ROWS if r[0] is not None)


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """A private emulator whose DMO holds :data:`ROWS` (this module changes timing knobs freely)."""
    data_dir = tmp_path_factory.mktemp("datacloud")
    with connect(data_dir / "datacloud.sqlite") as conn:
        init_datacloud_db(conn)
        conn.executemany(f'INSERT INTO "{DMO_NAME}" VALUES ({",".join("?" * len(DMO_COLUMNS))})', ROWS)
        conn.commit()
    with EmulatorProcess(data_dir) as proc:
        yield proc


def _session(emu: EmulatorProcess, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would replace the emulator's CA
    s.verify = emu.ca_bundle
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


@pytest.fixture
def http(emu: EmulatorProcess) -> Iterator[requests.Session]:
    yield _session(emu, emu.access_token())
    # Back to defaults for the next test.
    emu.control("PUT", "profile", {"name": "instant"})


def base(emu: EmulatorProcess) -> str:
    return f"{emu.instance_url}/services/data/{V}/ssot/query-sql"


def submit(http: requests.Session, emu: EmulatorProcess, sql: str, **body: Any) -> dict[str, Any]:
    resp = http.post(base(emu), json={"sql": sql, **body}, params={"dataspace": "default",
                                                                  "workloadName": "pytest"}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


def wait_done(http: requests.Session, emu: EmulatorProcess, query_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        resp = http.get(f"{base(emu)}/{query_id}", params={"waitTimeMs": 10000}, timeout=60)
        assert resp.status_code == 200, resp.text
        status = resp.json()
        if status["completionStatus"] in ("Finished", "ResultsProduced"):
            return status
        assert time.monotonic() < deadline


def read_all(http: requests.Session, emu: EmulatorProcess, sql: str, page: int = 100_000,
             **body: Any) -> tuple[list[list[Any]], list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The official MCP loop: submit, poll the flat status, page ``/rows`` until rowCount."""
    first = submit(http, emu, sql, **body)
    status = first["status"]
    if status["completionStatus"] not in ("Finished", "ResultsProduced"):
        status = wait_done(http, emu, status["queryId"])
    rows = list(first["data"])
    pages = []
    while len(rows) < status["rowCount"]:
        resp = http.get(f"{base(emu)}/{status['queryId']}/rows",
                        params={"offset": len(rows), "rowLimit": page, "omitSchema": "true"}, timeout=60)
        assert resp.status_code == 200, resp.text
        body_ = resp.json()
        assert body_["returnedRows"] == len(body_["data"]) > 0
        assert "metadata" not in body_
        pages.append({"rows": body_["returnedRows"], "bytes": len(resp.content)})
        rows.extend(body_["data"])
    return rows, first["metadata"], status, pages


def sql_error(resp: requests.Response, status: int = 400) -> dict[str, str]:
    """The documented envelope: ``[{"errorCode", "message"}]`` with a JSON ``message`` for SQL errors."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body, list) and len(body) == 1
    assert set(body[0]) == {"errorCode", "message"}
    details = json.loads(body[0]["message"])
    assert set(details) == {"errorMessage", "customerDetail", "customerHint"}
    return details


def expected_sorted() -> list[tuple]:
    return sorted(ROWS, key=lambda r: (r[0] is None, r[0] or ""))


# -- query-sql -----------------------------------------------------------------------------------------------------

def test_page_to_the_end_with_odd_page_sizes(http, emu):
    emu.set_faults(dc_first_page_max_rows=137, dc_page_max_bytes=23_456)
    try:
        rows, meta, status, pages = read_all(http, emu, 'SELECT * FROM "Opportunity_Sync__dlm" '
                                                        'ORDER BY "ExternalId__c"', page=311)
    finally:
        emu.set_faults(dc_first_page_max_rows=INSTANT.dc_first_page_max_rows,
                       dc_page_max_bytes=INSTANT.dc_page_max_bytes)
    assert status["rowCount"] == N_ROWS == len(rows)
    assert [tuple(r) for r in rows] == expected_sorted()  # same values, PostgreSQL order (NULL keys last)
    assert [m["name"] for m in meta] == list(DMO_COLUMNS)
    assert len(pages) > 10
    assert all(p["rows"] <= 311 for p in pages)
    # byte-limited: a page never carries more than the cap of row data (plus the small envelope)
    assert all(p["bytes"] <= 23_456 + 100 or p["rows"] == 1 for p in pages)
    assert any(p["rows"] < 311 for p in pages[:-1])


def test_first_page_is_smaller_than_the_result(http, emu):
    body = submit(http, emu, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" ORDER BY 1')
    assert 0 < body["returnedRows"] == len(body["data"]) <= INSTANT.dc_first_page_max_rows
    assert body["status"]["rowCount"] >= body["returnedRows"]
    done = wait_done(http, emu, body["status"]["queryId"])
    assert done["rowCount"] == N_ROWS > body["returnedRows"]
    assert set(done) == {"queryId", "completionStatus", "progress", "rowCount", "chunkCount", "rowsProcessed",
                         "expirationTime"}  # flat, as the official MCP client reads it
    assert done["progress"] == 1.0 and done["chunkCount"] >= 1 and done["rowsProcessed"] >= N_ROWS
    small = submit(http, emu, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm"', rowLimit=5)
    assert small["returnedRows"] == 5


def test_response_shape_and_types(http, emu):
    body = submit(http, emu, 'SELECT "ExternalId__c", "CloseDate__c", "Amount__c", "LastModifiedDate__c", '
                             'count(*) OVER () AS total FROM "Opportunity_Sync__dlm" '
                             'WHERE "ExternalId__c" IS NOT NULL ORDER BY 1 LIMIT 3')
    assert list(body) == ["data", "metadata", "returnedRows", "status"]
    assert body["metadata"] == [
        {"name": "ExternalId__c", "type": "Varchar", "nullable": True},
        {"name": "CloseDate__c", "type": "Date", "nullable": True},
        {"name": "Amount__c", "type": "Numeric", "nullable": True, "precision": 38, "scale": 18},
        {"name": "LastModifiedDate__c", "type": "TimestampTZ", "nullable": True},
        {"name": "total", "type": "BigInt", "nullable": True},
    ]
    status = body["status"]
    assert status["completionStatus"] == "Finished"
    assert status["rowCount"] == body["returnedRows"] == 3
    assert time.strptime(status["expirationTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    first = next(r for r in expected_sorted())
    assert body["data"][0] == [first[0], first[4], first[5], first[10], len(NON_NULL_KEYS)]
    # numbers are JSON numbers, dates and timestamps ISO strings
    assert all(isinstance(r[2], (int, float)) or r[2] is None for r in body["data"])


def test_adaptive_timeout_zero_returns_no_data(http, emu):
    body = submit(http, emu, 'SELECT "Name__c" FROM "Opportunity_Sync__dlm"', adaptiveTimeout=0)
    assert body["data"] == [] and body["returnedRows"] == 0
    assert body["metadata"] == [{"name": "Name__c", "type": "Varchar", "nullable": True}]
    assert wait_done(http, emu, body["status"]["queryId"])["rowCount"] == N_ROWS


def test_running_then_finished_with_modelled_execution_time(http, emu):
    emu.control("PUT", "profile", {"name": "instant", "dc_execution_s": 1.5})
    t0 = time.monotonic()
    body = submit(http, emu, 'SELECT count(*) FROM "Opportunity_Sync__dlm"', adaptiveTimeout=0)
    assert body["status"]["completionStatus"] == "Running"
    assert body["status"]["rowCount"] == 0 and body["data"] == []
    qid = body["status"]["queryId"]
    quick = http.get(f"{base(emu)}/{qid}", params={"waitTimeMs": 100}, timeout=30).json()
    assert quick["completionStatus"] == "Running" and 0 <= quick["progress"] < 1
    rows = http.get(f"{base(emu)}/{qid}/rows", params={"offset": 0}, timeout=30)
    assert rows.status_code == 200  # a running query's rows: what exists so far (nothing yet), after a long poll
    done = http.get(f"{base(emu)}/{qid}", params={"waitTimeMs": 10000}, timeout=30).json()
    assert done["completionStatus"] == "Finished" and done["rowCount"] == 1
    assert 1.4 < time.monotonic() - t0 < 8
    page = http.get(f"{base(emu)}/{qid}/rows", params={"offset": 0}, timeout=30).json()
    assert page["data"] == [[N_ROWS]] and page["metadata"][0]["type"] == "BigInt"
    # the same SQL again within the TTL is served from the result cache: no execution time
    t1 = time.monotonic()
    again = submit(http, emu, 'SELECT count(*) FROM "Opportunity_Sync__dlm"')
    assert again["status"]["completionStatus"] == "Finished" and time.monotonic() - t1 < 1.0


def test_ntile_boundaries(http, emu):
    rows, meta, _, _ = read_all(http, emu, '''
        SELECT b, MIN(k) AS lo, MAX(k) AS hi, COUNT(*) AS n
        FROM (SELECT "ExternalId__c" AS k, NTILE(8) OVER (ORDER BY "ExternalId__c") AS b
              FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" IS NOT NULL) t
        GROUP BY b ORDER BY b''')
    assert [m["type"] for m in meta] == ["BigInt", "Varchar", "Varchar", "BigInt"]
    n = len(NON_NULL_KEYS)
    sizes = [n // 8 + (1 if i < n % 8 else 0) for i in range(8)]  # NTILE: larger buckets first
    start = 0
    for (_b, lo, hi, count), size in zip(rows, sizes, strict=True):
        assert count == size
        assert (lo, hi) == (NON_NULL_KEYS[start], NON_NULL_KEYS[start + size - 1])
        start += size
    assert [r[0] for r in rows] == list(range(1, 9))


def test_row_number_cut_points_and_percentile_disc(http, emu):
    rows, _, _, _ = read_all(http, emu, '''
        SELECT k FROM (SELECT "ExternalId__c" AS k, ROW_NUMBER() OVER (ORDER BY "ExternalId__c") AS rn
                       FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" IS NOT NULL) t
        WHERE MOD(rn - 1, 500) = 0 ORDER BY k''')
    assert [r[0] for r in rows] == NON_NULL_KEYS[::500]
    rows, meta, _, _ = read_all(http, emu, '''
        SELECT percentile_disc(0.25) WITHIN GROUP (ORDER BY "ExternalId__c") AS p1,
               percentile_disc(0.5) WITHIN GROUP (ORDER BY "ExternalId__c") AS p2
        FROM "Opportunity_Sync__dlm"''')
    n = len(NON_NULL_KEYS)
    assert rows == [[NON_NULL_KEYS[math.ceil(0.25 * n) - 1], NON_NULL_KEYS[math.ceil(0.5 * n) - 1]]]
    assert [m["type"] for m in meta] == ["Varchar", "Varchar"]


@pytest.mark.parametrize("value", TRICKY)
def test_sql_parameters_match_exactly_and_never_inject(http, emu, value):
    rows, _, _, _ = read_all(http, emu, 'SELECT "Name__c", count(*) AS n FROM "Opportunity_Sync__dlm" '
                                        'WHERE "Name__c" = :name GROUP BY 1',
                             sqlParameters=[{"name": "name", "type": "Varchar", "value": value}])
    assert rows == [[value, sum(1 for r in ROWS if r[2] == value)]]
    count = submit(http, emu, 'SELECT count(*) FROM "Opportunity_Sync__dlm"')
    assert count["data"] == [[N_ROWS]]  # nothing was dropped or deleted


def test_typed_parameters_for_partition_ranges(http, emu):
    lo, hi = NON_NULL_KEYS[100], NON_NULL_KEYS[900]
    rows, _, _, _ = read_all(http, emu, '''
        SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm"
        WHERE "ExternalId__c" >= :lo AND "ExternalId__c" < :hi AND "LastModifiedDate__c" >= :since
          AND "CloseDate__c" < :until AND "Probability__c" >= :p
        ORDER BY "ExternalId__c" LIMIT :n''', sqlParameters=[
        {"name": "lo", "type": "Varchar", "value": lo}, {"name": "hi", "type": "Varchar", "value": hi},
        {"name": "since", "type": "TimestampTZ", "value": "2026-01-10T00:00:00+00:00"},
        {"name": "until", "type": "Date", "value": "2026-10-01"},
        {"name": "p", "type": "Numeric", "value": "50"}, {"name": "n", "type": "BigInt", "value": "100000"}])
    expected = sorted(r[0] for r in ROWS if r[0] is not None and lo <= r[0] < hi
                      and r[10] >= "2026-01-10T00:00:00.000Z" and r[4] < "2026-10-01" and r[6] >= 50)
    assert [r[0] for r in rows] == expected


def test_bad_parameter_value_is_a_sql_error(http, emu):
    resp = http.post(base(emu), json={"sql": "SELECT :n", "sqlParameters": [
        {"name": "n", "type": "Integer", "value": "1; DROP TABLE x"}]}, timeout=30)
    assert sql_error(resp)["errorMessage"] == 'invalid input syntax for type integer: "1; DROP TABLE x"'
    resp = http.post(base(emu), json={"sql": "SELECT :missing"}, timeout=30)
    assert "missing" in sql_error(resp)["errorMessage"]


@pytest.mark.parametrize("sql", [
    'DELETE FROM "Opportunity_Sync__dlm"',
    'DROP TABLE "Opportunity_Sync__dlm"',
    'UPDATE "Opportunity_Sync__dlm" SET "Name__c" = \'x\'',
    'INSERT INTO "Opportunity_Sync__dlm"("Name__c") VALUES (\'x\')',
    'WITH t AS (SELECT 1) DELETE FROM "Opportunity_Sync__dlm"',
    'SELECT 1; DELETE FROM "Opportunity_Sync__dlm"',
    "PRAGMA query_only = 0",
    "ATTACH DATABASE 'x.db' AS x",
])
def test_non_select_is_rejected(http, emu, sql):
    details = sql_error(http.post(base(emu), json={"sql": sql}, timeout=30))
    assert "read-only" in details["errorMessage"] or "multiple commands" in details["errorMessage"]
    with sqlite3.connect(f"file:{emu.data_dir / 'datacloud.sqlite'}?mode=ro", uri=True) as conn:
        assert conn.execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone()[0] == N_ROWS


def test_unknown_column_and_table_envelopes(http, emu):
    details = sql_error(http.post(base(emu), json={"sql": 'SELECT "Nope__c" FROM "Opportunity_Sync__dlm"'},
                                  timeout=30))
    assert details["errorMessage"] == 'column "Nope__c" does not exist'
    details = sql_error(http.post(base(emu), json={"sql": 'SELECT "externalid__c" FROM "Opportunity_Sync__dlm"'},
                                  timeout=30))
    assert details["customerHint"] == 'Perhaps you meant to reference the column "ExternalId__c".'
    details = sql_error(http.post(base(emu), json={"sql": 'SELECT * FROM "Missing__dlm"'}, timeout=30))
    assert details["errorMessage"] == 'relation "Missing__dlm" does not exist'
    resp = http.post(base(emu), json={"sql": 'SELECT * FROM "Opportunity_Sync__dlm"'},
                     params={"dataspace": "other"}, timeout=30)
    assert resp.status_code == 400 and resp.json()[0]["errorCode"] == "BAD_REQUEST"
    resp = http.post(base(emu), data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and resp.json()[0]["errorCode"] == "JSON_PARSER_ERROR"


def test_offset_past_the_end_is_out_of_range(http, emu):
    body = submit(http, emu, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" LIMIT 10')
    qid = body["status"]["queryId"]
    resp = http.get(f"{base(emu)}/{qid}/rows", params={"offset": 10}, timeout=30)
    assert "out of range" in sql_error(resp)["errorMessage"].lower()
    assert http.get(f"{base(emu)}/{qid}/rows", params={"offset": 9}, timeout=30).json()["returnedRows"] == 1
    assert http.get(f"{base(emu)}/{qid}/rows", params={"offset": -1}, timeout=30).status_code == 400
    page = http.get(f"{base(emu)}/{qid}/rows", params={"offset": 3, "rowLimit": 4}, timeout=30).json()
    assert page["returnedRows"] == 4 and page["data"] == body["data"][3:7] and "metadata" in page


def test_cancel(http, emu):
    body = submit(http, emu, 'SELECT * FROM "Opportunity_Sync__dlm"', adaptiveTimeout=0)
    qid = body["status"]["queryId"]
    resp = http.delete(f"{base(emu)}/{qid}", timeout=30)
    assert resp.status_code == 204 and resp.content == b""
    assert "canceled" in sql_error(http.get(f"{base(emu)}/{qid}", timeout=30))["errorMessage"]
    assert sql_error(http.get(f"{base(emu)}/{qid}/rows", params={"offset": 0}, timeout=30))
    assert http.delete(f"{base(emu)}/{qid}", timeout=30).status_code == 204  # idempotent
    missing = http.get(f"{base(emu)}/00000000-0000-4000-8000-000000000000", timeout=30)
    assert missing.status_code == 404 and missing.json()[0]["errorCode"] == "NOT_FOUND"


def test_expiry_by_control_route_and_by_ttl(http, emu):
    body = submit(http, emu, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm"')
    qid = wait_done(http, emu, body["status"]["queryId"])["queryId"]
    assert emu.control("POST", "datacloud/expire", {"queryId": qid}) == {"expired": [qid]}
    details = sql_error(http.get(f"{base(emu)}/{qid}/rows", params={"offset": 0}, timeout=30))
    assert "expired" in details["errorMessage"] and "expired query" in details["customerDetail"]
    assert "expired" in sql_error(http.get(f"{base(emu)}/{qid}", timeout=30))["errorMessage"]
    emu.set_faults(dc_result_ttl_s=1)
    try:
        short = submit(http, emu, 'SELECT 1 AS one')
        assert short["status"]["completionStatus"] == "Finished"
        time.sleep(1.2)
        assert "expired" in sql_error(http.get(f"{base(emu)}/{short['status']['queryId']}", timeout=30))[
            "errorMessage"]
    finally:
        emu.set_faults(dc_result_ttl_s=INSTANT.dc_result_ttl_s)
    other = submit(http, emu, "SELECT 2 AS two")["status"]["queryId"]
    assert other in emu.control("POST", "datacloud/expire", {})["expired"]


def test_official_mcp_smoke_query(http, emu):
    # forcedotcom/datacloud-mcp-query's manual test spans several pages.
    rows, meta, status, pages = read_all(http, emu, "SELECT g::text || rpad(1::text,100) as a, g as b "
                                                    "FROM generate_series(1, 40000) g ORDER BY b DESC")
    assert status["rowCount"] == 40_000 and len(pages) >= 1
    assert rows[0] == ["40000" + "1" + " " * 99, 40000] and rows[-1][1] == 1
    assert [r[1] for r in rows] == list(range(40000, 0, -1))
    assert [m["name"] for m in meta] == ["a", "b"]


def test_query_timeout_setting(http, emu):
    body = submit(http, emu, "SELECT count(*) FROM generate_series(1, 5000000) g",
                  querySettings={"query_timeout": "50ms"}, adaptiveTimeout=0)
    qid = body["status"]["queryId"]
    resp = http.get(f"{base(emu)}/{qid}", params={"waitTimeMs": 10000}, timeout=30)
    assert "timeout" in sql_error(resp)["errorMessage"]


def test_auth_required_and_audiences_kept_apart(emu):
    plain = _session(emu)
    resp = plain.post(base(emu), json={"sql": "SELECT 1"}, timeout=30)
    assert resp.status_code == 401
    assert resp.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    assert plain.get(f"{base(emu)}/x/rows", timeout=30).status_code == 401
    dc_token = _exchange(emu, emu.access_token()).json()["access_token"]
    assert _session(emu, dc_token).post(base(emu), json={"sql": "SELECT 1"}, timeout=30).status_code == 401
    tenant = _session(emu, emu.access_token()).post(f"{emu.instance_url}/api/v2/query", json={"sql": "SELECT 1"},
                                                     timeout=30)
    assert tenant.status_code == 401
    assert tenant.json()["message"] == "Authorization header verification failed"
    old = _session(emu, emu.access_token()).post(f"{emu.instance_url}/services/data/v61.0/ssot/query-sql",
                                                 json={"sql": "SELECT 1"}, timeout=30)
    assert old.status_code == 404  # query-sql starts at v62.0


def test_stats_count_queries_pages_and_rows(http, emu):
    before = emu.stats()
    rows, _, _, pages = read_all(http, emu, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm"', page=1000)
    after = emu.stats()
    assert after["dc_queries"] - before.get("dc_queries", 0) == 1
    assert after["dc_rows_served"] - before.get("dc_rows_served", 0) == N_ROWS
    assert after["dc_pages"] - before.get("dc_pages", 0) == len(pages) + 1  # the POST's first chunk counts too
    assert after["requests"]["GET /services/data/vXX.X/ssot/query-sql/{id}/rows"] >= len(pages)


# -- a360 token exchange and the tenant APIs ------------------------------------------------------------------------

def _exchange(emu: EmulatorProcess, core: str, as_query: bool = False) -> requests.Response:
    fields = {"grant_type": CDP_GRANT, "subject_token": core, "subject_token_type": ACCESS}
    s = _session(emu)
    if as_query:  # the Python cdp connector sends them as query parameters with an empty body
        return s.post(f"{emu.instance_url}/services/a360/token", params=fields, timeout=30)
    return s.post(f"{emu.instance_url}/services/a360/token", data=fields, timeout=30)


@pytest.mark.parametrize("as_query", [False, True])
def test_token_exchange(emu, as_query):
    resp = _exchange(emu, emu.access_token(), as_query)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"access_token", "instance_url", "token_type", "issued_token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert body["instance_url"] == f"localhost:{emu.port}"  # a bare host: clients add https://
    assert 0 < body["expires_in"] <= 7200
    payload = body["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["audienceTenantId"].startswith("a360/") and claims["exp"] > time.time()
    # the tenant host answers on the returned address, with the server certificate covering localhost
    tenant = _session(emu, body["access_token"])
    resp = tenant.post(f"https://{body['instance_url']}/api/v2/query", json={"sql": "SELECT 1 AS one"}, timeout=30)
    assert resp.status_code == 200, resp.text


def test_token_exchange_errors(emu):
    s = _session(emu)
    url = f"{emu.instance_url}/services/a360/token"
    resp = s.post(url, data={"grant_type": "password", "subject_token": "x", "subject_token_type": ACCESS},
                  timeout=30)
    assert resp.status_code == 400 and resp.json()["error"] == "unsupported_grant_type"
    resp = s.post(url, data={"grant_type": CDP_GRANT, "subject_token": "bogus", "subject_token_type": ACCESS},
                  timeout=30)
    assert resp.status_code == 401 and set(resp.json()) == {"error", "error_description"}
    resp = s.post(url, data={"grant_type": CDP_GRANT, "subject_token": emu.access_token(),
                             "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}, timeout=30)
    assert resp.status_code == 400


def _tenant(emu: EmulatorProcess) -> tuple[requests.Session, str]:
    body = _exchange(emu, emu.access_token()).json()
    return _session(emu, body["access_token"]), f"https://{body['instance_url']}"


def test_v2_query_paging(emu):
    tenant, url = _tenant(emu)
    resp = tenant.post(f"{url}/api/v2/query", json={"sql": "SELECT n, n * 0.5 AS half FROM generate_series(1, "
                                                           "120000) AS t(n) ORDER BY n"}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"data", "startTime", "endTime", "rowCount", "queryId", "nextBatchId", "done", "metadata"}
    assert body["done"] is False and body["rowCount"] == len(body["data"]) == 49_999
    assert body["metadata"]["n"] == {"type": "BIGINT", "placeInOrder": 0, "typeCode": -5}
    assert body["metadata"]["half"] == {"type": "DECIMAL", "placeInOrder": 1, "typeCode": 3}
    assert body["data"][0] == [1, "0.500000000000000000"]  # decimals as strings, as in the v2 docs
    rows = list(body["data"])
    used = []
    while not body["done"]:
        used.append(body["nextBatchId"])
        body = tenant.get(f"{url}/api/v2/query/{body['nextBatchId']}", timeout=60).json()
        assert body["queryId"] == resp.json()["queryId"]
        rows.extend(body["data"])
    assert body["nextBatchId"] == "" and len(rows) == 120_000
    assert [r[0] for r in rows] == list(range(1, 120_001))
    again = tenant.get(f"{url}/api/v2/query/{used[0]}", timeout=30)  # forward only: a batch id works once
    assert again.status_code == 404 and again.json()["error"] == "Not Found"


def test_v2_dmo_rows_and_errors(emu):
    tenant, url = _tenant(emu)
    body = tenant.post(f"{url}/api/v2/query", json={"sql": 'SELECT "ExternalId__c", "Amount__c", "CloseDate__c" '
                                                           'FROM "Opportunity_Sync__dlm" ORDER BY 1 LIMIT 2'},
                       timeout=30).json()
    first = expected_sorted()[0]
    assert body["done"] is True
    amount = None if first[5] is None else str(Decimal(repr(first[5])).quantize(Decimal("1e-18")))
    assert body["data"][0] == [first[0], amount, first[4]]
    assert body["metadata"]["CloseDate__c"]["type"] == "DATE"
    bad = tenant.post(f"{url}/api/v2/query", json={"sql": 'SELECT "Nope" FROM "Opportunity_Sync__dlm"'},
                      timeout=30)
    assert bad.status_code == 400 and 'column "Nope" does not exist' in bad.json()["message"]


def test_v1_query_limit_offset_orderby(emu):
    tenant, url = _tenant(emu)
    resp = tenant.post(f"{url}/api/v1/query", params={"limit": 3, "offset": 2, "orderby": '"ExternalId__c" ASC'},
                       json={"sql": 'SELECT "ExternalId__c", "Name__c" FROM "Opportunity_Sync__dlm"'}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["rowCount"] == 3 and body["done"] is False
    assert [r["ExternalId__c"] for r in body["data"]] == NON_NULL_KEYS[2:5]
    assert body["metadata"]["Name__c"] == {"type": "VARCHAR", "placeInOrder": 1, "typeCode": 12}
    last = tenant.post(f"{url}/api/v1/query", params={"offset": N_ROWS - 1},
                       json={"sql": 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm"'}, timeout=30).json()
    assert last["rowCount"] == 1 and last["done"] is True


def test_finished_results_survive_a_restart(emu, tmp_path: Path):
    http = _session(emu, emu.access_token())
    body = submit(http, emu, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" ORDER BY 1')
    qid = wait_done(http, emu, body["status"]["queryId"])["queryId"]
    emu.stop()
    emu.start()
    http = _session(emu, emu.access_token())
    page = http.get(f"{base(emu)}/{qid}/rows", params={"offset": 5, "rowLimit": 2}, timeout=30).json()
    assert [r[0] for r in page["data"]] == NON_NULL_KEYS[5:7]
    assert http.get(f"{base(emu)}/{qid}", timeout=30).json()["rowCount"] == N_ROWS


def test_v1_metadata_lists_the_dmo(emu):
    tenant, url = _tenant(emu)
    body = tenant.get(f"{url}/api/v1/metadata", params={"entityType": "DataModelObject"}, timeout=30).json()
    (dmo,) = body["metadata"]
    assert dmo["name"] == DMO_NAME
    assert [f["name"] for f in dmo["fields"]] == list(DMO_COLUMNS)
    assert {"name": "CloseDate__c", "displayName": "CloseDate", "type": "DATE"} in dmo["fields"]
    assert tenant.get(f"{url}/api/v1/metadata", params={"entityName": "Nope__dlm"}, timeout=30).json() == {
        "metadata": []}


# -- Query API v3 on the tenant -------------------------------------------------------------------------------------

V3_ERROR_KEYS = {"timestamp", "error", "message", "path", "tenantId", "internalErrorCode", "details"}
V3_STATUS_KEYS = {"queryId", "completionStatus", "chunkCount", "rowCount", "progress", "expirationTime",
                  "executionStats"}
DMO_SORTED = f'SELECT * FROM "{DMO_NAME}" ORDER BY "ExternalId__c"'


def _v3(emu: EmulatorProcess) -> tuple[requests.Session, str]:
    tenant, url = _tenant(emu)
    return tenant, f"{url}/api/v3/query"


def hyper_status(resp: requests.Response) -> dict[str, Any]:
    status = json.loads(resp.headers["x-hyperdb-status"])
    assert set(status) == V3_STATUS_KEYS
    assert set(status["executionStats"]) == {"wallClockTime", "rowsProcessed"}
    return status


def v3_submit(tenant: requests.Session, url: str, sql: str, **body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    resp = tenant.post(url, json={"sql": sql, **body}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json(), hyper_status(resp)


def v3_wait(tenant: requests.Session, url: str, qid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        resp = tenant.get(f"{url}/{qid}", params={"waitTimeMs": 10000}, timeout=60)
        assert resp.status_code == 200, resp.text
        status = hyper_status(resp)
        assert resp.json() == status  # header and body both
        if status["completionStatus"] in ("FINISHED", "RESULTS_PRODUCED"):
            return status
        assert status["completionStatus"] == "RUNNING_OR_UNSPECIFIED"
        assert time.monotonic() < deadline


def v3_error(resp: requests.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == V3_ERROR_KEYS
    assert body["tenantId"].startswith("a360/") and body["path"].startswith("/api/v3/query")
    assert body["details"]["statusCode"] == status
    return body


def test_v3_adaptive_returns_first_rows_inline(emu):
    tenant, url = _v3(emu)
    body, status = v3_submit(tenant, url, 'SELECT "ExternalId__c", "CloseDate__c", "Amount__c", '
                                          '"LastModifiedDate__c", count(*) OVER () AS total FROM '
                                          '"Opportunity_Sync__dlm" WHERE "ExternalId__c" IS NOT NULL ORDER BY 1 '
                                          'LIMIT 3', settings={"timezone": "Etc/UTC", "language": "de_DE"})
    assert list(body) == ["metadata", "data", "returnedRows"]
    assert body["metadata"] == {"columns": [
        {"name": "ExternalId__c", "type": "varchar", "nullable": True},
        {"name": "CloseDate__c", "type": "date", "nullable": True},
        {"name": "Amount__c", "type": "numeric", "nullable": True, "precision": 38, "scale": 18},
        {"name": "LastModifiedDate__c", "type": "timestamptz", "nullable": True},
        {"name": "total", "type": "bigint", "nullable": True},
    ]}
    first = expected_sorted()[0]
    assert body["returnedRows"] == 3 == len(body["data"])
    assert body["data"][0] == [first[0], first[4], first[5], first[10], len(NON_NULL_KEYS)]
    assert status["completionStatus"] == "FINISHED" and status["rowCount"] == 3 and status["chunkCount"] == 1
    assert status["progress"] == 1.0 and status["executionStats"]["rowsProcessed"] >= 3
    node, suffix = status["queryId"].rsplit("_", 1)
    assert len(suffix) == 8 and int(suffix, 16) >= 0
    assert base64.urlsafe_b64decode(node + "=" * (-len(node) % 4)).decode() == f"127.0.0.1:{emu.port}"
    # a bigger result: only the first chunk comes inline
    body, status = v3_submit(tenant, url, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" ORDER BY 1')
    assert 0 < body["returnedRows"] == len(body["data"]) <= INSTANT.dc_first_page_max_rows < N_ROWS
    assert status["rowCount"] >= body["returnedRows"]
    assert v3_wait(tenant, url, status["queryId"])["rowCount"] == N_ROWS


def test_v3_async_status_long_poll_and_byte_limited_rows(http, emu):
    tenant, url = _v3(emu)
    emu.control("PUT", "profile", {"name": "instant", "dc_execution_s": 0.5})
    body, status = v3_submit(tenant, url, DMO_SORTED + " ", transferMode="ASYNC")
    assert body["data"] == [] and body["returnedRows"] == 0
    assert status["completionStatus"] == "RUNNING_OR_UNSPECIFIED" and status["rowCount"] == 0
    qid = status["queryId"]
    done = v3_wait(tenant, url, qid)
    assert done["rowCount"] == N_ROWS and done["chunkCount"] == 1 and done["progress"] == 1.0
    rows: list[list[Any]] = []
    pages = []
    while len(rows) < done["rowCount"]:
        resp = tenant.get(f"{url}/{qid}/rows", params={"offset": len(rows), "byteLimit": 40_000,
                                                       "omitSchema": "true" if rows else "false"}, timeout=60)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert hyper_status(resp)["queryId"] == qid
        assert ("metadata" in page) == (not rows)
        assert page["returnedRows"] == len(page["data"]) > 0
        pages.append((page["returnedRows"], len(resp.content)))
        rows.extend(page["data"])
    assert len(pages) > 5
    assert all(size <= 40_000 or n == 1 for n, size in pages)  # byteLimit bounds the whole body
    assert [tuple(r) for r in rows] == expected_sorted()
    direct, meta, _, _ = read_all(http, emu, DMO_SORTED)
    assert rows == direct
    limited = tenant.get(f"{url}/{qid}/rows", params={"offset": 10, "limit": 7}, timeout=30).json()
    assert limited["returnedRows"] == 7 and limited["data"] == direct[10:17]
    assert [c["name"] for c in limited["metadata"]["columns"]] == [m["name"] for m in meta]


@pytest.mark.parametrize("style", ["NAMED", "QUESTION_MARK", "DOLLARED"])
@pytest.mark.parametrize("value", ["it's", ":name and $1 and ?"])
def test_v3_parameter_styles(emu, style, value):
    tenant, url = _v3(emu)
    mark = {"NAMED": (":name", ":p"), "QUESTION_MARK": ("?", "?"), "DOLLARED": ("$1", "$2")}[style]
    sql = (f"SELECT \"Name__c\" AS \"who?\", count(*) AS n, '? $1 it''s' AS lit -- a ? and $1 in a comment\n"
           f'FROM "Opportunity_Sync__dlm" WHERE "Name__c" = {mark[0]} AND "Probability__c" >= {mark[1]} '
           "GROUP BY 1")
    params = [{"type": "varchar", "value": value}, {"type": "numeric", "value": "0"}]
    if style == "NAMED":
        params = [{"name": "name", **params[0]}, {"name": "p", **params[1]}]
    body, status = v3_submit(tenant, url, sql, paramStyle=style, parameters=params)
    assert body["data"] == [[value, sum(1 for r in ROWS if r[2] == value), "? $1 it's"]]
    assert [c["name"] for c in body["metadata"]["columns"]] == ["who?", "n", "lit"]
    assert status["completionStatus"] == "FINISHED"


def test_v3_parameter_types_and_count_mismatch(emu):
    tenant, url = _v3(emu)
    lo, hi = NON_NULL_KEYS[100], NON_NULL_KEYS[900]
    body, _ = v3_submit(tenant, url, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" >= $1 '
                                     'AND "ExternalId__c" < $2 AND "LastModifiedDate__c" >= $3 AND "CloseDate__c" < $4 '
                                     'ORDER BY 1 LIMIT $5', paramStyle="DOLLARED", parameters=[
                                         {"type": "varchar", "value": lo}, {"type": "varchar", "value": hi},
                                         {"type": "timestamptz", "value": "2026-01-10T00:00:00+00:00"},
                                         {"type": "date", "value": "2026-10-01"}, {"type": "bigint", "value": "5"}])
    expected = sorted(r[0] for r in ROWS if r[0] is not None and lo <= r[0] < hi
                      and r[10] >= "2026-01-10T00:00:00.000Z" and r[4] < "2026-10-01")[:5]
    assert [r[0] for r in body["data"]] == expected
    body, _ = v3_submit(tenant, url, "SELECT ? AS b, ? AS i", parameters=[{"type": "boolean", "value": "true"},
                                                                          {"type": "integer", "value": "7"}])
    assert body["data"] == [[True, 7]]
    assert [c["type"] for c in body["metadata"]["columns"]] == ["boolean", "integer"]
    err = v3_error(tenant.post(url, json={"sql": "SELECT ? AS a, ? AS b", "parameters": [
        {"type": "varchar", "value": "x"}]}, timeout=30), 400)
    assert err["internalErrorCode"] == "08P01" and "requires 2" in err["message"]
    err = v3_error(tenant.post(url, json={"sql": "SELECT $2 AS a", "paramStyle": "DOLLARED", "parameters": [
        {"type": "varchar", "value": "x"}]}, timeout=30), 400)
    assert err["internalErrorCode"] == "08P01"
    err = v3_error(tenant.post(url, json={"sql": "SELECT ? AS a", "parameters": [
        {"type": "integer", "value": "1; DROP TABLE x"}]}, timeout=30), 400)
    assert err["internalErrorCode"] == "22P02" and "invalid input syntax for type integer" in err["message"]


def test_v3_request_and_sql_errors(emu):
    tenant, url = _v3(emu)
    err = v3_error(tenant.post(url, json={"sql": 'SELECT "Nope__c" FROM "Opportunity_Sync__dlm"'}, timeout=30), 400)
    assert err["message"] == 'column "Nope__c" does not exist' and err["internalErrorCode"] == "42703"
    assert err["path"] == "/api/v3/query" and err["error"] == "Bad Request"
    for bad in ({"sql": "SELECT 1", "transferMode": "SYNC"}, {"sql": "SELECT 1", "paramStyle": "PERCENT"},
                {"sql": "SELECT 1", "queryRowLimit": -1}, {"transferMode": "ASYNC"}, {"sql": ""}):
        v3_error(tenant.post(url, json=bad, timeout=30), 400)
    v3_error(tenant.post(url, data=b"{nope", headers={"Content-Type": "application/json"}, timeout=30), 400)
    missing = v3_error(tenant.get(f"{url}/MTI3LjAuMC4xOjE_00000000", timeout=30), 404)
    assert "not found" in missing["message"]


def test_v3_query_row_limit_caps_the_result(emu):
    tenant, url = _v3(emu)
    body, status = v3_submit(tenant, url, DMO_SORTED, queryRowLimit=5)
    assert body["returnedRows"] == 5 and status["rowCount"] == 5 and status["completionStatus"] == "FINISHED"
    assert [tuple(r) for r in body["data"]] == expected_sorted()[:5]
    body, status = v3_submit(tenant, url, DMO_SORTED, queryRowLimit=2500, transferMode="ASYNC")
    assert v3_wait(tenant, url, status["queryId"])["rowCount"] == 2500
    body, status = v3_submit(tenant, url, DMO_SORTED, queryRowLimit=0)
    assert body["data"] == [] and status["rowCount"] == 0 and status["chunkCount"] == 0
    empty = tenant.get(f"{url}/{status['queryId']}/rows", params={"offset": 0}, timeout=30)
    assert empty.status_code == 200 and empty.json()["returnedRows"] == 0


def test_v3_rows_offset_and_byte_limit_errors(emu):
    tenant, url = _v3(emu)
    _, status = v3_submit(tenant, url, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" LIMIT 10')
    rows = f"{url}/{status['queryId']}/rows"
    err = v3_error(tenant.get(rows, params={"offset": 10}, timeout=30), 400)
    assert "out of range" in err["message"].lower()
    assert tenant.get(rows, params={"offset": 9}, timeout=30).json()["returnedRows"] == 1
    assert "offset" in v3_error(tenant.get(rows, timeout=30), 400)["message"]
    v3_error(tenant.get(rows, params={"offset": -1}, timeout=30), 400)
    err = v3_error(tenant.get(rows, params={"offset": 0, "byteLimit": 20_000_001}, timeout=30), 400)
    assert "byteLimit" in err["message"]
    v3_error(tenant.get(rows, params={"offset": 0, "byteLimit": 0}, timeout=30), 400)
    v3_error(tenant.get(rows, params={"offset": 0, "limit": 0}, timeout=30), 400)
    ok = tenant.get(rows, params={"offset": 0, "byteLimit": 20_000_000, "omitSchema": "true"}, timeout=30)
    assert ok.status_code == 200 and list(ok.json()) == ["data", "returnedRows"] and ok.json()["returnedRows"] == 10
    assert tenant.get(rows, params={"offset": 0, "byteLimit": 1}, timeout=30).json()["returnedRows"] == 1


def test_v3_chunks_stream_with_chunked_encoding(emu):
    tenant, url = _v3(emu)
    total = 210_000
    _, status = v3_submit(tenant, url, f"SELECT n, 'r' || n AS s FROM generate_series(1, {total}) AS t(n) "
                                       "ORDER BY n", transferMode="ASYNC")
    qid = status["queryId"]
    done = v3_wait(tenant, url, qid)
    assert done["rowCount"] == total and done["chunkCount"] == 3
    rows: list[list[Any]] = []
    for chunk in range(done["chunkCount"]):
        resp = tenant.get(f"{url}/{qid}/chunks/{chunk}", params={"omitSchema": "true" if chunk else "false"},
                          timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers.get("transfer-encoding") == "chunked" and "content-length" not in resp.headers
        assert hyper_status(resp)["completionStatus"] == "FINISHED"
        body = resp.json()
        assert ("metadata" in body) == (chunk == 0)
        assert body["returnedRows"] == len(body["data"]) == min(100_000, total - chunk * 100_000)
        rows.extend(body["data"])
    assert rows == [[n, f"r{n}"] for n in range(1, total + 1)]
    v3_error(tenant.get(f"{url}/{qid}/chunks/3", timeout=30), 400)
    v3_error(tenant.get(f"{url}/{qid}/chunks/-1", timeout=30), 400)
    v3_error(tenant.get(f"{url}/{qid}/chunks/x", timeout=30), 400)
    meta = tenant.get(f"{url}/{qid}/metadata", timeout=30)
    assert meta.status_code == 200 and meta.json() == {"metadata": {"columns": [
        {"name": "n", "type": "bigint", "nullable": True}, {"name": "s", "type": "varchar", "nullable": True}]}}


def test_v3_metadata_of_an_async_query(emu):
    tenant, url = _v3(emu)
    _, status = v3_submit(tenant, url, DMO_SORTED, transferMode="ASYNC")
    meta = tenant.get(f"{url}/{status['queryId']}/metadata", timeout=30)
    assert meta.status_code == 200, meta.text
    cols = meta.json()["metadata"]["columns"]
    assert [c["name"] for c in cols] == list(DMO_COLUMNS)
    assert {"name": "Amount__c", "type": "numeric", "nullable": True, "precision": 38, "scale": 18} in cols


def test_v3_delete_is_idempotent_and_ends_the_query(emu):
    tenant, url = _v3(emu)
    _, status = v3_submit(tenant, url, DMO_SORTED, transferMode="ASYNC")
    qid = status["queryId"]
    for _ in range(2):
        resp = tenant.delete(f"{url}/{qid}", timeout=30)
        assert resp.status_code == 204 and resp.content == b""
    err = v3_error(tenant.get(f"{url}/{qid}/rows", params={"offset": 0}, timeout=30), 410)
    assert "canceled" in err["message"]
    assert "canceled" in v3_error(tenant.get(f"{url}/{qid}", timeout=30), 410)["message"]
    v3_error(tenant.get(f"{url}/{qid}/chunks/0", timeout=30), 410)
    assert tenant.delete(f"{url}/MTI3LjAuMC4xOjE_00000000", timeout=30).status_code == 204
    _, status = v3_submit(tenant, url, "SELECT 1 AS one")
    emu.control("POST", "datacloud/expire", {"queryId": status["queryId"]})
    err = v3_error(tenant.get(f"{url}/{status['queryId']}/rows", params={"offset": 0}, timeout=30), 410)
    assert "expired" in err["message"]


def test_v3_requires_the_data_cloud_token(emu):
    tenant, url = _v3(emu)
    for token in (emu.access_token(), None, "bogus"):
        s = _session(emu, token)
        err = v3_error(s.post(url, json={"sql": "SELECT 1"}, timeout=30), 401)
        assert err["message"] == "Authorization header verification failed"
        v3_error(s.get(f"{url}/MTI3LjAuMC4xOjE_00000000", timeout=30), 401)
        v3_error(s.delete(f"{url}/MTI3LjAuMC4xOjE_00000000", timeout=30), 401)
    arrow = tenant.post(url, json={"sql": "SELECT 1"}, headers={"Accept": "application/vnd.apache.arrow.stream"},
                        timeout=30)
    v3_error(arrow, 406)

"""The ingest engine's fast path (untimed profiles) against its chunked path: the same jobs, byte for byte.

Two emulators seeded alike run the same sequence of Bulk API 2.0 jobs: one in the ``instant`` profile (batches are
converted and written column by column, one transaction each) and one in the ``realistic`` profile with time shrunk
a million times (200-row chunks... here 7-row chunks, each its own transaction, the reference implementation). Job
counters, the three result CSVs, the stored records and the failure counters must come out identical.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from emulator.bulk_engine import Engine
from emulator.harness import EmulatorProcess
from emulator.profiles import get_profile

V = "v62.0"
BATCH = 40  # records per internal batch on both sides: duplicates are judged per batch
TIMESTAMPS = {"CreatedDate", "LastModifiedDate", "SystemModstamp"}
OPP_HEADER = ["ExternalId__c", "Name", "StageName", "CloseDate", "Amount", "Probability", "Type", "LeadSource",
              "Description", "Account.ExternalId__c"]


class Client:
    def __init__(self, emu: EmulatorProcess) -> None:
        self.s = requests.Session()
        self.s.verify = emu.ca_bundle
        self.s.trust_env = False
        self.s.headers["Authorization"] = f"Bearer {emu.access_token()}"
        self.base = f"{emu.instance_url}/services/data/{V}/jobs/ingest"

    def run(self, body: bytes, **spec: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
        spec = {"object": "Opportunity", "operation": "upsert", "externalIdFieldName": "ExternalId__c", **spec}
        r = self.s.post(self.base, json=spec)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert self.s.put(f"{self.base}/{job_id}/batches", data=body,
                          headers={"Content-Type": "text/csv"}).status_code == 201
        assert self.s.patch(f"{self.base}/{job_id}", json={"state": "UploadComplete"}).status_code == 200
        for _ in range(3000):
            info = self.s.get(f"{self.base}/{job_id}").json()
            if info["state"] in ("JobComplete", "Failed", "Aborted"):
                break
        else:
            raise AssertionError(f"job {job_id} did not finish: {info}")
        results = {}
        for kind in ("successfulResults", "failedResults", "unprocessedrecords"):
            resp = self.s.get(f"{self.base}/{job_id}/{kind}/")
            assert resp.status_code == 200
            results[kind] = resp.content
        return info, results


def _csv(header: list[str], rows: list[list[str]], delimiter: str = ",", line_ending: str = "\n") -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=line_ending)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _opportunities() -> list[list[str]]:
    """Good rows with awkward values, and every kind of bad row the seed makes (``--bad-rows``), and more."""
    rows = []
    stages = ["Prospecting", "Closed Won", "Closed Lost", "Negotiation/Review"]
    for i in range(160):
        rows.append([f"OPP-{i:05d}", f"Deal {i} – Ünïcödé 株式会社 🚀" if i % 7 == 0 else f"Deal {i}", stages[i % 4],
                     f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}", f"{i * 1234.5678:.4f}" if i % 5 else f"{i}.5",
                     "" if i % 3 else str(i % 101), "New Customer" if i % 2 else "", "Web",
                     ['multi\nline\nnote', 'He said "hi", then left', "", "comma, inside", "#N/A", ""][i % 6],
                     f"ACC-{1 + i % 30:07d}"])
    bad = {
        3: (1, "#N/A"), 11: (1, ""), 19: (1, "x" * 121), 27: (2, "Verbal Commit"), 35: (9, "ACC-MISSING-00001"),
        43: (4, "123456789012345678"), 51: (5, "101"), 59: (5, "-1"), 67: (3, "#N/A"), 75: (3, ""),
        83: (4, "12abc"), 91: (3, "2026/01/01"), 99: (3, "2026-02-30"), 107: (9, "x" * 81), 115: (2, "#N/A"),
        123: (5, "1e2"), 131: (4, "9999999999999999.995"), 139: (6, "Z" * 256),
    }
    for i, (col, value) in bad.items():
        rows[i][col] = value
    rows[20][0] = "OPP-00021"  # a duplicate key inside one batch
    rows[45][0] = "opp-00046"  # a duplicate that differs in case only
    rows[150][0] = "OPP-00002"  # the same key again in a later batch: an update there
    rows[100][0] = "#N/A"  # no key
    rows[101][0] = ""
    rows.insert(77, ["OPP-SHORT", "Deal"])  # too few values
    return rows


def _second_pass() -> list[list[str]]:
    """The same keys again (the nightly case): unchanged, changed, emptied (= left alone), nulled; and new keys."""
    rows = []
    for i in range(0, 200, 1):
        key = f"OPP-{i:05d}" if i % 17 else f"opp-{i:05d}"  # case variants match the stored records
        account = f"ACC-{1 + (i if i % 4 else i + 1) % 30:07d}"  # a quarter of the rows move to another Account
        rows.append([key, "" if i % 3 == 0 else f"Deal {i} v2", ["", "Closed Won", "Prospecting"][i % 3],
                     "" if i % 2 else "2027-01-01", ["#N/A", "", "42.42", "0.125"][i % 4],
                     ["", "#N/A", "55"][i % 3], "", "Phone Inquiry" if i % 5 == 0 else "",
                     ["", "new note", "#N/A", "line\nbreak"][i % 4], account])
    rows[30][1] = "#N/A"  # clears a required field: REQUIRED_FIELD_MISSING on update
    rows[31][3] = "#N/A"
    rows[60][2] = "Stalled"
    return rows


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    emus = []
    try:
        for name in ("fast", "chunked"):
            emu = EmulatorProcess(tmp_path_factory.mktemp(name))
            emu.seed(records=0, accounts=30)
            emus.append(emu.start())
        fast, chunked = emus
        # One worker each, so that batches (and the ids they take) come in the same order on both sides.
        fast.control("PUT", "profile", {"name": "instant", "internal_batch_records": BATCH, "org_worker_threads": 1})
        chunked.control("PUT", "profile", {
            "name": "realistic", "time_scale": 1e6, "internal_batch_records": BATCH, "chunk_records": 7,
            "org_worker_threads": 1, "batch_time_limit_s": 1e12, "rest_latency_ms": 0, "upload_mbps": 0,
            "download_mbps": 0})
        yield Client(fast), Client(chunked), fast, chunked
    finally:
        for emu in emus:
            emu.stop()


def _same(pair: tuple, body: bytes, **spec: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    fast, chunked = pair[0], pair[1]
    info_f, results_f = fast.run(body, **spec)
    info_c, results_c = chunked.run(body, **spec)
    for key in ("state", "numberRecordsProcessed", "numberRecordsFailed", "errorMessage", "retries", "operation"):
        assert info_f.get(key) == info_c.get(key), (key, info_f, info_c)
    # The chunked side models 3.6 ms per record (whole ms per chunk); the fast side reports what it took.
    assert info_c["apiActiveProcessingTime"] >= 3 * info_c["numberRecordsProcessed"]
    for kind in results_f:
        assert results_f[kind] == results_c[kind], kind
    return info_f, results_f


def _rows(content: bytes, delimiter: str = ",") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content.decode("utf-8"), newline=""), delimiter=delimiter))


def _table(emu: EmulatorProcess, table: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{emu.data_dir / 'org.sqlite'}?mode=ro", uri=True)
    try:
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")') if r[1] not in TIMESTAMPS]
        quoted = ", ".join(f'"{c}"' for c in cols)
        return conn.execute(f'SELECT rowid, {quoted} FROM "{table}" ORDER BY rowid').fetchall()
    finally:
        conn.close()


def test_fast_path_matches_chunked_path(pair) -> None:
    fast_emu, chunked_emu = pair[2], pair[3]

    # 1. Inserts with bad rows of every kind, duplicates, awkward values.
    info, results = _same(pair, _csv(OPP_HEADER, _opportunities()))
    assert info["state"] == "JobComplete" and info["numberRecordsProcessed"] == 161
    failed = _rows(results["failedResults"])
    codes = {r["sf__Error"].split(":", 1)[0] for r in failed}
    assert codes >= {"REQUIRED_FIELD_MISSING", "STRING_TOO_LONG", "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                     "INVALID_FIELD", "NUMBER_OUTSIDE_VALID_RANGE", "DUPLICATE_VALUE", "MISSING_ARGUMENT"}, codes
    ok = _rows(results["successfulResults"])
    created = {r["ExternalId__c"]: r["sf__Id"] for r in ok if r["sf__Created"] == "true"}
    assert any(r["sf__Created"] == "false" for r in ok)  # OPP-00002 again, in a later batch

    # 2. The stored keys again, all valid: updates only (some Accounts change, empty = unchanged, #N/A = null).
    again = [r for r in _second_pass() if r[0].upper() in created and r[1] != "#N/A" and r[3] != "#N/A"
             and r[2] != "Stalled"]
    _, results = _same(pair, _csv(OPP_HEADER, again))
    assert {r["sf__Created"] for r in _rows(results["successfulResults"])} == {"false"}
    assert results["failedResults"].count(b"\n") == 1

    # 3. The same keys again with new ones and bad values mixed in: updates, inserts and failures in one batch.
    _, results = _same(pair, _csv(OPP_HEADER, _second_pass()))
    assert {r["sf__Created"] for r in _rows(results["successfulResults"])} == {"true", "false"}

    # 4. Insert: existing keys, a key twice in a batch (the unique index decides), case variants, a field that
    #    cannot be written, missing required values.
    header = ["ExternalId__c", "Name", "StageName", "CloseDate", "IsClosed", "AccountId"]
    account = _rows(pair[0].run(_csv(["Name", "ExternalId__c"], [["Acme", "ACC-FP-1"]]), object="Account",
                                operation="insert", externalIdFieldName=None)[1]["successfulResults"])[0]["sf__Id"]
    _rows(pair[1].run(_csv(["Name", "ExternalId__c"], [["Acme", "ACC-FP-1"]]), object="Account", operation="insert",
                      externalIdFieldName=None)[1]["successfulResults"])
    rows = [["DUP-1", "A", "Prospecting", "2026-01-01", "", account], ["dup-1", "B", "Prospecting", "2026-01-01", "",
                                                                       account[:15]],
            ["OPP-00001", "C", "Prospecting", "2026-01-01", "", ""], ["TWICE-1", "D", "Prospecting", "2026-01-01", "", ""],
            ["TWICE-1", "E", "Prospecting", "2026-01-01", "", ""], ["CLOSED-1", "F", "Closed Won", "2026-01-01", "true", ""],
            ["NODATE-1", "G", "Prospecting", "#N/A", "", ""], ["BADACC-1", "H", "Prospecting", "2026-01-01", "",
                                                              "001000000000000AAA"],
            ["BADID-1", "I", "Prospecting", "2026-01-01", "", "not-an-id"]]
    _, results = _same(pair, _csv(header, rows), operation="insert", externalIdFieldName=None)
    errors = {r["ExternalId__c"]: r["sf__Error"] for r in _rows(results["failedResults"])}
    assert errors["OPP-00001"].startswith("DUPLICATE_VALUE:duplicate value found: ExternalId__c duplicates value on")
    assert errors["TWICE-1"].startswith("DUPLICATE_VALUE:duplicate value found: UNIQUE constraint failed")
    assert errors["CLOSED-1"].startswith("INVALID_FIELD_FOR_INSERT_UPDATE")

    # 5. Upsert: a key that matches two records, missing keys, a short row, direct Account ids good and bad.
    rows = [["DUP-1", "X", "Prospecting", "2026-01-01", "", account], ["#N/A", "X", "Prospecting", "2026-01-01", "", ""],
            ["OPP-00005", "Y", "Closed Lost", "2026-01-01", "", account[:15]], ["OPP-00006"],
            ["OPP-00007", "Z", "Prospecting", "2026-01-01", "", "001000000000000AAA"]]
    _, results = _same(pair, _csv(header[:4] + header[5:], [r[:4] + r[5:] if len(r) > 1 else r for r in rows]))
    assert "DUPLICATE_EXTERNAL_ID" in results["failedResults"].decode()

    # 6. Update by Id: 15- and 18-character ids, one record twice with different empty columns (last one wins),
    #    an unknown id, a field that cannot be updated, a required field nulled.
    ids = list(created.values())
    rows = [[ids[0], "U1", "", "7"], [ids[1][:15], "U2", "note", ""], [ids[2], "", "first", "1"],
            [ids[2], "U3 second", "", ""], [ids[2], "", "third", ""], ["006000000000000AAA", "nope", "", ""],
            [ids[3], "#N/A", "", ""], ["", "no id", "", ""], [ids[4], "U5", "", "#N/A"]]
    _same(pair, _csv(["Id", "Name", "Description", "Amount"], rows), operation="update", externalIdFieldName=None)
    rows = [[ids[7], "A", ""], [ids[7], "B", "x"], [ids[8], "C", "y"], [ids[8], "D", ""]]  # one sparse column
    _same(pair, _csv(["Id", "Name", "Description"], rows), operation="update", externalIdFieldName=None)
    _same(pair, _csv(["Id", "IsWon"], [[ids[5], "true"], [ids[6], ""]]), operation="update", externalIdFieldName=None)

    # 7. Accounts, pipe-delimited with CRLF: a key twice in a batch, an existing key, a case variant.
    body = _csv(["Name", "ExternalId__c", "Type"], [["P1", "ACC-PIPE-1", "Prospect"], ["P2", "ACC-PIPE-1", ""],
                                                    ["P3", "ACC-0000001", ""], ["P4", "acc-pipe-2", "Weird"],
                                                    ["P|5", "ACC-PIPE-5", "Other"]], "|", "\r\n")
    _same(pair, body, object="Account", operation="insert", externalIdFieldName=None, columnDelimiter="PIPE",
          lineEnding="CRLF")
    _same(pair, body, object="Account", operation="upsert", columnDelimiter="PIPE", lineEnding="CRLF")

    # 8. Big batches: statements of many rows each on the fast side.
    for emu in (fast_emu, chunked_emu):
        emu.control("PUT", "profile", {"internal_batch_records": 1500})
    rows = [[f"BIG-{i:05d}", f"Big {i}", "Prospecting", "2026-05-05", str(i), "", "", "", "", f"ACC-{1 + i % 30:07d}"]
            for i in range(1234)]
    _same(pair, _csv(OPP_HEADER, rows))
    for row in rows[::3]:
        row[9] = "ACC-0000001"
    _same(pair, _csv(OPP_HEADER, rows))

    for table in ("Opportunity", "Account"):
        assert _table(fast_emu, table) == _table(chunked_emu, table), table
    stats_f, stats_c = fast_emu.stats(), chunked_emu.stats()
    for key in ("bulk_records", "bulk_records_failed", "bulk_batches", "failures_by_code"):
        assert stats_f.get(key) == stats_c.get(key), key


def test_fast_path_only_where_chunks_change_nothing(tmp_path: Path) -> None:
    from emulator.state import Org

    org = Org(tmp_path / "org", get_profile("instant"))
    engine = Engine(org)

    class JobStub:
        operation = "upsert"

    job: Any = JobStub()
    assert engine._fast_path(job)
    for profile in (get_profile("realistic", 1e6), get_profile("instant").with_overrides(lock_contention_rate=0.1),
                    get_profile("instant").with_overrides(fail_job_after_records=10),
                    get_profile("instant").with_overrides(per_record_ms=1.0),
                    get_profile("instant", 1e6)):
        org.profile = profile
        assert not engine._fast_path(job), profile
    org.profile = get_profile("instant")
    job.operation = "delete"
    assert not engine._fast_path(job)


@pytest.mark.parametrize("text", [
    "", "\n", "a,b\n", "a,b", "a,b\n\n\nc,d\n", 'a,"b\nc",d\ne,f\n', 'a,"b\n\nc"\n', '"x""y",z\n', 'a"b,c\n',
    '"a"b,c\n', '"unterminated,x\ny\n', "a,b\r\nc,d\r\n", "a\rb\n", 'x,"cr\r\ninside"\n', "a\x00b,c\n",
    'q,"multi\nline\nnote"\nplain,row\n"last"', ",,\n,\n", 'a,""\n""\n',
    # CRLF inside quoted values (multi-line Descriptions) with LF or CRLF line endings, blank CRLF lines
    'a,"x\r\ny"\nb,c\nd,"e\r\n\r\nf"\n', 'a,b\r\n"c\r\nd",e\r\n\r\nf,g\r\n', '"a\r\n"\r\n"b"', 'a,b\r\n\r\n',
    'x,"q"\r\ny\rz\n', '"a\rb"\r\nc\n', 'a\r\n"b,c\r\nd\r\n', 'a,b\r', '\r\n',
])
def test_parse_records_reads_like_the_csv_module(text: str) -> None:
    from emulator.bulk_engine import parse_records

    for delimiter in (",", "|", "\t"):
        expected = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
        assert parse_records(text, delimiter) == expected


def test_parse_records_reads_like_the_csv_module_at_random() -> None:
    import random

    from emulator.bulk_engine import parse_records

    rng = random.Random(7)
    pieces = ["a", "bc", ",", '"', '""', "\n", "\r\n", "\r", "|", " "]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        for delimiter in (",", "|"):
            try:
                expected = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
            except csv.Error:
                with pytest.raises(csv.Error):
                    parse_records(text, delimiter)
                continue
            assert parse_records(text, delimiter) == expected, (text, delimiter)


def test_number_columns_convert_like_one_value_at_a_time() -> None:
    from emulator.bulk_validation import RowError, _make_converter, _make_fast
    from emulator.schema import get_object

    opportunity = get_object("Opportunity")
    values = ["0", "-0", "1", "100", "101", "99.5", "1.005", "2.675", "0.125", "1e2", "1E-3", ".5", "5.", "+7", "-1",
              "1234567890123456.99", "9999999999999999.995", "00012.50", "3.14159", "42.42"]
    for name in ("Amount", "Probability"):
        f = opportunity.field(name)
        convert, fast = _make_converter(f, 0, name, opportunity), _make_fast(f, opportunity)
        for column in ([v] for v in values):
            try:
                expected = [convert(v) for v in column]
            except RowError:
                expected = None
            got = fast(column * 5)  # repeated values take the one-conversion-per-distinct-value route
            if got is not None:
                assert expected is not None and [repr(x) for x in got] == [repr(x) for x in expected * 5], column
        ok = [v for v in values if _ok(convert, v)]
        assert [repr(x) for x in fast(ok)] == [repr(convert(v)) for v in ok]


def _ok(convert, value: str) -> bool:
    from emulator.bulk_validation import RowError

    try:
        convert(value)
    except RowError:
        return False
    return True


# -- batches sharing a transaction ----------------------------------------------------------------------------------

def _run_jobs(data_dir: Path, bodies: list[bytes], group: bool, fail: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run upsert jobs in-process through one engine (batches of 40 records, all queued before the worker starts
    them); ``group=False`` keeps every batch in a transaction of its own, ``fail=(job, batch)`` makes that batch
    raise whenever it is written. Returns job rows, result CSVs and the stored Opportunities."""
    import hashlib

    from emulator import bulk_ingest
    from emulator.bulk_engine import iter_segments
    from emulator.seed import seed_org
    from emulator.state import Org

    seed_org(data_dir, records=0, accounts=30)
    org = Org(data_dir, get_profile("instant").with_overrides(internal_batch_records=BATCH))
    engine = Engine(org)
    org.bulk_engine = engine  # type: ignore[attr-defined]
    groups: list[int] = []  # batches per group the worker took from the queue
    take_group = engine._take_group

    def counted(first: Any) -> Any:
        tasks = take_group(first) if group else None
        if tasks:
            groups.append(len(tasks))
        return tasks
    engine._take_group = counted  # type: ignore[method-assign]
    job_ids: list[str] = []
    if fail is not None:
        write_fast = engine._write_fast

        def failing(conn: sqlite3.Connection, task: Any) -> Any:
            if task.job.id == job_ids[fail[0]] and task.batch.seq == fail[1]:
                raise RuntimeError("injected failure")
            return write_fast(conn, task)
        engine._write_fast = failing  # type: ignore[method-assign]
    session: Any = type("Session", (), {"user_id": org.credentials.user_id})()
    engine.start()
    with engine.cond:  # hold the worker back until every job is queued
        for body in bodies:
            row = bulk_ingest.insert_job(org, session, "ingest", {
                "operation": "upsert", "object": "Opportunity", "external_id_field": "ExternalId__c",
                "column_delimiter": "COMMA", "line_ending": "LF", "assignment_rule_id": None, "state": "Open",
                "api_version": 62.0})
            (org.jobs_dir / row["id"] / "data.csv").write_bytes(body)
            bulk_ingest._record_upload(org, row["id"], len(body), hashlib.sha256(body).hexdigest())
            job_ids.append(row["id"])
            engine.close(engine.job_row(row["id"]))
    try:
        for _ in range(600):
            rows = [engine.job_row(j) for j in job_ids]
            if all(r["state"] in ("JobComplete", "Failed") and r["finalized"] for r in rows):
                break
            time.sleep(0.05)
        out: dict[str, Any] = {"groups": groups, "jobs": []}
        for r in rows:
            results = {kind: b"".join(iter_segments(engine.result_stream(r, kind)))
                       for kind in ("successfulResults", "failedResults", "unprocessedrecords")}
            out["jobs"].append(({k: r[k] for k in ("state", "error_message", "records_processed", "records_failed")},
                                results))
        conn = sqlite3.connect(f"file:{data_dir / 'org.sqlite'}?mode=ro", uri=True)
        out["records"] = conn.execute('SELECT rowid, "Id", "ExternalId__c", "AccountId", "Name" FROM "Opportunity" '
                                      "ORDER BY rowid").fetchall()
        out["sequence"] = conn.execute("SELECT value FROM sequences WHERE name='Opportunity'").fetchone()
        conn.close()
        return out
    finally:
        engine.stop()


def _group_bodies() -> list[bytes]:
    rows = [r for r in _opportunities() if len(r) == len(OPP_HEADER)]
    return [_csv(OPP_HEADER, rows[:100]), _csv(OPP_HEADER, rows[100:] + rows[:20]), _csv(OPP_HEADER, rows[30:130])]


def test_batches_sharing_a_transaction_end_as_one_by_one(tmp_path: Path) -> None:
    alone = _run_jobs(tmp_path / "alone", _group_bodies(), group=False)
    shared = _run_jobs(tmp_path / "shared", _group_bodies(), group=True)
    assert alone["groups"] == [] and max(shared["groups"]) > 1, shared["groups"]
    assert shared["jobs"] == alone["jobs"]
    assert shared["records"] == alone["records"] and shared["sequence"] == alone["sequence"]
    assert {j[0]["state"] for j in shared["jobs"]} == {"JobComplete"}


def test_a_failing_shared_transaction_runs_its_batches_one_by_one(tmp_path: Path) -> None:
    alone = _run_jobs(tmp_path / "alone", _group_bodies(), group=False, fail=(1, 1))
    shared = _run_jobs(tmp_path / "shared", _group_bodies(), group=True, fail=(1, 1))
    assert max(shared["groups"]) > 1
    states = [j[0]["state"] for j in shared["jobs"]]
    assert states == ["JobComplete", "Failed", "JobComplete"], states
    assert shared["jobs"][1][0]["error_message"] == "Unknown : injected failure"
    assert shared["jobs"] == alone["jobs"]
    assert shared["records"] == alone["records"] and shared["sequence"] == alone["sequence"]

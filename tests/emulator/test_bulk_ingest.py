"""Bulk API 2.0 ingest jobs against the emulator over raw HTTPS: wire shapes, CSV rules, engine behaviour."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from emulator.harness import EmulatorProcess

V = "v62.0"
OPP_HEADER = "ExternalId__c,Name,StageName,CloseDate,Amount,Account.ExternalId__c"


class Bulk:
    """A thin raw-HTTP Bulk API 2.0 client for assertions on exact responses."""

    def __init__(self, emu: EmulatorProcess, token: str | None = None) -> None:
        self.emu = emu
        self.s = requests.Session()
        self.s.verify = emu.ca_bundle
        self.s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace the emulator's CA
        self.s.headers["Authorization"] = f"Bearer {token or emu.access_token()}"
        self.base = f"{emu.instance_url}/services/data/{V}/jobs/ingest"

    def create(self, **spec: Any) -> requests.Response:
        body = {"object": "Opportunity", "operation": "upsert", "externalIdFieldName": "ExternalId__c", **spec}
        return self.s.post(self.base, json=body)

    def upload(self, job_id: str, data: bytes | str) -> requests.Response:
        payload = data.encode() if isinstance(data, str) else data
        return self.s.put(f"{self.base}/{job_id}/batches", data=payload,
                          headers={"Content-Type": "text/csv; charset=UTF-8"})

    def patch(self, job_id: str, state: str) -> requests.Response:
        return self.s.patch(f"{self.base}/{job_id}", json={"state": state})

    def info(self, job_id: str) -> dict[str, Any]:
        r = self.s.get(f"{self.base}/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(job_id)
            if info["state"] in ("JobComplete", "Failed", "Aborted"):
                return info
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} not finished: {info}")

    def run(self, data: bytes | str, **spec: Any) -> tuple[str, dict[str, Any]]:
        r = self.create(**spec)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert self.upload(job_id, data).status_code == 201
        assert self.patch(job_id, "UploadComplete").status_code == 200
        return job_id, self.wait(job_id)

    def result(self, job_id: str, kind: str, delimiter: str = ",") -> list[dict[str, str]]:
        r = self.s.get(f"{self.base}/{job_id}/{kind}/")
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "text/csv"
        return list(csv.DictReader(io.StringIO(r.content.decode("utf-8"), newline=""), delimiter=delimiter))


@pytest.fixture
def bulk(clean_emulator: EmulatorProcess):
    client = Bulk(clean_emulator)
    yield client
    clean_emulator.control("PUT", "profile", {"name": "instant"})


def opportunity(emu: EmulatorProcess, ext_id: str) -> dict[str, Any] | None:
    conn = sqlite3.connect(f"file:{emu.data_dir / 'org.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute('SELECT * FROM "Opportunity" WHERE "ExternalId__c" = ?', (ext_id,)).fetchone()
        return dict(row) if row else None
    finally:
        conn.close()


def account_id(emu: EmulatorProcess, ext_id: str) -> str:
    conn = sqlite3.connect(f"file:{emu.data_dir / 'org.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute('SELECT "Id" FROM "Account" WHERE "ExternalId__c" = ?', (ext_id,)).fetchone()[0]
    finally:
        conn.close()


def rows_csv(n: int, prefix: str = "T", accounts: int = 10, start: int = 0) -> str:
    lines = [OPP_HEADER]
    for i in range(start, start + n):
        lines.append(f"{prefix}-{i:05d},Deal {i},Prospecting,2026-03-01,{i}.5,ACC-{1 + i % accounts:07d}")
    return "\n".join(lines) + "\n"


# -- lifecycle and wire shapes ---------------------------------------------------------------------------------------
def test_lifecycle_over_raw_http(bulk: Bulk) -> None:
    r = bulk.create(lineEnding="LF")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json;charset=UTF-8"
    job = r.json()
    job_id = job["id"]
    assert job_id.startswith("750") and len(job_id) == 18
    assert list(job) == ["id", "operation", "object", "createdById", "createdDate", "systemModstamp", "state",
                         "externalIdFieldName", "concurrencyMode", "contentType", "apiVersion", "contentUrl",
                         "lineEnding", "columnDelimiter"]
    assert job["state"] == "Open" and job["concurrencyMode"] == "Parallel" and job["contentType"] == "CSV"
    assert job["apiVersion"] == 62.0 and '"apiVersion":62.0' in r.text
    assert job["contentUrl"] == f"services/data/{V}/jobs/ingest/{job_id}/batches"
    assert job["createdDate"].endswith(".000+0000")
    info = bulk.info(job_id)
    assert info["jobType"] == "V2Ingest" and "numberRecordsProcessed" not in info and info["retries"] == 0

    up = bulk.upload(job_id, rows_csv(3))
    assert up.status_code == 201 and up.content == b""
    closed = bulk.patch(job_id, "UploadComplete")
    assert closed.status_code == 200
    assert closed.json()["state"] == "UploadComplete" and "contentUrl" not in closed.json()

    done = bulk.wait(job_id)
    assert done["state"] == "JobComplete"
    assert (done["numberRecordsProcessed"], done["numberRecordsFailed"]) == (3, 0)
    for key in ("retries", "totalProcessingTime", "apiActiveProcessingTime", "apexProcessingTime"):
        assert isinstance(done[key], int)
    ok = bulk.result(job_id, "successfulResults")
    assert [r["ExternalId__c"] for r in ok] == ["T-00000", "T-00001", "T-00002"]
    assert all(r["sf__Created"] == "true" and r["sf__Id"].startswith("006") for r in ok)
    assert bulk.result(job_id, "failedResults") == []
    assert bulk.result(job_id, "unprocessedrecords") == []

    listing = bulk.s.get(bulk.base).json()
    assert listing["done"] is True and listing["nextRecordsUrl"] is None
    assert job_id in [j["id"] for j in listing["records"]]

    gone = bulk.s.delete(f"{bulk.base}/{job_id}")
    assert gone.status_code == 204 and gone.content == b""
    missing = bulk.s.get(f"{bulk.base}/{job_id}")
    assert missing.status_code == 404
    assert missing.json() == [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}]


def test_second_upsert_updates_and_reports_created_false(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    first, _ = bulk.run(rows_csv(2))
    ids = {r["ExternalId__c"]: r["sf__Id"] for r in bulk.result(first, "successfulResults")}
    second, info = bulk.run(rows_csv(3))
    assert info["numberRecordsProcessed"] == 3
    rows = {r["ExternalId__c"]: r for r in bulk.result(second, "successfulResults")}
    assert rows["T-00000"]["sf__Created"] == "false" and rows["T-00000"]["sf__Id"] == ids["T-00000"]
    assert rows["T-00002"]["sf__Created"] == "true"
    # Salesforce matches unique external ids case-insensitively.
    third, _ = bulk.run(OPP_HEADER + "\nt-00001,Renamed,Closed Won,2026-03-01,1,ACC-0000001\n")
    row = bulk.result(third, "successfulResults")[0]
    assert (row["sf__Id"], row["sf__Created"]) == (ids["T-00001"], "false")
    stored = opportunity(clean_emulator, "T-00001")
    assert stored["Name"] == "Renamed" and stored["IsClosed"] == 1 and stored["IsWon"] == 1
    assert stored["AccountId"] == account_id(clean_emulator, "ACC-0000001")


def test_create_job_errors(bulk: Bulk) -> None:
    r = bulk.create(object="NoSuchThing__c")
    assert r.status_code == 400
    assert r.json() == [{"message": "InvalidJob : Unable to find object: NoSuchThing__c", "errorCode": "INVALIDJOB"}]
    r = bulk.create(externalIdFieldName="Amount")
    assert r.json() == [{"message": "InvalidJob : Field name provided, Amount does not match an External ID for "
                                    "Opportunity", "errorCode": "INVALIDJOB"}]
    r = bulk.create(externalIdFieldName=None)
    assert r.status_code == 400 and "Field name provided,  does not match" in r.json()[0]["message"]
    r = bulk.create(operation="merge")
    assert r.json() == [{"message": "Invalid value: 'merge' supplied for property: 'operation'",
                         "errorCode": "API_ERROR"}]
    assert bulk.create(lineEnding="CR").json()[0]["errorCode"] == "API_ERROR"
    assert bulk.create(columnDelimiter="COLON").json()[0]["errorCode"] == "API_ERROR"
    assert bulk.create(contentType="JSON").json()[0]["errorCode"] == "API_ERROR"
    bad_json = bulk.s.post(bulk.base, data="{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()[0]["errorCode"] == "JSON_PARSER_ERROR"
    old = bulk.s.post(bulk.base.replace(V, "v40.0"), json={"object": "Account", "operation": "insert"})
    assert old.status_code == 404 and old.json()[0]["errorCode"] == "NOT_FOUND"


def test_invalid_token_is_401_list(clean_emulator: EmulatorProcess) -> None:
    client = Bulk(clean_emulator, token="00Dxx0000000001!bogus")
    r = client.create()
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Token"
    assert r.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    assert client.s.get(client.base).status_code == 401


def test_second_upload_and_upload_to_closed_job(bulk: Bulk) -> None:
    job_id = bulk.create().json()["id"]
    assert bulk.upload(job_id, rows_csv(1)).status_code == 201
    again = bulk.upload(job_id, rows_csv(1))
    assert again.status_code == 400
    assert again.json() == [{
        "message": f"Found multipe contents for job: <{job_id[:15]}>, please 'Close' / 'Abort' / 'Delete' the current "
                   "Job then create a new Job and make sure you only do 'PUT' once on a given Job.",
        "errorCode": "BULK_API_ERROR"}]
    empty = bulk.create().json()["id"]
    assert bulk.patch(empty, "UploadComplete").status_code == 200
    late = bulk.upload(empty, rows_csv(1))
    assert late.status_code == 400 and late.json()[0]["errorCode"] == "INVALIDJOBSTATE"
    # A job closed without data fails as a whole.
    assert bulk.wait(empty)["errorMessage"] == "InvalidBatch : No content for job"


def test_patch_transitions(bulk: Bulk) -> None:
    job_id, _ = bulk.run(rows_csv(1))
    r = bulk.patch(job_id, "Aborted")
    assert r.status_code == 400
    assert r.json() == [{"message": "Aborting already Completed Job not allowed", "errorCode": "INVALIDJOBSTATE"}]
    assert bulk.patch(job_id, "UploadComplete").json()[0]["errorCode"] == "INVALIDJOBSTATE"
    assert bulk.patch(job_id, "Bogus").json()[0]["errorCode"] == "API_ERROR"


def test_abort_open_job_and_delete_rules(bulk: Bulk) -> None:
    job_id = bulk.create().json()["id"]
    assert bulk.upload(job_id, rows_csv(4)).status_code == 201
    denied = bulk.s.delete(f"{bulk.base}/{job_id}")
    assert denied.status_code == 400 and denied.json()[0]["errorCode"] == "INVALIDJOBSTATE"
    r = bulk.patch(job_id, "Aborted")
    assert r.status_code == 200 and r.json()["state"] == "Aborted"
    assert bulk.patch(job_id, "Aborted").json()[0]["message"] == "Aborting already Aborted Job not allowed"
    unprocessed = bulk.result(job_id, "unprocessedrecords")
    assert [r["ExternalId__c"] for r in unprocessed] == ["T-00000", "T-00001", "T-00002", "T-00003"]
    assert bulk.s.delete(f"{bulk.base}/{job_id}/").status_code == 204


def test_result_paths_case_and_slash_variants(bulk: Bulk) -> None:
    job_id, _ = bulk.run(rows_csv(1))
    for path in ("successfulResults", "successfulResults/", "failedResults", "unprocessedrecords",
                 "unprocessedRecords", "unprocessedRecords/"):
        r = bulk.s.get(f"{bulk.base}/{job_id}/{path}")
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/csv", path
    assert bulk.s.get(f"{bulk.base}/{job_id}/").json()["id"] == job_id


# -- CSV rules --------------------------------------------------------------------------------------------------------
AWKWARD = [
    ("Q-1", 'He said "hi", then left', "multi\nline\nnote"),
    ("Q-2", "Ünïcödé — Straße 株式会社 🚀", "crlf\r\ninside"),
    ("Q-3", "comma, inside", "tab\tand ; semicolon"),
]


def _awkward_csv(delimiter: str = ",", line_ending: str = "\n") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=line_ending)
    w.writerow(["ExternalId__c", "Name", "Description", "StageName", "CloseDate", "Account.ExternalId__c"])
    for key, name, desc in AWKWARD:
        w.writerow([key, name, desc, "Prospecting", "2026-01-31", "ACC-0000002"])
    return buf.getvalue()


@pytest.mark.parametrize(("delimiter", "name", "line_ending", "le"), [
    (",", "COMMA", "\n", "LF"), ("|", "PIPE", "\r\n", "CRLF"), ("\t", "TAB", "\n", "LF"), (";", "SEMICOLON", "\n", "LF"),
])
def test_awkward_values_round_trip(bulk: Bulk, clean_emulator: EmulatorProcess, delimiter: str, name: str,
                                   line_ending: str, le: str) -> None:
    job_id, info = bulk.run(_awkward_csv(delimiter, line_ending), columnDelimiter=name, lineEnding=le)
    assert (info["state"], info["numberRecordsProcessed"], info["numberRecordsFailed"]) == ("JobComplete", 3, 0)
    raw = bulk.s.get(f"{bulk.base}/{job_id}/successfulResults").content.decode()
    assert raw.startswith(f'"sf__Id"{delimiter}"sf__Created"{delimiter}ExternalId__c{delimiter}Name')
    ok = bulk.result(job_id, "successfulResults", delimiter)
    assert [(r["ExternalId__c"], r["Name"], r["Description"]) for r in ok] == AWKWARD
    for key, name_value, desc in AWKWARD:
        stored = opportunity(clean_emulator, key)
        assert (stored["Name"], stored["Description"]) == (name_value, desc)


def test_line_ending_mismatch_fails_job(bulk: Bulk) -> None:
    job_id, info = bulk.run(rows_csv(2).replace("\n", "\r\n"), lineEnding="LF")
    assert info["state"] == "Failed"
    assert info["errorMessage"] == "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is LF"
    assert len(bulk.result(job_id, "unprocessedrecords")) == 2
    _, info = bulk.run(rows_csv(2), lineEnding="CRLF")
    assert info["errorMessage"].endswith("Current LineEnding setting is CRLF")


def test_utf8_bom_is_not_stripped(bulk: Bulk) -> None:
    # Decision (see README): like Salesforce's header matching, a BOM stays part of the first column name.
    _, info = bulk.run(b"\xef\xbb\xbf" + rows_csv(1).encode())
    assert info["state"] == "Failed"
    assert info["errorMessage"] == "InvalidBatch : Field name not found : \ufeffExternalId__c"


def test_unknown_column_fails_whole_job(bulk: Bulk) -> None:
    job_id, info = bulk.run(OPP_HEADER + ",ContactId__c\nU-1,Deal,Prospecting,2026-01-01,1,ACC-0000001,x\n")
    assert info["state"] == "Failed"
    assert info["errorMessage"] == "InvalidBatch : Field name not found : ContactId__c"
    assert (info["numberRecordsProcessed"], info["numberRecordsFailed"]) == (0, 0)
    assert [r["ExternalId__c"] for r in bulk.result(job_id, "unprocessedrecords")] == ["U-1"]
    assert bulk.result(job_id, "successfulResults") == []


def test_na_sets_null_and_empty_is_ignored_on_update(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    header = "ExternalId__c,Name,StageName,CloseDate,Amount,Description,LeadSource"
    bulk.run(f"{header}\nN-1,Deal,Prospecting,2026-01-01,100,keep me,Web\n")
    _, info = bulk.run(f"{header}\nN-1,,,,#N/A,,\n")
    assert info["numberRecordsFailed"] == 0
    stored = opportunity(clean_emulator, "N-1")
    assert stored["Amount"] is None and stored["Description"] == "keep me" and stored["Name"] == "Deal"
    job_id, info = bulk.run(f"{header}\nN-1,#N/A,,,,,\n")
    err = bulk.result(job_id, "failedResults")[0]["sf__Error"]
    assert err == "REQUIRED_FIELD_MISSING:Required fields are missing: [Name]:Name --"
    # On insert an empty value leaves the field unset; Probability defaults from the stage.
    bulk.run(f"{header}\nN-2,New,Closed Won,2026-01-01,,,\n")
    new = opportunity(clean_emulator, "N-2")
    assert new["Amount"] is None and new["Probability"] == 100.0 and new["IsWon"] == 1
    assert new["OwnerId"] == new["CreatedById"] and new["CreatedDate"].endswith("+0000")


def test_required_fields_only_on_the_insert_path(bulk: Bulk) -> None:
    bulk.run(rows_csv(1))
    job_id, info = bulk.run("ExternalId__c,Amount\nT-00000,5\nNEW-1,6\n")
    assert (info["numberRecordsProcessed"], info["numberRecordsFailed"]) == (2, 1)
    failed = bulk.result(job_id, "failedResults")
    assert failed == [{"sf__Id": "", "ExternalId__c": "NEW-1", "Amount": "6", "sf__Error":
                       "REQUIRED_FIELD_MISSING:Required fields are missing: [Name, StageName, CloseDate]:"
                       "Name,StageName,CloseDate --"}]


def test_duplicate_external_ids_in_one_job(bulk: Bulk) -> None:
    data = OPP_HEADER + "\nD-1,A,Prospecting,2026-01-01,1,ACC-0000001\nD-2,B,Prospecting,2026-01-01,1,ACC-0000001\n" \
        "d-1,C,Prospecting,2026-01-01,1,ACC-0000001\n"
    job_id, info = bulk.run(data)
    assert info["numberRecordsFailed"] == 2
    errors = sorted(r["sf__Error"] for r in bulk.result(job_id, "failedResults"))
    assert errors == ["DUPLICATE_VALUE:Duplicate external id specified: D-1:--",
                      "DUPLICATE_VALUE:Duplicate external id specified: d-1:--"]
    assert [r["ExternalId__c"] for r in bulk.result(job_id, "successfulResults")] == ["D-2"]


def test_row_level_validation_codes(bulk: Bulk) -> None:
    rows = {
        "V-1": ("x" * 121, "Prospecting", "2026-01-01", "1", "ACC-0000001"),
        "V-2": ("Deal", "Won Big", "2026-01-01", "1", "ACC-0000001"),
        "V-3": ("Deal", "Prospecting", "2026/01/01", "1", "ACC-0000001"),
        "V-4": ("Deal", "Prospecting", "2026-01-01", "12abc", "ACC-0000001"),
        "V-5": ("Deal", "Prospecting", "2026-01-01", "12345678901234567", "ACC-0000001"),
        "V-6": ("Deal", "Prospecting", "2026-01-01", "1", "ACC-MISSING"),
        "V-7": ("Deal", "Prospecting", "2026-01-01", "1", "ACC-0000001"),
    }
    lines = [OPP_HEADER] + [",".join((k, *v)) for k, v in rows.items()]
    job_id, info = bulk.run("\n".join(lines) + "\n")
    assert (info["numberRecordsProcessed"], info["numberRecordsFailed"]) == (7, 6)
    errors = {r["ExternalId__c"]: r["sf__Error"] for r in bulk.result(job_id, "failedResults")}
    assert errors["V-1"] == f"STRING_TOO_LONG:Name: data value too large: {'x' * 121} (max length=120):Name --"
    assert errors["V-2"] == ("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:Stage: bad value for restricted picklist field: "
                             "Won Big:StageName --")
    assert errors["V-3"] == ("INVALID_FIELD:Failed to deserialize field at col 3. Due to, '2026/01/01' is not a valid "
                             "value for the type xsd:date:CloseDate --")
    assert errors["V-4"].startswith("INVALID_FIELD:Failed to deserialize field at col 4. Due to, '12abc'")
    assert errors["V-5"] == ("NUMBER_OUTSIDE_VALID_RANGE:Amount: value outside of valid range on numeric field: "
                             "12345678901234567:Amount --")
    assert errors["V-6"] == ("INVALID_FIELD:Foreign key external ID: ACC-MISSING not found for field ExternalId__c in "
                             "entity Account:--")
    job_id, _ = bulk.run("ExternalId__c,Name,StageName,CloseDate,Probability,IsClosed\n"
                         "P-1,Deal,Prospecting,2026-01-01,101,\nP-2,Deal,Prospecting,2026-01-01,50,true\n")
    errors = {r["ExternalId__c"]: r["sf__Error"] for r in bulk.result(job_id, "failedResults")}
    assert errors["P-1"].startswith("NUMBER_OUTSIDE_VALID_RANGE:Probability (%): value outside of valid range")
    assert errors["P-2"].startswith("INVALID_FIELD_FOR_INSERT_UPDATE:Unable to create/update fields: IsClosed.")


def test_insert_update_delete_operations(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    job_id, info = bulk.run("Name,ExternalId__c,Type\nAcme Test,ACC-T1,Prospect\n", object="Account",
                            operation="insert", externalIdFieldName=None)
    assert info["numberRecordsFailed"] == 0
    acc = bulk.result(job_id, "successfulResults")[0]["sf__Id"]
    assert acc.startswith("001")
    dup_job, _ = bulk.run("Name,ExternalId__c\nOther,ACC-T1\n", object="Account", operation="insert")
    assert bulk.result(dup_job, "failedResults")[0]["sf__Error"] == \
        f"DUPLICATE_VALUE:duplicate value found: ExternalId__c duplicates value on record with id: {acc}:ExternalId__c --"
    upd, info = bulk.run(f"Id,Name\n{acc},Acme Renamed\n001000000000000AAA,Nope\n{acc[:15]},Acme Final\n",
                         object="Account", operation="update")
    assert (info["numberRecordsProcessed"], info["numberRecordsFailed"]) == (3, 1)
    assert bulk.result(upd, "failedResults")[0]["sf__Error"] == "INVALID_CROSS_REFERENCE_KEY:invalid cross reference id:--"
    opp_job, _ = bulk.run(f"ExternalId__c,Name,StageName,CloseDate,AccountId\nDEL-1,Deal,Prospecting,2026-01-01,{acc}\n")
    opp_id = bulk.result(opp_job, "successfulResults")[0]["sf__Id"]
    assert opportunity(clean_emulator, "DEL-1")["AccountId"] == acc
    gone, info = bulk.run(f"Id\n{opp_id}\n{opp_id}\n", operation="delete", externalIdFieldName=None)
    assert bulk.result(gone, "successfulResults")[0]["sf__Created"] == "false"
    assert opportunity(clean_emulator, "DEL-1") is None
    # The session emulator's Accounts are shared with later tests: leave exactly the seeded ones.
    _, info = bulk.run(f"Id\n{acc}\n", object="Account", operation="hardDelete", externalIdFieldName=None)
    assert info["numberRecordsFailed"] == 0


def test_multipart_create_with_data(bulk: Bulk) -> None:
    job = json.dumps({"object": "Opportunity", "operation": "upsert", "externalIdFieldName": "ExternalId__c",
                      "contentType": "CSV", "lineEnding": "LF"})
    files = {"job": (None, job, "application/json"), "content": ("content", rows_csv(2), "text/csv")}
    r = bulk.s.post(bulk.base, files=files)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "UploadComplete" and "contentUrl" not in r.json()
    assert bulk.wait(r.json()["id"])["numberRecordsProcessed"] == 2


def test_list_jobs_paging_shape(bulk: Bulk) -> None:
    ids = [bulk.create().json()["id"] for _ in range(3)]
    page = bulk.s.get(bulk.base, params={"jobType": "V2Ingest"}).json()
    assert [j["id"] for j in page["records"]] == ids
    assert set(page["records"][0]) >= {"id", "operation", "object", "state", "jobType", "contentUrl", "apiVersion"}
    assert bulk.s.get(bulk.base, params={"jobType": "Classic"}).json()["records"] == []
    rest = bulk.s.get(bulk.base, params={"queryLocator": "01g5g0000000001-2"}).json()
    assert [j["id"] for j in rest["records"]] == ids[2:]


# -- engine behaviour --------------------------------------------------------------------------------------------------
def test_stats_counters_and_duplicate_uploads(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    data = rows_csv(5)
    bulk.run(data)
    bulk.run(data)
    bad = OPP_HEADER + "\nS-1,Deal,Bogus,2026-01-01,1,ACC-0000001\n"
    bulk.run(bad)
    stats = clean_emulator.stats()
    assert stats["bulk_jobs_created"] == 3 and stats["bulk_uploads"] == 3
    assert stats["bulk_upload_bytes"] == 2 * len(data.encode()) + len(bad.encode())
    assert stats["bulk_batches"] == 3 and stats["bulk_records"] == 11
    assert stats["duplicate_uploads"] == 1
    assert stats["failures_by_code"] == {"INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST": 1}


def test_fail_job_after_records_leaves_unprocessed(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    clean_emulator.control("PUT", "profile", {"name": "instant", "internal_batch_records": 100, "chunk_records": 50})
    clean_emulator.set_faults(fail_job_after_records=150)
    job_id, info = bulk.run(rows_csv(400))
    assert info["state"] == "Failed" and "fail_job_after_records" in info["errorMessage"]
    assert info["numberRecordsProcessed"] == 150
    ok = {r["ExternalId__c"] for r in bulk.result(job_id, "successfulResults")}
    unprocessed = [r["ExternalId__c"] for r in bulk.result(job_id, "unprocessedrecords")]
    assert len(ok) == 150 and len(unprocessed) == 250
    assert ok.isdisjoint(unprocessed) and len(ok | set(unprocessed)) == 400


def _interleaved_and_sorted(n: int, accounts: int, prefix: str = "ACC-") -> tuple[list[str], list[str]]:
    """Two jobs' CSVs each way: rows of every Account spread over both jobs, or sorted and split by Account."""
    rows = [f"L-{i:05d},Deal {i},Prospecting,2026-01-01,1,{prefix}{1 + (i * 7919) % accounts:07d}" for i in range(n)]
    interleaved = [OPP_HEADER + "\n" + "\n".join(rows[j::2]) + "\n" for j in range(2)]
    by_account = sorted(rows, key=lambda r: r.rsplit(",", 1)[1])
    half = [r for r in by_account if int(r.rsplit("-", 1)[1]) <= accounts // 2]
    other = [r for r in by_account if int(r.rsplit("-", 1)[1]) > accounts // 2]
    return interleaved, [OPP_HEADER + "\n" + "\n".join(part) + "\n" for part in (half, other)]


@pytest.fixture
def many_accounts(bulk: Bulk):
    """397 extra Accounts (``LCK-…``) loaded with a Bulk insert job, hard-deleted again afterwards."""
    body = "Name,ExternalId__c\n" + "".join(f"Lock Test {i},LCK-{i:07d}\n" for i in range(1, 398))
    job_id, info = bulk.run(body, object="Account", operation="insert", externalIdFieldName=None)
    assert (info["numberRecordsProcessed"], info["numberRecordsFailed"]) == (397, 0)
    ids = [r["sf__Id"] for r in bulk.result(job_id, "successfulResults")]
    yield 397
    bulk.emu.reset()  # Opportunities first
    _, info = bulk.run("Id\n" + "\n".join(ids) + "\n", object="Account", operation="hardDelete",
                       externalIdFieldName=None)
    assert info["numberRecordsFailed"] == 0


def _run_concurrently(bulk: Bulk, bodies: list[str]) -> list[str]:
    ids = [bulk.create().json()["id"] for _ in bodies]
    for job_id, body in zip(ids, bodies, strict=True):
        assert bulk.upload(job_id, body).status_code == 201
    for job_id in ids:
        bulk.patch(job_id, "UploadComplete")
    for job_id in ids:
        bulk.wait(job_id)
    return ids


def test_lock_contention_knob_punishes_interleaving_not_partitioning(bulk: Bulk, clean_emulator: EmulatorProcess,
                                                                    many_accounts: int) -> None:
    clean_emulator.control("PUT", "profile", {"name": "instant", "internal_batch_records": 2000})
    clean_emulator.set_faults(lock_contention_rate=0.5)
    # About 20 rows per Account, and internal batch boundaries that split an Account's rows, as in real data.
    interleaved, partitioned = _interleaved_and_sorted(8000, accounts=many_accounts, prefix="LCK-")
    counts, retries = {}, {}
    for label, bodies in (("interleaved", interleaved), ("partitioned", partitioned)):
        ids = _run_concurrently(bulk, bodies)
        locked = [r for j in ids for r in bulk.result(j, "failedResults")
                  if r["sf__Error"].startswith("UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record "
                                               "or 200 records: 001")]
        counts[label] = len(locked)
        retries[label] = sum(bulk.info(j)["retries"] for j in ids)
        clean_emulator.reset()
    # More than 100 lock failures in a batch requeue the rest of it (retries), which caps the failures per batch.
    assert counts["interleaved"] >= 200 and retries["interleaved"] > 0, (counts, retries)
    assert counts["partitioned"] <= counts["interleaved"] * 0.1, counts


def test_realistic_lock_wait_times_out(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    # Time scale 100: a 200-row chunk holds its Account for 200 × 300 ms / 100 = 0.6 s, the wait gives up after 0.1 s.
    clean_emulator.control("PUT", "profile", {"name": "realistic", "time_scale": 100, "per_record_ms": 300,
                                              "internal_batch_records": 200, "rest_latency_ms": 0,
                                              "upload_mbps": 0, "download_mbps": 0})
    same_account = OPP_HEADER + "\n" + "\n".join(
        f"R-{i:04d},Deal,Prospecting,2026-01-01,1,ACC-0000003" for i in range(400)) + "\n"
    job_id, info = bulk.run(same_account)
    assert info["state"] == "JobComplete" and info["numberRecordsProcessed"] == 400
    assert info["numberRecordsFailed"] == 200
    failed = bulk.result(job_id, "failedResults")
    acc = account_id(clean_emulator, "ACC-0000003")
    assert {r["sf__Error"] for r in failed} == {
        f"UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record or 200 records: {acc}:--"}
    assert info["apiActiveProcessingTime"] == 400 * 300


def test_realistic_timeline_counters_grow(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    clean_emulator.control("PUT", "profile", {"name": "realistic", "time_scale": 50, "rest_latency_ms": 0,
                                              "internal_batch_records": 200, "org_worker_threads": 1})
    job_id = bulk.create().json()["id"]
    assert bulk.upload(job_id, rows_csv(1000)).status_code == 201
    assert bulk.patch(job_id, "UploadComplete").json()["state"] == "UploadComplete"
    seen_states, processed = [], []
    while True:
        info = bulk.info(job_id)
        seen_states.append(info["state"])
        processed.append(info.get("numberRecordsProcessed", 0))
        if info["state"] == "JobComplete":
            break
        time.sleep(0.01)
    assert seen_states[0] == "UploadComplete" and "InProgress" in seen_states
    assert any(0 < p < 1000 for p in processed) and processed == sorted(processed)
    assert info["totalProcessingTime"] >= 1000 * 3.6 and info["apiActiveProcessingTime"] == 3600


def test_upload_over_150mb_base64_is_rejected(bulk: Bulk) -> None:
    job_id = bulk.create().json()["id"]
    block = (rows_csv(2000)).encode()
    total = 0

    def body():
        nonlocal total
        yield OPP_HEADER.encode() + b"\n"
        while total < 113 * 1024 * 1024:
            total += len(block)
            yield block

    r = bulk.s.put(f"{bulk.base}/{job_id}/batches", data=body(), headers={"Content-Type": "text/csv"})
    assert r.status_code == 400
    assert r.json()[0]["errorCode"] == "BULK_API_ERROR" and "150 MB" in r.json()[0]["message"]
    # The job is still Open and can take a proper upload.
    assert bulk.upload(job_id, rows_csv(1)).status_code == 201


def test_reset_deletes_jobs_and_files(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    job_id, _ = bulk.run(rows_csv(2))
    assert (clean_emulator.data_dir / "jobs" / job_id).is_dir()
    clean_emulator.reset()
    assert bulk.s.get(f"{bulk.base}/{job_id}").status_code == 404
    assert not (clean_emulator.data_dir / "jobs" / job_id).exists()


def test_jobs_survive_restart_and_resume(tmp_path: Path) -> None:
    emu = EmulatorProcess(tmp_path / "org")
    emu.seed(records=0, accounts=5)
    with emu:
        bulk = Bulk(emu)
        done_id, _ = bulk.run(rows_csv(3, prefix="DONE", accounts=5))
        # One thread, 50-row chunks of 0.1 s each: 1,000 rows take ~2 s; kill the process in the middle.
        emu.control("PUT", "profile", {"name": "instant", "per_record_ms": 2, "chunk_records": 50,
                                       "internal_batch_records": 200, "org_worker_threads": 1})
        job_id = bulk.create().json()["id"]
        assert bulk.upload(job_id, rows_csv(1000, prefix="RUN", accounts=5)).status_code == 201
        bulk.patch(job_id, "UploadComplete")
        deadline = time.monotonic() + 20
        while bulk.info(job_id).get("numberRecordsProcessed", 0) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        before = bulk.info(job_id)
        assert before["state"] == "InProgress" and 0 < before["numberRecordsProcessed"] < 1000
        emu.stop(kill=True)
    with emu:
        bulk = Bulk(emu)
        info = bulk.wait(job_id)
        assert (info["state"], info["numberRecordsProcessed"], info["numberRecordsFailed"]) == ("JobComplete", 1000, 0)
        ok = [r["ExternalId__c"] for r in bulk.result(job_id, "successfulResults")]
        assert sorted(ok) == [f"RUN-{i:05d}" for i in range(1000)]
        assert all(r["sf__Created"] == "true" for r in bulk.result(job_id, "successfulResults"))
        assert [r["ExternalId__c"] for r in bulk.result(done_id, "successfulResults")] == \
            ["DONE-00000", "DONE-00001", "DONE-00002"]
        conn = sqlite3.connect(f"file:{emu.data_dir / 'org.sqlite'}?mode=ro", uri=True)
        assert conn.execute('SELECT COUNT(*) FROM "Opportunity" WHERE "ExternalId__c" LIKE \'RUN-%\'').fetchone()[0] \
            == 1000
        conn.close()


def test_concurrent_jobs_do_not_lose_rows(bulk: Bulk, clean_emulator: EmulatorProcess) -> None:
    clean_emulator.control("PUT", "profile", {"name": "instant", "internal_batch_records": 500})
    bodies = [rows_csv(1500, prefix=f"C{j}") for j in range(4)]
    results: dict[int, dict[str, Any]] = {}

    def one(j: int) -> None:
        client = Bulk(clean_emulator)
        results[j] = client.run(bodies[j])[1]

    threads = [threading.Thread(target=one, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["state"] == "JobComplete" and r["numberRecordsProcessed"] == 1500 for r in results.values())
    conn = sqlite3.connect(f"file:{clean_emulator.data_dir / 'org.sqlite'}?mode=ro", uri=True)
    assert conn.execute('SELECT COUNT(*) FROM "Opportunity" WHERE "ExternalId__c" GLOB \'C[0-3]-*\'').fetchone()[0] \
        == 6000
    conn.close()

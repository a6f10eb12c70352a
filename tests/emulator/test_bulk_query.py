"""Bulk API 2.0 query jobs against the emulator over raw HTTPS: create, info, paged results, abort, delete, list."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from typing import Any

import pytest
import requests

from emulator.harness import EmulatorProcess

V = "v62.0"
SOQL = "SELECT Id, ExternalId__c, Name, Amount FROM Opportunity WHERE ExternalId__c != null"


class Query:
    def __init__(self, emu: EmulatorProcess) -> None:
        self.s = requests.Session()
        self.s.verify = emu.ca_bundle
        self.s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace the emulator's CA
        self.s.headers["Authorization"] = f"Bearer {emu.access_token()}"
        self.base = f"{emu.instance_url}/services/data/{V}/jobs/query"

    def create(self, soql: str = SOQL, **spec: Any) -> requests.Response:
        return self.s.post(self.base, json={"operation": "query", "query": soql, **spec})

    def wait(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.s.get(f"{self.base}/{job_id}").json()
            if info["state"] in ("JobComplete", "Failed", "Aborted"):
                return info
            time.sleep(0.02)
        raise AssertionError(f"query job {job_id} did not finish")

    def pages(self, job_id: str, max_records: int | None = None) -> list[requests.Response]:
        out, locator = [], None
        while True:
            params: dict[str, Any] = {}
            if max_records:
                params["maxRecords"] = max_records
            if locator:
                params["locator"] = locator
            r = self.s.get(f"{self.base}/{job_id}/results", params=params, headers={"Accept": "text/csv"})
            assert r.status_code == 200, r.text
            out.append(r)
            locator = r.headers["Sforce-Locator"]
            if locator == "null":
                return out


@pytest.fixture
def query(clean_emulator: EmulatorProcess) -> Query:
    return Query(clean_emulator)


def _load(emu: EmulatorProcess, n: int) -> None:
    """Opportunities through a Bulk ingest job (the seed leaves the org without any)."""
    s = requests.Session()
    s.verify, s.trust_env = emu.ca_bundle, False
    s.headers["Authorization"] = f"Bearer {emu.access_token()}"
    base = f"{emu.instance_url}/services/data/{V}/jobs/ingest"
    job_id = s.post(base, json={"object": "Opportunity", "operation": "upsert",
                                "externalIdFieldName": "ExternalId__c"}).json()["id"]
    body = "ExternalId__c,Name,StageName,CloseDate,Amount,Account.ExternalId__c\n" + "".join(
        f'Q-{i:05d},"Deal, ""{i}""",Prospecting,2026-01-01,{i}.25,ACC-{1 + i % 50:07d}\n' for i in range(n))
    assert s.put(f"{base}/{job_id}/batches", data=body.encode(), headers={"Content-Type": "text/csv"}).status_code \
        == 201
    s.patch(f"{base}/{job_id}", json={"state": "UploadComplete"})
    while s.get(f"{base}/{job_id}").json()["state"] != "JobComplete":
        time.sleep(0.02)


def test_query_job_lifecycle_and_paging(query: Query, clean_emulator: EmulatorProcess) -> None:
    _load(clean_emulator, 250)
    r = query.create()
    assert r.status_code == 200
    job = r.json()
    assert list(job) == ["id", "operation", "object", "createdById", "createdDate", "systemModstamp", "state",
                         "concurrencyMode", "contentType", "apiVersion", "lineEnding", "columnDelimiter"]
    assert (job["state"], job["object"], job["operation"]) == ("UploadComplete", "Opportunity", "query")
    info = query.wait(job["id"])
    assert (info["state"], info["jobType"], info["numberRecordsProcessed"]) == ("JobComplete", "V2Query", 250)
    pages = query.pages(job["id"], max_records=100)
    assert [p.headers["Sforce-NumberOfRecords"] for p in pages] == ["100", "100", "50"]
    assert pages[0].headers["Sforce-Locator"] == "MTAw"  # base64("100"), like Salesforce's MTAwMDA for 10000
    assert pages[-1].headers["Sforce-Locator"] == "null"
    rows = []
    for p in pages:
        assert p.headers["Content-Type"] == "text/csv"
        assert p.text.startswith('"Id","ExternalId__c","Name","Amount"\n')
        rows += list(csv.DictReader(io.StringIO(p.text, newline="")))
    assert sorted(r["ExternalId__c"] for r in rows) == [f"Q-{i:05d}" for i in range(250)]
    by_key = {r["ExternalId__c"]: r for r in rows}
    assert by_key["Q-00007"]["Name"] == 'Deal, "7"' and by_key["Q-00007"]["Amount"] == "7.25"
    assert by_key["Q-00007"]["Id"].startswith("006")
    whole = query.pages(job["id"])
    assert len(whole) == 1 and whole[0].headers["Sforce-NumberOfRecords"] == "250"


def test_query_relationship_and_options(query: Query, clean_emulator: EmulatorProcess) -> None:
    _load(clean_emulator, 20)
    soql = "SELECT ExternalId__c, Account.ExternalId__c FROM Opportunity WHERE Amount > 10 ORDER BY ExternalId__c"
    job_id = query.create(soql, columnDelimiter="PIPE", lineEnding="CRLF").json()["id"]
    assert query.wait(job_id)["numberRecordsProcessed"] == 10
    text = query.pages(job_id)[0].text
    assert text.startswith('"ExternalId__c"|"Account.ExternalId__c"\r\n"Q-00010"|"ACC-0000011"\r\n')
    empty = query.create("SELECT Id FROM Opportunity WHERE Name = 'nothing'").json()["id"]
    query.wait(empty)
    page = query.pages(empty)[0]
    assert page.headers["Sforce-NumberOfRecords"] == "0" and page.text == '"Id"\n'


def test_query_errors(query: Query) -> None:
    bad = query.create("SELECT Bacon__c FROM Opportunity")
    assert bad.status_code == 400 and bad.json()[0]["errorCode"] == "INVALID_FIELD"
    assert "No such column 'Bacon__c' on entity 'Opportunity'" in bad.json()[0]["message"]
    assert query.create("SELEKT Id FROM Account").json()[0]["errorCode"] == "MALFORMED_QUERY"
    agg = query.create("SELECT COUNT() FROM Opportunity")
    assert agg.status_code == 400 and agg.json()[0]["errorCode"] == "API_ERROR"
    assert query.create(operation="upsert").json() == [
        {"message": "Invalid value: 'upsert' supplied for property: 'operation'", "errorCode": "API_ERROR"}]
    old = query.s.post(query.base.replace(V, "v46.0"), json={"operation": "query", "query": SOQL})
    assert old.status_code == 404


def test_query_abort_delete_list_and_version_conflict(query: Query, clean_emulator: EmulatorProcess) -> None:
    clean_emulator.control("PUT", "profile", {"name": "instant", "job_dequeue_delay_s": 30})
    try:
        waiting = query.create().json()["id"]
        early = query.s.get(f"{query.base}/{waiting}/results")
        assert early.status_code == 400 and early.json()[0]["errorCode"] == "INVALIDJOBSTATE"
        aborted = query.s.patch(f"{query.base}/{waiting}", json={"state": "Aborted"})
        assert aborted.status_code == 200 and aborted.json()["state"] == "Aborted"
        again = query.s.patch(f"{query.base}/{waiting}", json={"state": "Aborted"})
        assert again.json() == [{"message": "Aborting already Aborted Job not allowed", "errorCode": "INVALIDJOBSTATE"}]
    finally:
        clean_emulator.control("PUT", "profile", {"name": "instant"})
    done = query.create(operation="queryAll").json()["id"]
    assert query.wait(done)["operation"] == "queryAll"
    conflict = query.s.get(f"{query.base.replace(V, 'v61.0')}/{done}/results")
    assert conflict.status_code == 409
    listing = query.s.get(query.base).json()
    assert listing["done"] is True and [j["id"] for j in listing["records"]] == [waiting, done]
    assert {j["jobType"] for j in listing["records"]} == {"V2Query"}
    assert query.s.delete(f"{query.base}/{done}").status_code == 204
    assert query.s.get(f"{query.base}/{done}").status_code == 404
    # A query job is not an ingest job.
    ingest = query.base.replace("/query", "/ingest")
    assert query.s.get(f"{ingest}/{waiting}").status_code == 404


def test_query_sees_what_ingest_wrote(query: Query, clean_emulator: EmulatorProcess) -> None:
    _load(clean_emulator, 30)
    job_id = query.create("SELECT Id, ExternalId__c FROM Opportunity").json()["id"]
    query.wait(job_id)
    rows = list(csv.DictReader(io.StringIO(query.pages(job_id)[0].text, newline="")))
    conn = sqlite3.connect(f"file:{clean_emulator.data_dir / 'org.sqlite'}?mode=ro", uri=True)
    db = dict(conn.execute('SELECT "ExternalId__c", "Id" FROM "Opportunity"').fetchall())
    conn.close()
    assert {r["ExternalId__c"]: r["Id"] for r in rows} == db

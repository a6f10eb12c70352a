"""Contract test: the real simple-salesforce ``bulk2`` client against the emulator, unchanged."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceOperationError

from emulator.harness import EmulatorProcess


@pytest.fixture
def sf(clean_emulator: EmulatorProcess) -> Salesforce:
    session = requests.Session()
    session.verify = clean_emulator.ca_bundle
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace the emulator's CA
    return Salesforce(instance_url=clean_emulator.instance_url, session_id=clean_emulator.access_token(),
                      session=session, version="62.0")


def _csv(path: Path, rows: list[list[str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ExternalId__c", "Name", "StageName", "CloseDate", "Amount", "Account.ExternalId__c"])
        w.writerows(rows)
    return str(path)


def test_upsert_and_result_helpers(sf: Salesforce, tmp_path: Path) -> None:
    rows = [[f"SS-{i:04d}", f"Deal {i}, \"quoted\"\nline 2", "Prospecting", "2026-05-01", f"{i}.5",
             f"ACC-{1 + i % 50:07d}"] for i in range(30)]
    rows.append(["SS-BAD", "Bad stage", "Nope", "2026-05-01", "1", "ACC-0000001"])
    rows.append(["SS-NOACC", "No account", "Prospecting", "2026-05-01", "1", "ACC-9999999"])
    result = sf.bulk2.Opportunity.upsert(csv_file=_csv(tmp_path / "opps.csv", rows),
                                         external_id_field="ExternalId__c", wait=0.1)
    assert len(result) == 1
    job = result[0]
    assert (job["numberRecordsProcessed"], job["numberRecordsFailed"], job["numberRecordsTotal"]) == (32, 2, 32)

    ok = list(csv.DictReader(io.StringIO(sf.bulk2.Opportunity.get_successful_records(job["job_id"]))))
    assert len(ok) == 30 and all(r["sf__Created"] == "true" for r in ok)
    assert {r["Name"] for r in ok} >= {'Deal 3, "quoted"\nline 2'}
    failed = {r["ExternalId__c"]: r["sf__Error"]
              for r in csv.DictReader(io.StringIO(sf.bulk2.Opportunity.get_failed_records(job["job_id"])))}
    assert failed["SS-BAD"].startswith("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:")
    assert failed["SS-NOACC"].startswith("INVALID_FIELD:Foreign key external ID: ACC-9999999 not found")
    unprocessed = sf.bulk2.Opportunity.get_unprocessed_records(job["job_id"])  # camelCase path
    assert unprocessed.strip() == "ExternalId__c,Name,StageName,CloseDate,Amount,Account.ExternalId__c"

    # A second run updates: the same ids come back with sf__Created=false.
    again = sf.bulk2.Opportunity.upsert(csv_file=_csv(tmp_path / "again.csv", rows[:5]),
                                        external_id_field="ExternalId__c", wait=0.1)
    ok2 = list(csv.DictReader(io.StringIO(sf.bulk2.Opportunity.get_successful_records(again[0]["job_id"]))))
    assert {r["sf__Id"] for r in ok2} <= {r["sf__Id"] for r in ok}
    assert {r["sf__Created"] for r in ok2} == {"false"}
    info = sf.bulk2.Opportunity._client.get_job(again[0]["job_id"], False)
    assert info["state"] == "JobComplete"


def test_split_into_concurrent_jobs(sf: Salesforce) -> None:
    records = [{"ExternalId__c": f"MJ-{i:04d}", "Name": f"Deal {i}", "StageName": "Qualification",
                "CloseDate": "2026-06-30", "Account.ExternalId__c": f"ACC-{1 + i % 7:07d}"} for i in range(50)]
    result = sf.bulk2.Opportunity.insert(records=records, batch_size=20, concurrency=3, wait=0.1)
    assert [r["numberRecordsProcessed"] for r in result] == [20, 20, 10]
    assert sum(r["numberRecordsFailed"] for r in result) == 0


def test_failed_job_raises_with_error_message(sf: Salesforce, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("ExternalId__c,NoSuchField__c\nX-1,1\n")
    with pytest.raises(SalesforceOperationError, match="InvalidBatch : Field name not found : NoSuchField__c"):
        sf.bulk2.Opportunity.upsert(csv_file=str(path), external_id_field="ExternalId__c", wait=0.1)


def test_bulk2_query(sf: Salesforce, tmp_path: Path) -> None:
    rows = [[f"QQ-{i:04d}", f"Deal {i}", "Prospecting", "2026-05-01", f"{i}", "ACC-0000002"] for i in range(120)]
    sf.bulk2.Opportunity.upsert(csv_file=_csv(tmp_path / "q.csv", rows), external_id_field="ExternalId__c",
                                wait=0.1)
    pages = list(sf.bulk2.Opportunity.query(
        "SELECT Id, ExternalId__c, Name, Amount FROM Opportunity WHERE ExternalId__c != null",
        max_records=50, wait=0.1))
    assert len(pages) == 3
    got = [r for page in pages for r in csv.DictReader(io.StringIO(page))]
    assert sorted(r["ExternalId__c"] for r in got) == [f"QQ-{i:04d}" for i in range(120)]
    assert all(r["Id"].startswith("006") for r in got)

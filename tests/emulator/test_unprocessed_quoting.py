"""Regression: ``unprocessedrecords`` of a job stopped part-way keeps values with a lone CR in one record.

Found by ``tests/scenarios`` (scenario 7): the rows written back for a stopped internal batch used
``QUOTE_MINIMAL`` with an LF line ending, which leaves ``"a\\rb"`` unquoted and splits the record.
"""

from __future__ import annotations

import csv
import io
import time

HEADER = ["ExternalId__c", "Account.ExternalId__c", "Name", "StageName", "CloseDate", "Description"]


def test_unprocessed_rows_with_cr_stay_one_record(clean_emulator, sf_session) -> None:
    clean_emulator.set_faults(fail_job_after_records=5)
    base = f"{clean_emulator.instance_url}/services/data/v62.0/jobs/ingest"
    account = "ACC-0000001"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(HEADER)
    rows = [[f"CRQ-{i:04d}", account, f"CR only\rDeal {i}", "Prospecting", "2027-01-01", f"line\r\nbreak {i}"]
            for i in range(20)]
    writer.writerows(rows)
    job = sf_session.post(base, json={"object": "Opportunity", "operation": "upsert", "lineEnding": "LF",
                                      "externalIdFieldName": "ExternalId__c"}).json()
    sf_session.put(f"{base}/{job['id']}/batches", data=buf.getvalue().encode(),
                   headers={"Content-Type": "text/csv"}).raise_for_status()
    sf_session.patch(f"{base}/{job['id']}", json={"state": "UploadComplete"}).raise_for_status()
    deadline = time.monotonic() + 30
    while sf_session.get(f"{base}/{job['id']}").json()["state"] not in ("JobComplete", "Failed", "Aborted"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the stopped batch writes its unprocessed rows when it finalises
    body = sf_session.get(f"{base}/{job['id']}/unprocessedrecords").content.decode()
    records = list(csv.reader(io.StringIO(body, newline="")))
    assert records[0] == HEADER
    assert {len(r) for r in records} == {len(HEADER)}
    assert records[1:] == rows[-(len(records) - 1):] and len(records) - 1 == 15

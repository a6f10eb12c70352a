"""stream_rows_to_jobs: the pipeline (with a fake Bulk hook) and the whole path Data Cloud → Bulk on the emulator."""

from __future__ import annotations

import threading
import time

import pytest

from sf_datacloud_sync.utils.transfer import SubmittedJob, stream_rows_to_jobs


class FakeBulk:
    """Records what the pipeline hands to Bulk; optionally slow, failing, and checking the memory bound."""

    max_upload_bytes = 100_000_000

    def __init__(self, upload_s: float = 0.0, fail_at: int | None = None, pulled=None, per_job: int = 0,
                 batch_rows: int = 2_000) -> None:
        self.upload_s = upload_s
        self.fail_at = fail_at
        self.pulled = pulled
        self.per_job = per_job
        self.batch_rows = batch_rows
        self.jobs: list[bytes] = []
        self.events: list[tuple[str, int]] = []
        self.threads: set[str] = set()
        self.max_ahead = 0

    def submit_ingest_job(self, object_name, data, *, external_id_field, operation, line_ending, on_created=None):
        seq = len(self.jobs)
        if on_created is not None:
            on_created({"id": f"750JOB{seq:012d}", "state": "Open"})
        self.events.append(("upload", seq))
        self.threads.add(threading.current_thread().name)
        if self.pulled is not None:
            # Rows read from the source but not yet in an upload: at most the next chunk (plus one batch).
            self.max_ahead = max(self.max_ahead, self.pulled[0] - (seq + 1) * self.per_job)
        time.sleep(self.upload_s)
        if seq == self.fail_at:
            raise RuntimeError(f"upload {seq} failed")
        self.jobs.append(data if isinstance(data, bytes) else data.read())
        return {"id": f"750JOB{seq:012d}", "state": "UploadComplete"}


def rows(n: int, pulled=None, delay_every: int = 0, delay_s: float = 0.0, fail_at: int | None = None):
    for i in range(n):
        if fail_at is not None and i == fail_at:
            raise ValueError("source broke")
        if delay_every and i % delay_every == 0:
            time.sleep(delay_s)
        if pulled is not None:
            pulled[0] += 1
        yield (f"K{i:06d}", f"name {i}", None if i % 7 == 0 else "")


def run(bulk, source, **kwargs):
    params = {"object_name": "Opportunity", "external_id_field": "ExternalId__c", "header": ["Key", "Name", "Note"],
              "column_types": None, "key_func": lambda r: r[0], "max_records_per_job": 100}
    params.update(kwargs)
    return stream_rows_to_jobs(bulk, source, **params)


def test_jobs_in_order_with_keys_and_callback():
    bulk = FakeBulk()
    events: list[tuple[str, int]] = []
    jobs = []
    for job in run(bulk, rows(1_050), on_job_submitted=lambda j: events.append(("callback", j.seq))):
        events.append(("yield", job.seq))
        jobs.append(job)
    assert [j.seq for j in jobs] == list(range(11))
    assert [j.records for j in jobs] == [100] * 10 + [50]
    assert (jobs[0].first_key, jobs[0].last_key, jobs[-1].last_key) == ("K000000", "K000099", "K001049")
    assert all(a.last_key < b.first_key for a, b in zip(jobs, jobs[1:], strict=False))
    assert events == [e for j in jobs for e in (("callback", j.seq), ("yield", j.seq))]
    assert all(isinstance(j, SubmittedJob) and j.job_id.startswith("750") for j in jobs)
    assert bulk.threads == {"bulk-upload-Opportunity"}
    body = b"".join(bulk.jobs)
    assert body.count(b"Key,Name,Note\n") == 11 and b"#N/A" in body


def test_jobs_are_announced_before_their_upload():
    bulk = FakeBulk()
    created: list[SubmittedJob] = []

    def on_created(job):
        created.append(job)
        bulk.events.append(("created", job.seq))

    jobs = list(run(bulk, rows(250), on_job_created=on_created))
    assert created == jobs  # same figures before the upload as after the close
    assert bulk.events == [("created", 0), ("upload", 0), ("created", 1), ("upload", 1), ("created", 2),
                           ("upload", 2)]


def test_a_failing_announcement_stops_the_stream():
    def refuse(job):
        if job.seq == 1:
            raise OSError("ledger unavailable")

    bulk = FakeBulk()
    with pytest.raises(OSError, match="ledger unavailable"):
        list(run(bulk, rows(500), on_job_created=refuse))


def test_freed_chunk_memory_is_given_back_after_each_upload(monkeypatch):
    from sf_datacloud_sync.utils import transfer

    bulk = FakeBulk()
    trims: list[int] = []
    monkeypatch.setattr(transfer, "release_free_heap", lambda: trims.append(len(bulk.jobs)) or True)
    jobs = list(run(bulk, rows(350)))
    assert len(jobs) == 4 and trims == [1, 2, 3, 4]  # once per chunk, after its upload


def test_encoding_and_uploading_overlap():
    # 8 chunks, each ~0.15 s to read and ~0.15 s to upload: serial ≈ 2.4 s, pipelined ≈ 1.35 s.
    bulk = FakeBulk(upload_s=0.15)
    started = time.monotonic()
    jobs = list(run(bulk, rows(800, delay_every=100, delay_s=0.15)))
    elapsed = time.monotonic() - started
    assert len(jobs) == 8
    assert elapsed < 2.0, f"stages did not overlap ({elapsed:.2f}s)"


def test_memory_is_bounded_by_two_chunks():
    pulled = [0]
    bulk = FakeBulk(upload_s=0.02, pulled=pulled, per_job=100)
    jobs = list(run(bulk, rows(3_000, pulled=pulled)))
    assert len(jobs) == 30
    # While chunk k uploads, the source has been read up to the end of chunk k+1 at most (plus the one row read to
    # see whether the last key's run goes on).
    assert bulk.max_ahead <= 101


def test_failed_upload_stops_the_stream():
    bulk = FakeBulk(fail_at=2)
    seen: list[int] = []
    got: list[int] = []
    with pytest.raises(RuntimeError, match="upload 2 failed"):
        for job in run(bulk, rows(1_000), on_job_submitted=lambda j: seen.append(j.seq)):
            got.append(job.seq)
    assert got == [0, 1] and seen == [0, 1] and len(bulk.jobs) == 2


def test_source_error_reports_jobs_already_submitted():
    bulk = FakeBulk(upload_s=0.05)
    seen: list[int] = []
    with pytest.raises(ValueError, match="source broke"):
        for _ in run(bulk, rows(1_000, fail_at=450), on_job_submitted=lambda j: seen.append(j.seq)):
            pass
    assert seen == [0, 1, 2, 3] and len(bulk.jobs) == 4  # every job created is reported to the ledger


def test_closing_early_stops_after_the_upload_in_flight():
    bulk = FakeBulk(upload_s=0.05)
    seen: list[int] = []
    stream = run(bulk, rows(10_000), on_job_submitted=lambda j: seen.append(j.seq))
    first = next(stream)
    stream.close()
    assert first.seq == 0
    assert len(bulk.jobs) <= 3 and seen == list(range(len(bulk.jobs)))


def test_spooled_chunks_are_uploaded_as_files():
    bulk = FakeBulk()
    jobs = list(run(bulk, rows(250), spool_threshold=512))
    assert [j.records for j in jobs] == [100, 100, 50]
    assert all(body.startswith(b"Key,Name,Note\n") for body in bulk.jobs)


# -- end to end on the emulator ------------------------------------------------------------------------------------
MAPPING = {"ExternalId__c": "ExternalId__c", "AccountExternalId__c": "Account.ExternalId__c", "Name__c": "Name",
           "StageName__c": "StageName", "CloseDate__c": "CloseDate", "Amount__c": "Amount",
           "Probability__c": "Probability", "Type__c": "Type", "LeadSource__c": "LeadSource",
           "Description__c": "Description"}


@pytest.fixture
def emulator_knobs(clean_emulator):
    from tests.plugins.hooks.conftest import knobs_restored

    with knobs_restored(clean_emulator):
        yield clean_emulator


def test_data_cloud_to_bulk_end_to_end(emulator_knobs, clean_emulator, monkeypatch):
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", clean_emulator.info["airflow_conn"])
    clean_emulator.set_faults(rules=[{"path": "/jobs/ingest", "status": 503, "rate": 0.1}],
                              dc_first_page_max_rows=333, dc_page_max_bytes=50_000)
    bulk = SalesforceBulk2Hook()
    dc = DataCloudHook(salesforce_hook=bulk)
    columns = ", ".join(f'"{c}"' for c in MAPPING)
    submitted: list[SubmittedJob] = []
    with dc.query(f'SELECT {columns} FROM "Opportunity_Sync__dlm" ORDER BY "ExternalId__c"', page_rows=500) as res:
        jobs = list(stream_rows_to_jobs(bulk, res, object_name="Opportunity", external_id_field="ExternalId__c",
                                        header=list(MAPPING.values()), column_types=res.types,
                                        key_func=lambda r: r[0], max_records_per_job=450,
                                        on_job_submitted=submitted.append))
    assert jobs == submitted and [j.records for j in jobs] == [450] * 4 + [200]
    waits = [bulk.wait_for_job(j.job_id, timeout=120, poll_interval=0.05) for j in jobs]
    assert all(w.succeeded for w in waits)
    processed = sum(w.records_processed for w in waits)
    failed = sum(w.records_failed for w in waits)
    assert processed == 2_000
    # The seed plants 20 rows Salesforce must reject; everything else lands, once.
    assert failed == 20
    assert bulk.query_count("SELECT COUNT() FROM Opportunity") == 2_000 - failed
    assert clean_emulator.stats()["duplicate_uploads"] == 0
    bulk.close()

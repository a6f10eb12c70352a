"""BulkJobsTrigger against real Bulk API 2.0 jobs in the emulator (HTTPS, async hook path)."""

from __future__ import annotations

import asyncio
import importlib
import json
import time

import pytest

from sf_datacloud_sync.triggers.bulk_jobs import BulkJobsTrigger

HEADER = ["ExternalId__c", "Name", "StageName", "CloseDate", "Account.ExternalId__c"]


@pytest.fixture
def sf(clean_emulator, monkeypatch):
    from sf_datacloud_sync.hooks._http import RetryPolicy
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", clean_emulator.info["airflow_conn"])
    hook = SalesforceBulk2Hook(retry=RetryPolicy(max_attempts=3, max_elapsed=5, base_delay=0.01, max_delay=0.05))
    yield hook
    hook.close()
    clean_emulator.set_faults(per_record_ms=0)  # clear_faults keeps timing knobs; the next test wants speed


def submit(hook, n: int, prefix: str, *, bad: int = 0) -> str:
    from sf_datacloud_sync.utils.csv_encoder import CsvEncoder

    enc = CsvEncoder(HEADER)
    rows = [[f"{prefix}-{i:05d}", "" if i < bad else f"Deal {i}", "Prospecting", "2026-03-31",
             f"ACC-{1 + i % 50:07d}"] for i in range(n)]
    return hook.submit_ingest_job("Opportunity", enc.header_bytes + enc.encode_rows(rows),
                                  external_id_field="ExternalId__c")["id"]


async def collect(trigger: BulkJobsTrigger) -> list:
    return [event async for event in trigger.run()]


def test_serialize_round_trip():
    trigger = BulkJobsTrigger(conn_id="sf", job_ids=["750A", "750B", "750A"], poll_interval=0.5,
                              max_poll_interval=4, timeout=60, label="P01 [a, b)")
    classpath, kwargs = trigger.serialize()
    assert classpath == "sf_datacloud_sync.triggers.bulk_jobs.BulkJobsTrigger"
    module, name = classpath.rsplit(".", 1)
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert kwargs["job_ids"] == ["750A", "750B"]  # de-duplicated, order kept
    # The absolute deadline travels, so a trigger moved to another triggerer does not wait afresh.
    assert kwargs["deadline"] == pytest.approx(time.time() + 60, abs=5)
    json.dumps(kwargs)


async def test_all_jobs_finish_one_small_success_event(sf):
    jobs = [submit(sf, 40, "TA", bad=2), submit(sf, 25, "TB"), submit(sf, 10, "TC")]
    events = await collect(BulkJobsTrigger("salesforce_default", jobs, poll_interval=0.05, max_poll_interval=0.2,
                                           timeout=60))
    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "success"
    assert payload["jobs"] == {
        jobs[0]: {"state": "JobComplete", "processed": 40, "failed": 2},
        jobs[1]: {"state": "JobComplete", "processed": 25, "failed": 0},
        jobs[2]: {"state": "JobComplete", "processed": 10, "failed": 0},
    }
    assert len(json.dumps(payload)) < 400  # ids and counts only, never rows


async def test_failed_job_is_terminal_and_carries_its_error(sf, clean_emulator):
    clean_emulator.set_faults(fail_job_after_records=10)
    job = submit(sf, 30, "TF")
    (event,) = await collect(BulkJobsTrigger("salesforce_default", [job], poll_interval=0.05, timeout=60))
    entry = event.payload["jobs"][job]
    assert event.payload["status"] == "success"  # every job is finished; judging them is the operator's job
    assert entry["state"] == "Failed" and entry["error"].startswith("Unknown")
    assert "ended Failed/Aborted" in event.payload["message"]


async def test_deadline_reports_still_running_not_failed(sf, clean_emulator):
    clean_emulator.set_faults(per_record_ms=5)
    job = submit(sf, 400, "TS")
    try:
        started = time.monotonic()
        (event,) = await collect(BulkJobsTrigger("salesforce_default", [job], poll_interval=0.05, timeout=0.5))
        assert time.monotonic() - started < 5
        payload = event.payload
        assert payload["status"] == "timeout"
        assert payload["jobs"][job]["state"] in ("UploadComplete", "InProgress")
        assert "STILL RUNNING" in payload["message"] and job in payload["message"]
        assert "fail" not in payload["message"].lower().replace("not failed", "")
    finally:
        sf.abort_job(job)


async def test_unknown_job_is_an_error_event(sf):
    (event,) = await collect(BulkJobsTrigger("salesforce_default", ["750000000000000AAA"], poll_interval=0.05,
                                             timeout=30))
    assert event.payload["status"] == "error"
    assert "NOT_FOUND" in event.payload["message"]


async def test_on_kill_aborts_the_jobs_still_running(sf, clean_emulator):
    done_job = submit(sf, 1, "TD")
    assert sf.wait_for_job(done_job, timeout=30, poll_interval=0.05).finished
    clean_emulator.set_faults(per_record_ms=5)
    running = submit(sf, 400, "TK")
    trigger = BulkJobsTrigger("salesforce_default", [running, done_job], poll_interval=0.05, timeout=60)
    task = asyncio.ensure_future(collect(trigger))
    await asyncio.sleep(0.5)
    task.cancel()  # what the triggerer does on mark-failed / clear, before it calls on_kill
    with pytest.raises(asyncio.CancelledError):
        await task
    await trigger.on_kill()
    assert sf.get_job(running)["state"] == "Aborted"
    assert sf.get_job(done_job)["state"] == "JobComplete"


async def test_event_waits_for_min_wait_after_deferral(sf):
    """A job that finishes at once still fires no earlier than ``min_wait`` (apache/airflow#72716 guard)."""
    job = submit(sf, 5, "TW")
    started = time.monotonic()
    (event,) = await collect(BulkJobsTrigger("salesforce_default", [job], poll_interval=0.05, timeout=60,
                                             min_wait=1.5))
    assert event.payload["status"] == "success"
    assert time.monotonic() - started >= 1.4
    _, kwargs = BulkJobsTrigger("sf", ["750A"], min_wait=10).serialize()
    assert kwargs["not_before"] == pytest.approx(time.time() + 10, abs=5)  # absolute, survives a move


async def test_polls_oldest_first_and_asks_each_finished_job_once(sf, clean_emulator, monkeypatch):
    """While the oldest job runs, a round costs one request; every later job is asked once, when its turn comes."""
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    clean_emulator.set_faults(per_record_ms=3)  # ~1 s for the oldest job, ~15 ms for each quick one
    slow = submit(sf, 300, "TO")
    quick = [submit(sf, 5, f"TQ{i}") for i in range(3)]
    asked: list[str] = []
    aget_job = SalesforceBulk2Hook.aget_job

    async def spy(self, job_id):
        asked.append(job_id)
        return await aget_job(self, job_id)

    monkeypatch.setattr(SalesforceBulk2Hook, "aget_job", spy)
    (event,) = await collect(BulkJobsTrigger("salesforce_default", [slow, *quick], poll_interval=0.05,
                                             max_poll_interval=0.1, timeout=60))
    assert event.payload["status"] == "success" and set(event.payload["jobs"]) == {slow, *quick}
    rounds = asked.count(slow)
    assert rounds >= 3  # it ran for a while: several rounds asked it alone
    # A quick job queued behind the slow one may still run when its turn comes: asked once more, then done.
    assert all(1 <= asked.count(j) <= 2 for j in quick)
    assert len(asked) <= rounds + 2 * len(quick) < rounds * (1 + len(quick))  # vs. asking every job every round
    assert [j for j in asked if j != slow][:1] == quick[:1] and asked[-1] == quick[-1]


def test_next_poll_is_timed_from_the_oldest_jobs_processing_rate(monkeypatch):
    trigger = BulkJobsTrigger("sf", ["750A", "750B"], poll_interval=2, max_poll_interval=30,
                              job_records={"750A": 100_000, "750B": 50_000})
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    jobs = {"750A": {"state": "InProgress", "processed": 0, "failed": 0},
            "750B": {"state": "InProgress", "processed": 0, "failed": 0}}
    assert trigger._estimate(jobs, 3.0) == 3.0  # no progress seen yet: the back-off
    clock[0] += 40
    jobs["750A"]["processed"] = 10_000  # 250 rows/s → 360 s left
    assert trigger._estimate(jobs, 4.5) == 60.0  # half of it, capped at 2 × max_poll_interval
    clock[0] += 280
    jobs["750A"]["processed"] = 80_000  # 250 rows/s → 80 s left
    assert trigger._estimate(jobs, 30.0) == pytest.approx(40.0)
    jobs["750A"]["processed"] = 99_990
    assert trigger._estimate(jobs, 30.0) == 2.0  # never below poll_interval
    # Without row counts (an older serialized trigger) the back-off stays in charge.
    assert BulkJobsTrigger("sf", ["750A"])._estimate(jobs, 6.0) == 6.0
    assert trigger.serialize()[1]["job_records"] == {"750A": 100_000, "750B": 50_000}

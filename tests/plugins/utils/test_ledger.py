"""The job ledger: transitions, the committed key, rounds, scoping to a run and a partition."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sf_datacloud_sync.utils.ledger import (
    ABORTED,
    FAILED,
    JOB_COMPLETE,
    LEDGER_KEY,
    MAX_JOB_IDS,
    OPEN,
    UPLOAD_COMPLETE,
    UPLOADED,
    Ledger,
    read_progress,
)

BOUNDS = ["external_id", "OPP-1", "OPP-9", False]


class Store:
    """A dict-backed stand-in for ``context["task_state_store"]`` that insists on JSON values."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.data[key]) if key in self.data else default

    def set(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)
        self.writes += 1


def _upload(ledger: Ledger, job_id: str, seq: int, records: int, last: list[str], round_: int = 0) -> None:
    ledger.job_opened(job_id, seq=seq, round_=round_, attempt=1, records=records, last_key=last)
    ledger.job_uploaded(job_id)
    ledger.job_closed(job_id)


def test_new_ledger_is_fresh_and_round_trips_through_the_store():
    store = Store()
    ledger, stale = Ledger.load(store, run_id="r1", label="P00", bounds=BOUNDS)
    assert stale is None and ledger.is_fresh and ledger.phase == "streaming"
    ledger.save(store)
    again, stale = Ledger.load(store, run_id="r1", label="P00", bounds=BOUNDS, attempt=2)
    assert stale is None and again.data["attempt"] == 2 and again.is_fresh


def test_other_run_or_other_bounds_start_empty_and_hand_back_the_stale_ledger():
    store = Store()
    ledger, _ = Ledger.load(store, run_id="r1", label="P00", bounds=BOUNDS)
    _upload(ledger, "750A", 0, 10, ["OPP-2"])
    ledger.save(store)
    other_run, stale = Ledger.load(store, run_id="r2", label="P00", bounds=BOUNDS)
    assert other_run.is_fresh and stale is not None and "750A" in stale.jobs
    other_bounds, stale = Ledger.load(store, run_id="r1", label="P00", bounds=["external_id", "OPP-1", "OPP-5", False])
    assert other_bounds.is_fresh and stale is not None


def test_rows_count_and_key_commits_only_once_the_upload_is_acknowledged():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    ledger.job_opened("750A", seq=ledger.next_seq(), round_=0, attempt=1, records=300, last_key=("OPP-3",))
    assert ledger.jobs["750A"]["state"] == OPEN
    assert ledger.counters["rows"] == 0 and ledger.stream["committed"] is None
    ledger.job_uploaded("750A")
    assert ledger.jobs["750A"]["state"] == UPLOADED
    assert ledger.counters["rows"] == 300 and ledger.stream["committed"] == ["OPP-3"]
    ledger.job_uploaded("750A")  # idempotent
    assert ledger.counters["rows"] == 300
    ledger.job_closed("750A")
    assert ledger.running_job_ids() == ["750A"]


def test_follow_up_jobs_do_not_count_as_source_rows():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    _upload(ledger, "750A", 0, 300, ["OPP-3"])
    _upload(ledger, "750F", 1, 40, ["OPP-2"], round_=1)
    assert ledger.counters["rows"] == 300 and ledger.stream["committed"] == ["OPP-3"]
    assert ledger.submitted_records(1) == 40


def test_job_status_accepts_salesforce_and_event_shapes_and_terminal_states_stick():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    _upload(ledger, "750A", 0, 300, ["OPP-3"])
    ledger.job_status("750A", {"state": "InProgress", "numberRecordsProcessed": 100, "numberRecordsFailed": 2})
    assert ledger.jobs["750A"]["processed"] == 100 and ledger.jobs["750A"]["failed"] == 2
    ledger.job_status("750A", {"state": FAILED, "processed": 200, "failed": 3, "error": "TooManyLockFailure : x"})
    ledger.job_status("750A", {"state": "InProgress"})
    entry = ledger.jobs["750A"]
    assert entry["state"] == FAILED and entry["processed"] == 200 and entry["error"].startswith("TooMany")
    assert ledger.finished_job_ids() == ["750A"] and ledger.running_job_ids() == []
    ledger.job_status("unknown", {"state": JOB_COMPLETE})  # ignored


def test_drop_job_forgets_its_rows():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    _upload(ledger, "750A", 0, 300, ["OPP-3"])
    ledger.job_opened("750B", seq=1, round_=0, attempt=1, records=300, last_key=["OPP-6"])
    ledger.drop_job("750B")  # an Open job never counted
    assert ledger.counters["rows"] == 300 and ledger.stream["committed"] == ["OPP-3"]


def test_rewind_stream_drops_the_failed_job_and_everything_after_it():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    for i, last in enumerate(("OPP-2", "OPP-4", "OPP-6")):
        _upload(ledger, f"750{i}", i, 100, [last])
    ledger.stream["done"] = True
    ledger.rewind_stream(["7501"])
    assert list(ledger.jobs) == ["7500"]
    assert ledger.counters["rows"] == 100 and ledger.stream["committed"] == ["OPP-2"]
    assert ledger.stream["done"] is False
    ledger.rewind_stream(["7500"])
    assert ledger.stream["committed"] is None and ledger.counters["rows"] == 0


def test_correct_job_moves_the_committed_key_and_row_count():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    _upload(ledger, "750A", 0, 300, ["OPP-3"])
    ledger.correct_job("750A", records=299, last_key=("OPP-3b",))
    assert ledger.counters["rows"] == 299 and ledger.stream["committed"] == ["OPP-3b"]


def test_finish_round_counts_parents_caps_ids_and_clears_the_pending_round():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    n = MAX_JOB_IDS + 5
    for i in range(n):
        _upload(ledger, f"J{i:03d}", i, 10, [f"K{i:03d}"])
        ledger.job_status(f"J{i:03d}", {"state": JOB_COMPLETE, "processed": 10, "failed": 1})
    ledger.begin_round(1, ledger.finished_job_ids())
    assert ledger.pending_round == {"round": 1, "parents": [f"J{i:03d}" for i in range(n)]}
    tallies = {f"J{i:03d}": {"upserted": 9, "failed": 1 if i % 2 else 0, "retried": 0 if i % 2 else 1,
                             "by_code": {"REQUIRED_FIELD_MISSING": 1} if i % 2 else {}, "artifact": bool(i % 2)}
               for i in range(n)}
    ledger.finish_round(tallies, round_=1, submitted_any=True)
    c = ledger.counters
    assert ledger.jobs == {} and ledger.pending_round is None and ledger.rounds == 1
    assert c["upserted"] == 9 * n and c["failed"] == n // 2 and c["retried"] == n - n // 2
    assert c["by_code"] == {"REQUIRED_FIELD_MISSING": n // 2}
    assert ledger.job_count == n and len(ledger.all_job_ids()) == MAX_JOB_IDS
    assert len(ledger.data["artifact_parts"]) == n // 2


def test_progress_is_derived_from_the_jobs_and_readable_by_status():
    store = Store()
    ledger = Ledger.new(run_id="r", label="P07 [a, b)", bounds=BOUNDS)
    _upload(ledger, "750A", 0, 300, ["OPP-3"])
    _upload(ledger, "750B", 1, 200, ["OPP-5"])
    ledger.job_status("750B", {"state": ABORTED})
    ledger.phase = "waiting"
    ledger.set_progress(read=500, expected=600)
    ledger.save(store)
    progress = read_progress(store.get(LEDGER_KEY))
    assert progress["label"] == "P07 [a, b)" and progress["phase"] == "waiting"
    assert progress["read"] == 500 and progress["uploaded"] == 500
    assert progress["jobs_open"] == 1 and progress["jobs_done"] == 1
    assert read_progress({"nothing": 1}) is None


def test_job_ids_sort_by_round_then_sequence():
    ledger = Ledger.new(run_id="r", label="P00", bounds=BOUNDS)
    _upload(ledger, "F1", 5, 1, ["x"], round_=1)
    _upload(ledger, "S2", 2, 1, ["b"])
    _upload(ledger, "S1", 1, 1, ["a"])
    assert ledger.running_job_ids() == ["S1", "S2", "F1"]
    assert ledger.job_ids({UPLOAD_COMPLETE}, round_=1) == ["F1"]


@pytest.mark.parametrize("value", [None, "x", {"version": 99}])
def test_unknown_stored_values_are_ignored(value):
    store = Store()
    if value is not None:
        store.set(LEDGER_KEY, value)
    ledger, stale = Ledger.load(store, run_id="r", label="P00", bounds=BOUNDS)
    assert ledger.is_fresh and stale is None

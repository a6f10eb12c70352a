"""LoadPartitionOperator against the live emulator (Data Cloud + Bulk API 2.0 over HTTPS).

The operator runs as Airflow runs it: ``execute`` until it defers, the trigger (serialized and rebuilt, as the
triggerer does) until its one event, then ``execute_complete`` on a *new* operator instance with that event
(JSON round-tripped). The task state store is a dict-backed stand-in with the real accessor's get/set.
"""

from __future__ import annotations

import asyncio
import csv
import importlib
import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from sf_datacloud_sync.operators.load_partition import LoadPartitionOperator, SourceRows
from sf_datacloud_sync.utils.ledger import LEDGER_KEY, OPEN
from sf_datacloud_sync.utils.partitions import Partition

ROOT = Path(__file__).resolve().parents[3]
RUN_ID = "manual__2026-11-28T02:00:00+00:00"
DAG_ID = "datacloud_opportunity_sync_test"
DMO = "Opportunity_Sync__dlm"
# ~500 rows of the session's seed (2,000 rows, 50 accounts): a few jobs of 300 rows, some of the bad rows.
EXT_PARTITION = Partition(index=3, count=10, key="external_id", lower="OPP-0000100000", upper="OPP-0000100900")
ACC_PARTITION = Partition(index=1, count=10, key="account", lower="ACC-0000010", upper="ACC-0000020")


# -- harness ---------------------------------------------------------------------------------------------------------
class Store:
    """``context["task_state_store"]`` stand-in: JSON values, like the real one, and a write counter."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.data[key]) if key in self.data else default

    def set(self, key: str, value: Any) -> None:
        assert value is not None
        self.data[key] = json.dumps(value)
        self.writes += 1

    @property
    def ledger(self) -> dict[str, Any]:
        return self.get(LEDGER_KEY)


def make_context(store: Store, try_number: int = 1, run_id: str = RUN_ID) -> dict[str, Any]:
    ti = SimpleNamespace(dag_id=DAG_ID, run_id=run_id, task_id="load_partition", map_index=3, try_number=try_number)
    return {"task_state_store": store, "ti": ti, "run_id": run_id,
            "dag_run": SimpleNamespace(run_id=run_id, conf={}), "params": {"max_records_per_job": 300}}


def rebuild(trigger: Any) -> Any:
    """What the triggerer does: instantiate the trigger from ``serialize()``."""
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))


def fire(trigger: Any) -> dict[str, Any]:
    async def first() -> Any:
        events = [e async for e in trigger.run()]
        assert len(events) == 1
        return events[0]

    return json.loads(json.dumps(asyncio.run(first()).payload))


class Driver:
    """Runs one task attempt to its end: execute, then (trigger → execute_complete)* on fresh operators."""

    def __init__(self, make_op: Callable[..., LoadPartitionOperator], store: Store) -> None:
        self.make_op = make_op
        self.store = store
        self.defers = 0
        self.events: list[dict[str, Any]] = []

    def attempt(self, try_number: int = 1, *, max_defers: int = 10, **op_kwargs: Any) -> dict[str, Any]:
        context = make_context(self.store, try_number)
        op = self.make_op(**op_kwargs)
        step: Callable[[], Any] = lambda: op.execute(context)  # noqa: E731
        for _ in range(max_defers):
            try:
                return step()
            except TaskDeferred as deferred:
                self.defers += 1
                assert deferred.method_name == "execute_complete"
                assert not deferred.kwargs  # everything travels in the event or the ledger (dag.test drops kwargs)
                event = fire(rebuild(deferred.trigger))
                self.events.append(event)
                op = self.make_op(**op_kwargs)
                step = lambda op=op, event=event: op.execute_complete(context, event=event)  # noqa: E731
        raise AssertionError(f"still deferring after {max_defers} rounds")


@pytest.fixture
def sync_env(clean_emulator, monkeypatch, tmp_path):
    """Connection, artifacts folder and a settings file with test-speed timings."""
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", clean_emulator.info["airflow_conn"])
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("SYNC_ARTIFACTS_URL", f"file://{artifacts}")
    yield SimpleNamespace(emulator=clean_emulator, tmp=tmp_path, artifacts=artifacts,
                          config=write_config(tmp_path / "sync.yaml"))
    clean_emulator.set_faults(per_record_ms=0, time_scale=1.0)  # timing knobs survive clear_faults


def write_config(path: Path, **load: Any) -> str:
    raw = yaml.safe_load((ROOT / "include" / "sync_config.yaml").read_text())
    # wait_before_defer_s 0: these tests drive the deferral path (execute → trigger → execute_complete).
    raw["load"].update({"transient_backoff_s": 0.01, "poll_interval_s": 0.05, "poll_max_interval_s": 0.2,
                        "job_timeout_s": 120, "wait_before_defer_s": 0, **load})
    raw.pop("artifacts", None)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def operator_factory(env: Any, partition: Partition = EXT_PARTITION, **defaults: Any):
    def make(**overrides: Any) -> LoadPartitionOperator:
        kwargs = {"config_path": env.config, "max_records_per_job": "300", "poll_interval": 0.05, **defaults,
                  **overrides}
        return LoadPartitionOperator(task_id="load_partition", partition=partition.to_dict(), **kwargs)

    return make


def source_rows(emulator: Any, part: Partition) -> list[str]:
    """The partition's external ids straight from the emulator's Data Cloud table (binary collation)."""
    col = "AccountExternalId__c" if part.key == "account" else "ExternalId__c"
    where, args = [], []
    if part.lower is not None:
        where.append(f'"{col}" >= ?')
        args.append(part.lower)
    if part.upper is not None:
        where.append(f'"{col}" < ?')
        args.append(part.upper)
    sql = f'SELECT "ExternalId__c" FROM "{DMO}"' + (" WHERE " + " AND ".join(where) if where else "")
    with sqlite3.connect(f"file:{emulator.data_dir / 'datacloud.sqlite'}?mode=ro", uri=True) as db:
        return [r[0] for r in db.execute(sql, args)]


def opportunities(emulator: Any) -> set[str]:
    with sqlite3.connect(f"file:{emulator.data_dir / 'org.sqlite'}?mode=ro", uri=True, timeout=30) as db:
        return {r[0] for r in db.execute('SELECT "ExternalId__c" FROM "Opportunity"')}


def bad_rows(emulator: Any) -> dict[str, str]:
    """External id → the error code the seed manifest expects for it."""
    manifest = json.loads((emulator.data_dir / "seed_manifest.json").read_text())
    rows = manifest.get("bad_row_list")
    if rows is None:
        rows = manifest["bad_rows"]
    return {b["external_id"]: b["expected_error_code"] for b in rows}


def artifact_rows(url: str) -> list[dict[str, str]]:
    from airflow.sdk import ObjectStoragePath

    with ObjectStoragePath(url).open("r", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(io.StringIO(f.read())))


def ingest_jobs(emulator: Any) -> int:
    return sum(n for key, n in emulator.stats()["requests"].items() if key.startswith("POST") and "jobs/ingest" in key)


def check_summary(summary: dict[str, Any], part: Partition, expected_rows: int) -> None:
    assert summary["index"] == part.index and summary["label"] == part.label
    assert (summary["key"], summary["lower"], summary["upper"]) == (part.key, part.lower, part.upper)
    assert summary["rows"] == expected_rows
    assert summary["rows"] == summary["upserted"] + summary["failed"]
    assert sum(summary["failed_by_code"].values()) == summary["failed"]
    assert summary["dry_run"] is False
    assert len(summary["jobs"]) == min(50, summary["job_count"])
    assert len(json.dumps(summary)) < 10_000  # a summary, never rows


# -- end to end --------------------------------------------------------------------------------------------------------
def test_full_partition_end_to_end(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    bad = {k: c for k, c in bad_rows(emulator).items() if k in set(keys)}
    assert 400 < len(keys) < 1000 and bad  # the test data still looks like the test expects
    store = Store()
    driver = Driver(operator_factory(sync_env), store)

    summary = driver.attempt()

    check_summary(summary, EXT_PARTITION, len(keys))
    assert summary["job_count"] == -(-len(keys) // 300) and summary["rounds"] == 0
    assert summary["failed"] == len(bad) and summary["upserted"] == len(keys) - len(bad)
    assert summary["failed_by_code"] == {c: list(bad.values()).count(c) for c in set(bad.values())}
    assert opportunities(emulator) == set(keys) - set(bad)
    stats = emulator.stats()
    assert stats["duplicate_uploads"] == 0
    assert driver.defers == 1 and driver.events[0]["status"] == "success"
    assert set(driver.events[0]["jobs"]) == set(summary["jobs"])

    # The artifact: every permanently failed row with Salesforce's reason and the row as sent.
    assert summary["artifact"] == f"file://{sync_env.artifacts}/{DAG_ID}/{RUN_ID}/P03_OPP-00001000_OPP-00001009_failed.csv"
    rows = artifact_rows(summary["artifact"])
    assert {r["external_id"]: r["error_code"] for r in rows} == bad
    assert all(r["error_message"] and r["sf_job_id"] in summary["jobs"] for r in rows)
    assert all(r["ExternalId__c"] == r["external_id"] for r in rows)
    assert list(rows[0])[:5] == ["external_id", "error_code", "error_message", "error_fields", "ExternalId__c"]

    # The ledger is done and its progress is what `make status` prints.
    ledger = store.ledger
    assert ledger["phase"] == "done" and ledger["jobs"] == {}
    assert ledger["progress"]["read"] == len(keys) and ledger["progress"]["jobs_open"] == 0

    # A clear after success reports the same partition again and sends nothing.
    before = ingest_jobs(emulator)
    again = driver.attempt(try_number=2)
    assert {k: v for k, v in again.items() if k != "duration_s"} == \
        {k: v for k, v in summary.items() if k != "duration_s"}
    assert ingest_jobs(emulator) == before


def test_account_partition_streams_in_account_order(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, ACC_PARTITION)
    bad = {k for k in bad_rows(emulator) if k in set(keys)}
    store = Store()
    summary = Driver(operator_factory(sync_env, ACC_PARTITION), store).attempt()
    check_summary(summary, ACC_PARTITION, len(keys))
    assert summary["upserted"] == len(keys) - len(bad)
    # Keys are (account, external id): the committed key has both columns.
    committed = store.ledger["stream"]["committed"]
    assert len(committed) == 2 and ACC_PARTITION.lower <= committed[0] < ACC_PARTITION.upper


def largest_accounts(emulator: Any, n: int) -> list[tuple[str, int]]:
    with sqlite3.connect(f"file:{emulator.data_dir / 'datacloud.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(f'SELECT "AccountExternalId__c", COUNT(*) FROM "{DMO}" WHERE "AccountExternalId__c" IS NOT '
                          'NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?', (n,)).fetchall()


def _run_serial_lane(sync_env: Any, monkeypatch: Any, *, early_close_min_s: float, per_record_ms: int,
                     accounts: int = 2, dequeue_s: float = 0.5) -> dict[str, Any]:
    """Load a lane of the largest Accounts in jobs of at most 40 rows, checking at every close which earlier jobs
    have not processed all their rows yet: ``early`` (the newest, InProgress) or ``overlaps`` (anything else)."""
    import sf_datacloud_sync.utils.serial_pacing as pacing
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
    from sf_datacloud_sync.utils.ledger import Ledger

    emulator = sync_env.emulator
    largest = largest_accounts(emulator, accounts)
    total = sum(n for _, n in largest)
    assert total > 80  # several jobs
    lane = Partition(index=0, count=4, key="account", lower=None, upper=None, expected_rows=total,
                     accounts=tuple(a for a, _ in largest))
    seen: dict[str, Any] = {"records": {}, "closed": [], "overlaps": [], "early": [], "lane": lane, "total": total}
    close_job, job_opened = SalesforceBulk2Hook.close_job, Ledger.job_opened

    def checked_close(self: SalesforceBulk2Hook, job_id: str) -> dict[str, Any]:
        for earlier in seen["closed"]:
            info = self.get_job(earlier)
            done = info["state"] in ("JobComplete", "Failed", "Aborted") or \
                info["numberRecordsProcessed"] >= seen["records"][earlier]
            if not done and earlier == seen["closed"][-1] and info["state"] == "InProgress":
                seen["early"].append(earlier)
            elif not done:
                seen["overlaps"].append((earlier, info))
        seen["closed"].append(job_id)
        return close_job(self, job_id)

    def opened(self: Ledger, job_id: str, **kw: Any) -> None:
        seen["records"][job_id] = kw["records"]
        job_opened(self, job_id, **kw)

    monkeypatch.setattr(SalesforceBulk2Hook, "close_job", checked_close)
    monkeypatch.setattr(Ledger, "job_opened", opened)
    monkeypatch.setattr(pacing, "EARLY_CLOSE_MIN_TOOK_S", early_close_min_s)
    # 10-row transactions: the job counts its rows up as it goes. A job leaves the queue dequeue_s after its close.
    emulator.control("PUT", "profile", {"name": "instant", "per_record_ms": per_record_ms, "chunk_records": 10,
                                        "job_dequeue_delay_s": dequeue_s})
    config = write_config(sync_env.tmp / "serial.yaml", serial_job_records=40)
    make = operator_factory(SimpleNamespace(config=config), lane)
    try:
        seen["summary"] = Driver(lambda **kw: make(**kw), Store()).attempt()
    finally:
        emulator.control("PUT", "profile", {"name": "instant"})
    summary, records = seen["summary"], seen["records"]
    check_summary(summary, lane, total)
    assert summary["job_count"] == len(seen["closed"]) == -(-total // 40)
    assert max(records.values()) <= 40 and sum(records.values()) == total
    assert summary["upserted"] == total - len(set(bad_rows(emulator)) & _lane_keys(emulator, lane))
    assert emulator.stats()["duplicate_uploads"] == 0
    return seen


@pytest.mark.parametrize("early_close", [False, True])
def test_serial_lane_keeps_one_job_at_a_time(sync_env, monkeypatch, early_close):
    """A lane of the two largest Accounts, in jobs of at most 40 rows. Each job is closed once the ones before it
    have processed all their rows; with early closes (batches that take long at the org) the newest one may still be
    InProgress, never queued, and never more than one."""
    # 40 rows at 20 ms: 0.8 s of processing per job after a 0.5 s dequeue, "long" when the threshold is lowered to
    # 0.5 s; a job leaves the
    # queue 0.5 s after its close, so an early close lands while the job before is running.
    seen = _run_serial_lane(sync_env, monkeypatch, early_close_min_s=0.5 if early_close else 1e9, per_record_ms=20)
    assert seen["overlaps"] == []
    assert bool(seen["early"]) == early_close  # the early path was taken (the emulator's chunks make it InProgress)


def test_serial_lane_closes_its_second_job_early_from_the_first_jobs_rate(sync_env, monkeypatch):
    """The first job's duration is unknown until it ends, but the org counts its rows up: once a quarter of them are
    processed, their rate and the job's own dequeue delay let the second job be closed before the first ends."""
    # 40 rows at 50 ms in 10-row transactions: 2 s per job, the rate readable after ~1 s. The first job's dequeue
    # delay (1.5 s) is known to within a look; the second job is closed counting with the shortest it can have been,
    # still ~1.4 s before the first ends.
    seen = _run_serial_lane(sync_env, monkeypatch, early_close_min_s=0.5, per_record_ms=50, accounts=1, dequeue_s=1.5)
    assert seen["overlaps"] == []
    assert seen["closed"][0] in seen["early"]


def _lane_keys(emulator: Any, lane: Partition) -> set[str]:
    with sqlite3.connect(f"file:{emulator.data_dir / 'datacloud.sqlite'}?mode=ro", uri=True) as db:
        marks = ", ".join("?" * len(lane.accounts))
        return {r[0] for r in db.execute(f'SELECT "ExternalId__c" FROM "{DMO}" WHERE "AccountExternalId__c" IN '
                                         f'({marks})', lane.accounts)}


def spy_sources(monkeypatch: Any) -> list[SourceRows]:
    """Every :class:`SourceRows` opened from now on (their ``read`` counts what each query handed out)."""
    sources: list[SourceRows] = []
    real_init = SourceRows.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        sources.append(self)

    monkeypatch.setattr(SourceRows, "__init__", spy_init)
    return sources


# -- transient failures ------------------------------------------------------------------------------------------------
def test_lock_errors_are_resent_until_upserted(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    bad = {k for k in bad_rows(emulator) if k in set(keys)}
    # Concurrent jobs on the same Accounts: rows fail UNABLE_TO_LOCK_ROW (external-id partitions interleave Accounts).
    emulator.set_faults(lock_contention_rate=0.9, per_record_ms=30, time_scale=30.0)
    store = Store()
    driver = Driver(operator_factory(sync_env, max_records_per_job="150"), store)

    summary = driver.attempt()

    check_summary(summary, EXT_PARTITION, len(keys))
    assert summary["retried"] > 0 and summary["rounds"] >= 1
    assert "UNABLE_TO_LOCK_ROW" not in summary["failed_by_code"]  # all of them made it in a follow-up job
    assert summary["failed"] == len(bad)
    assert opportunities(emulator) == set(keys) - bad
    assert emulator.stats()["failures_by_code"].get("UNABLE_TO_LOCK_ROW", 0) > 0
    assert driver.defers == summary["rounds"] + 1


def test_lock_errors_beyond_the_budget_go_to_the_artifact(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    emulator.set_faults(lock_contention_rate=1.0, per_record_ms=30, time_scale=30.0)
    sync_env.config = write_config(sync_env.tmp / "budget0.yaml", transient_retry_budget=0)
    summary = Driver(operator_factory(sync_env, max_records_per_job="150"), Store()).attempt()
    check_summary(summary, EXT_PARTITION, len(keys))
    assert summary["rounds"] == 0 and summary["retried"] == 0
    locked = summary["failed_by_code"].get("UNABLE_TO_LOCK_ROW", 0) + summary["failed_by_code"].get("UNPROCESSED", 0)
    assert locked > 0
    codes = {r["error_code"] for r in artifact_rows(summary["artifact"])}
    assert codes & {"UNABLE_TO_LOCK_ROW", "UNPROCESSED"}


def test_job_failed_for_a_transient_reason_resends_its_unprocessed_rows(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    bad = {k for k in bad_rows(emulator) if k in set(keys)}
    emulator.set_faults(fail_job_after_records=100)  # "Unknown : Internal server error" after 100 rows
    store = Store()
    make = operator_factory(sync_env)
    with pytest.raises(TaskDeferred) as deferred:
        make().execute(make_context(store))
    event = fire(rebuild(deferred.value.trigger))
    assert {j["state"] for j in event["jobs"].values()} == {"Failed"}
    emulator.set_faults(fail_job_after_records=0)
    with pytest.raises(TaskDeferred) as again:  # the follow-up round
        make().execute_complete(make_context(store), event=event)
    ledger = store.ledger
    assert ledger["rounds"] == 1 and all(j["round"] == 1 for j in ledger["jobs"].values())
    summary = make().execute_complete(make_context(store), event=fire(rebuild(again.value.trigger)))
    check_summary(summary, EXT_PARTITION, len(keys))
    assert summary["failed"] == len(bad) and summary["retried"] > 0
    assert opportunities(emulator) == set(keys) - bad


def test_job_failed_for_a_setup_reason_fails_the_task_then_a_clear_resends(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    raw = yaml.safe_load(Path(sync_env.config).read_text())
    raw["mapping"]["Type__c"] = "Typo__c"  # not a field of Opportunity
    broken = sync_env.tmp / "broken.yaml"
    broken.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = Store()
    driver = Driver(operator_factory(sync_env), store)
    with pytest.raises(AirflowFailException, match="InvalidBatch : Field name not found : Typo__c"):
        driver.attempt(config_path=str(broken))
    assert store.ledger["phase"] == "failed"
    # The user fixes the mapping and clears the partition: the failed jobs' rows are read and sent again.
    summary = driver.attempt(try_number=2)
    check_summary(summary, EXT_PARTITION, len(keys))
    assert summary["failed"] == len({k for k in bad_rows(emulator) if k in set(keys)})


# -- resume ------------------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_mid_partition(sync_env, monkeypatch):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    store = Store()
    driver = Driver(operator_factory(sync_env), store)
    original = SourceRows.__iter__

    def crash_after(n: int):
        def rows(self):
            for i, row in enumerate(original(self)):
                if i == n:
                    raise ConnectionResetError("worker lost its connection mid-stream")
                yield row
        return rows

    # Reading the third chunk means the first one's upload is complete (two chunks in flight at most); the
    # second may or may not have started when the stream broke.
    monkeypatch.setattr(SourceRows, "__iter__", crash_after(650))
    with pytest.raises(ConnectionResetError):
        driver.attempt()
    first = store.ledger
    committed_rows = first["counters"]["rows"]
    assert first["stream"]["done"] is False and committed_rows in (300, 600)
    first_jobs = set(first["jobs"])
    # A hard crash can also leave a job created whose upload was never confirmed: it must be aborted, not used.
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    orphan = SalesforceBulk2Hook().create_ingest_job("Opportunity", "upsert", "ExternalId__c")["id"]
    first["jobs"][orphan] = {"seq": 99, "round": 0, "attempt": 1, "state": OPEN, "records": 300,
                             "last": ["OPP-0000100999"], "processed": 0, "failed": 0, "error": None}
    store.set(LEDGER_KEY, first)

    monkeypatch.setattr(SourceRows, "__iter__", original)
    reads = spy_sources(monkeypatch)
    summary = driver.attempt(try_number=2)

    check_summary(summary, EXT_PARTITION, len(keys))
    assert emulator.stats()["duplicate_uploads"] == 0
    assert first_jobs <= set(summary["jobs"]) and orphan not in summary["jobs"]
    assert SalesforceBulk2Hook().get_job(orphan)["state"] == "Aborted"
    # The second attempt read only what was not committed yet.
    assert reads[0].read == len(keys) - committed_rows
    assert opportunities(emulator) == set(keys) - set(bad_rows(emulator))


def test_retry_while_deferred_reattaches_without_uploading_again(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    emulator.set_faults(per_record_ms=10)  # jobs still running when the "worker dies" (and at the retry, under load)
    store = Store()
    make = operator_factory(sync_env)
    with pytest.raises(TaskDeferred) as first:
        make().execute(make_context(store))
    jobs = sorted(first.value.trigger.job_ids)
    uploads = emulator.stats()["requests"]
    # The trigger never fired (triggerer lost, task failed by a timeout...); the retry starts with execute().
    with pytest.raises(TaskDeferred) as second:
        make().execute(make_context(store, try_number=2))
    assert sorted(second.value.trigger.job_ids) == jobs
    assert emulator.stats()["requests"].get("PUT /jobs/ingest/{id}/batches") == \
        uploads.get("PUT /jobs/ingest/{id}/batches")
    emulator.set_faults(per_record_ms=0)
    summary = make().execute_complete(make_context(store, try_number=2), event=fire(rebuild(second.value.trigger)))
    check_summary(summary, EXT_PARTITION, len(keys))
    assert sorted(summary["jobs"]) == jobs and emulator.stats()["duplicate_uploads"] == 0


def test_jobs_still_running_at_the_deadline_fail_the_task_as_still_running(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    emulator.set_faults(per_record_ms=5)
    sync_env.config = write_config(sync_env.tmp / "short.yaml", job_timeout_s=0.3)
    store = Store()
    driver = Driver(operator_factory(sync_env), store)
    with pytest.raises(AirflowException, match="STILL RUNNING") as info:
        driver.attempt()
    assert driver.events[-1]["status"] == "timeout"
    running = store.ledger["jobs"]
    assert any(job_id in str(info.value) for job_id in running)
    assert "failed rows" not in str(info.value)
    emulator.set_faults(per_record_ms=0)
    sync_env.config = write_config(sync_env.tmp / "long.yaml")
    summary = driver.attempt(try_number=2)  # re-attaches to the same jobs
    check_summary(summary, EXT_PARTITION, len(keys))
    assert set(running) <= set(summary["jobs"]) and emulator.stats()["duplicate_uploads"] == 0


def test_new_dag_run_starts_from_an_empty_ledger(sync_env):
    keys = source_rows(sync_env.emulator, EXT_PARTITION)
    store = Store()
    make = operator_factory(sync_env)
    with pytest.raises(TaskDeferred):
        make().execute(make_context(store))
    old_jobs = set(store.ledger["jobs"])
    summary = Driver(make, store).attempt()  # same store, other run id below
    assert set(summary["jobs"]) == old_jobs  # same run: re-attached
    with pytest.raises(TaskDeferred) as other:
        make().execute(make_context(store, run_id="scheduled__2026-11-29T02:00:00+00:00"))
    assert store.ledger["run_id"].startswith("scheduled__")
    assert not set(other.value.trigger.job_ids) & old_jobs
    assert store.ledger["counters"]["rows"] == len(keys)


# -- kill ---------------------------------------------------------------------------------------------------------------
def test_on_kill_aborts_open_jobs_and_a_clear_finishes_the_partition(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    emulator.set_faults(per_record_ms=5)
    store = Store()
    make = operator_factory(sync_env)
    op = make()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(make_context(store))
    jobs = deferred.value.trigger.job_ids
    op.on_kill()  # mark failed / emergency stop
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    hook = SalesforceBulk2Hook()
    assert {hook.get_job(j)["state"] for j in jobs} == {"Aborted"}
    # The trigger-side kill does the same for a deferred task (tested in tests/plugins/triggers).
    emulator.set_faults(per_record_ms=0)
    summary = Driver(make, store).attempt(try_number=2)  # cleared: unprocessed rows of the aborted jobs go again
    check_summary(summary, EXT_PARTITION, len(keys))
    assert summary["retried"] > 0 and emulator.stats()["duplicate_uploads"] == 0
    assert opportunities(emulator) == set(keys) - set(bad_rows(emulator))


# -- dry run and details -------------------------------------------------------------------------------------------------
def test_dry_run_writes_nothing(sync_env):
    emulator = sync_env.emulator
    keys = source_rows(emulator, EXT_PARTITION)
    store = Store()
    op = operator_factory(sync_env)(dry_run="True")
    summary = op.execute(make_context(store))
    assert summary["dry_run"] is True and summary["rows"] == len(keys)
    assert summary["would_create_jobs"] == -(-len(keys) // 300) and summary["upserted"] == 0
    assert ingest_jobs(emulator) == 0 and opportunities(emulator) == set()
    assert store.data == {}


def test_dry_run_reports_header_fields_salesforce_does_not_have(sync_env):
    raw = yaml.safe_load(Path(sync_env.config).read_text())
    raw["mapping"]["Type__c"] = "Typo__c"
    raw["mapping"]["AccountExternalId__c"] = "Account.Name__c"
    path = sync_env.tmp / "typo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    op = operator_factory(sync_env)(dry_run=True, config_path=str(path))
    with pytest.raises(AirflowFailException) as info:
        op.execute(make_context(Store()))
    assert "Typo__c: Opportunity has no such field" in str(info.value)
    assert "Account.Name__c: Account has no field Name__c" in str(info.value)


def test_non_deferrable_mode_waits_in_the_worker(sync_env):
    keys = source_rows(sync_env.emulator, EXT_PARTITION)
    summary = operator_factory(sync_env, deferrable=False)().execute(make_context(Store()))
    check_summary(summary, EXT_PARTITION, len(keys))


def test_jobs_that_finish_within_wait_before_defer_s_are_waited_for_without_deferring(sync_env):
    keys = source_rows(sync_env.emulator, EXT_PARTITION)
    config = write_config(sync_env.tmp / "inline.yaml", wait_before_defer_s=30)
    store = Store()
    driver = Driver(operator_factory(sync_env, config_path=config), store)
    summary = driver.attempt()
    check_summary(summary, EXT_PARTITION, len(keys))
    assert driver.defers == 0 and store.ledger["phase"] == "done"


def test_jobs_still_running_after_wait_before_defer_s_are_handed_to_the_triggerer(sync_env):
    sync_env.emulator.set_faults(per_record_ms=3)  # ~1 s per 300-row job: longer than the short wait
    config = write_config(sync_env.tmp / "short.yaml", wait_before_defer_s=0.2)
    driver = Driver(operator_factory(sync_env, config_path=config), Store())
    summary = driver.attempt()
    check_summary(summary, EXT_PARTITION, len(source_rows(sync_env.emulator, EXT_PARTITION)))
    assert driver.defers >= 1


def test_templated_fields_and_label():
    op = LoadPartitionOperator(task_id="t", partition=EXT_PARTITION.to_dict(), max_records_per_job="{{ x }}")
    assert {"max_records_per_job", "dry_run"} <= set(op.template_fields)
    assert op.partition_label == "P03 [OPP-00001000…, OPP-00001009…)"
    op.max_records_per_job = "0"
    with pytest.raises(AirflowFailException):
        _ = op.records_per_job


def test_each_chunk_is_in_the_ledger_with_its_rows_and_keys_before_its_upload(sync_env, monkeypatch):
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    store = Store()
    seen: list[tuple[dict[str, Any], list[list[str]]]] = []
    upload = SalesforceBulk2Hook.upload_job_data

    def spy(self, job_id, data):
        raw = data if isinstance(data, bytes) else data.read()
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))[1:]
        seen.append((dict(store.ledger["jobs"][job_id]), rows))
        return upload(self, job_id, raw)

    monkeypatch.setattr(SalesforceBulk2Hook, "upload_job_data", spy)
    summary = Driver(operator_factory(sync_env), store).attempt()
    assert len(seen) == summary["job_count"] >= 2
    for entry, rows in seen:
        # The transfer's own figures, recorded before a byte was sent: a crash mid-upload still finds the job.
        assert entry["state"] == OPEN and entry["records"] == len(rows)
        assert entry["first"] == [rows[0][0]] and entry["last"] == [rows[-1][0]]


def test_ledger_bulk_refuses_to_upload_without_the_chunk_figures():
    from sf_datacloud_sync.operators.load_partition import LedgerBulk

    bulk = LedgerBulk(SimpleNamespace(max_upload_bytes=100), SimpleNamespace(), round_=0)
    with pytest.raises(TypeError, match="on_job_created"):
        bulk.submit_ingest_job("Opportunity", b"", external_id_field="ExternalId__c")

def test_source_rows_query_again_after_an_expired_result():
    """Data Cloud dropped the result mid-read: the query is submitted again strictly after the last row handed out."""
    from sf_datacloud_sync.config import load_config
    from sf_datacloud_sync.hooks.datacloud import DataCloudQueryExpired

    cfg = load_config()
    data = [tuple([f"OPP-{i:03d}", f"ACC-{i % 3}"] + [None] * (len(cfg.source_columns) - 2)) for i in range(10)]

    class Result:
        def __init__(self, rows, fail_after):
            self.rows, self.fail_after, self.types, self.closed = rows, fail_after, ["Varchar"] * len(data[0]), False

        def __iter__(self):
            for i, row in enumerate(self.rows):
                if i == self.fail_after:
                    raise DataCloudQueryExpired("q1", i)
                yield row

        def close(self):
            self.closed = True

    class Hook:
        def __init__(self):
            self.calls = []

        def query(self, sql, params):
            self.calls.append(params)
            if len(self.calls) == 1:
                return Result(data, fail_after=4)
            start = [r[0] for r in data].index(params["after_0"]) + 1
            return Result(data[start:], fail_after=None)

    hook = Hook()
    source = SourceRows(hook, EXT_PARTITION, cfg, after=None, log=SimpleNamespace(warning=lambda *a: None))
    assert [r[0] for r in source] == [r[0] for r in data]
    assert source.read == 10
    assert hook.calls[1]["after_0"] == "OPP-003"  # the last row handed out before the result expired


# -- a group of serial partitions in one task ---------------------------------------------------------------------------
def account_group(emulator: Any) -> Partition:
    members = []
    for i, (lo, hi) in enumerate((("ACC-0000010", "ACC-0000020"), ("ACC-0000020", "ACC-0000030"),
                                  ("ACC-0000030", "ACC-0000033"))):
        part = Partition(index=i, count=3, key="account", lower=lo, upper=hi)
        members.append(Partition(index=i, count=3, key="account", lower=lo, upper=hi,
                                 expected_rows=len(source_rows(emulator, part))))
    return Partition(index=2, count=4, key="account", lower=None, upper=None,
                     expected_rows=sum(m.expected_rows for m in members), members=tuple(members))


def group_keys(emulator: Any, group: Partition) -> list[str]:
    return [k for m in group.members for k in source_rows(emulator, m)]


def test_group_loads_one_batch_of_each_member_per_job(sync_env, monkeypatch):
    from sf_datacloud_sync.utils.ledger import Ledger

    emulator = sync_env.emulator
    group = account_group(emulator)
    keys = group_keys(emulator, group)
    sizes = [m.expected_rows for m in group.members]
    assert min(sizes) < 150 < max(sizes)  # a member that ends within the first job, others that take several
    jobs: list[dict[str, Any]] = []
    job_opened = Ledger.job_opened
    monkeypatch.setattr(Ledger, "job_opened", lambda self, job_id, **kw: (jobs.append(kw), job_opened(self, job_id,
                                                                                                         **kw))[1])
    config = write_config(sync_env.tmp / "group.yaml", serial_job_records=150)
    store = Store()
    summary = Driver(operator_factory(SimpleNamespace(config=config), group), store).attempt()

    check_summary(summary, group, len(keys))
    bad = set(bad_rows(emulator)) & set(keys)
    assert summary["upserted"] == len(keys) - len(bad) and summary["failed"] == len(bad)
    assert opportunities(emulator) >= set(keys) - bad
    assert emulator.stats()["duplicate_uploads"] == 0
    # As many jobs as the largest member has batches of 150, each taking up to 150 rows of every member left.
    assert summary["job_count"] == -(-max(sizes) // 150) == len(jobs)
    sent = [0, 0, 0]
    for job in jobs:
        marks = job["last_key"]
        taken = [mark["sent"] - before for mark, before in zip(marks, sent, strict=True)]
        assert all(0 <= t <= 150 for t in taken) and sum(taken) == job["records"]
        sent = [mark["sent"] for mark in marks]
    assert sent == sizes
    assert store.ledger["stream"]["committed"] == jobs[-1]["last_key"]
    assert summary["label"].startswith("P02 3 lanes ACC-0000010")


def test_group_resumes_each_member_after_its_own_last_committed_row(sync_env, monkeypatch):
    emulator = sync_env.emulator
    group = account_group(emulator)
    keys = group_keys(emulator, group)
    config = write_config(sync_env.tmp / "group.yaml", serial_job_records=150)
    store = Store()
    driver = Driver(operator_factory(SimpleNamespace(config=config), group), store)
    original = SourceRows.__iter__
    handed = {"n": 0}

    def crashing(self):
        for row in original(self):
            handed["n"] += 1
            if handed["n"] > 850:  # in the third job (441 + 300 rows before it)
                raise ConnectionResetError("worker lost its connection mid-stream")
            yield row

    monkeypatch.setattr(SourceRows, "__iter__", crashing)
    with pytest.raises(ConnectionResetError):
        driver.attempt()
    first = store.ledger
    committed = first["counters"]["rows"]
    assert first["stream"]["done"] is False and 0 < committed < len(keys)
    assert sum(mark["sent"] for mark in first["stream"]["committed"]) == committed

    monkeypatch.setattr(SourceRows, "__iter__", original)
    sources = spy_sources(monkeypatch)
    summary = driver.attempt(try_number=2)

    check_summary(summary, group, len(keys))
    assert emulator.stats()["duplicate_uploads"] == 0
    assert sum(source.read for source in sources) == len(keys) - committed  # nothing committed is read again
    assert opportunities(emulator) >= set(keys) - set(bad_rows(emulator))


def test_group_source_closes_the_queries_it_opened_when_one_fails(sync_env, monkeypatch):
    from sf_datacloud_sync.config import load_config
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook
    from sf_datacloud_sync.operators.load_partition import GroupRows

    group = account_group(sync_env.emulator)
    real_init, real_close = SourceRows.__init__, SourceRows.close
    opened, closed = [], []

    def init(self, hook, part, cfg, **kw):
        if part.lower == group.members[1].lower:
            raise ConnectionResetError("Data Cloud went away")
        real_init(self, hook, part, cfg, **kw)
        opened.append(part.lower)

    def close(self):
        closed.append(self.part.lower)
        real_close(self)

    monkeypatch.setattr(SourceRows, "__init__", init)
    monkeypatch.setattr(SourceRows, "close", close)
    with pytest.raises(ConnectionResetError, match="went away"):
        GroupRows(DataCloudHook(), group, load_config(sync_env.config), after=None, log=None)
    assert sorted(opened) == sorted(closed) == [group.members[0].lower, group.members[2].lower]

"""The whole DAG under ``dag.test()`` against a live emulator: every row checked field by field afterwards.

One emulator for the module, seeded with 20,000 rows (30 that Salesforce rejects, 5 without an external id).
``dag.test()`` runs the mapped partitions one after the other in-process and runs the triggers inline, so
partitions never overlap in time here; lock contention is therefore exercised *within* a partition (several
Bulk jobs of one partition, and Salesforce's parallel internal batches of one job, run at the same time).
"""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emulator.harness import EmulatorProcess
from tests.e2e_support import DC_COLUMNS, SF_COLUMNS, manifest, norm, run, states, xcom

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "datacloud_opportunity_sync"
RECORDS = 20_000
BAD_ROWS = 30
NULL_KEYS = 5


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    data_dir = tmp_path_factory.mktemp("e2e_org")
    # The harness's seed() has no --null-keys; the CLI does.
    subprocess.run([sys.executable, "-m", "emulator", "seed", "--data-dir", str(data_dir), "--records", str(RECORDS),
                    "--bad-rows", str(BAD_ROWS), "--null-keys", str(NULL_KEYS), "--random-seed", "11"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc = EmulatorProcess(data_dir)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def airflow_env(org: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh metadata DB with the pool, the emulator as ``salesforce_default`` and fast polling settings."""
    work = tmp_path_factory.mktemp("e2e_airflow")
    settings = yaml.safe_load((ROOT / "include" / "sync_config.yaml").read_text())
    settings["load"].update(transient_backoff_s=0.2, poll_interval_s=0.1, poll_max_interval_s=0.5)
    (work / "sync_config.yaml").write_text(yaml.safe_dump(settings))
    env = {
        "AIRFLOW_CONN_SALESFORCE_DEFAULT": org.info["airflow_conn"],
        "SYNC_CONFIG_PATH": str(work / "sync_config.yaml"),
        "SYNC_ARTIFACTS_URL": f"file://{work}/artifacts",
        "SYNC_DEADLINE_HOURS": "0",  # dag.test() on 3.3.2 crashes on a successful run with a deadline alert
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from airflow.utils import db

    from sf_datacloud_sync.setup import ensure_pool

    db.resetdb()
    assert ensure_pool()["include_deferred"] is True
    try:
        yield work
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def dag(airflow_env: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


@pytest.fixture
def fresh_org(org: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """No Opportunities, no faults, zero stats (Accounts and Data Cloud stay as seeded)."""
    org.reset()
    org.clear_faults()
    yield org
    org.clear_faults()


# -- helpers ---------------------------------------------------------------------------------------------------

# run, states, xcom, manifest, norm: shared with tests/scenarios (tests/e2e_support.py).


def assert_every_row_matches(org: EmulatorProcess) -> None:
    """Field-level equality of every Data Cloud row that can load with its Opportunity (Account joined)."""
    bad_ids = {b["external_id"] for b in manifest(org)["bad_row_list"]}
    with sqlite3.connect(f"file:{org.data_dir / 'datacloud.sqlite'}?mode=ro", uri=True) as dc:
        source = {r[0]: r for r in dc.execute(
            f'SELECT {", ".join(chr(34) + c + chr(34) for c in DC_COLUMNS)} FROM "Opportunity_Sync__dlm" '
            f'WHERE "ExternalId__c" IS NOT NULL')}
    with sqlite3.connect(f"file:{org.data_dir / 'org.sqlite'}?mode=ro", uri=True) as sf:
        target = {r[0]: r for r in sf.execute(
            f'SELECT {", ".join(SF_COLUMNS)} FROM "Opportunity" o LEFT JOIN "Account" a ON a."Id" = o."AccountId"')}
    assert len(source) == RECORDS - NULL_KEYS
    assert set(target) == set(source) - bad_ids
    mismatches = [(key, field, src[i], target[key][i])
                  for key, src in source.items() if key in target
                  for i, field in enumerate(DC_COLUMNS)
                  if norm(field, src[i]) != norm(field, target[key][i])]
    assert mismatches[:10] == [] and len(mismatches) == 0


def assert_bad_rows_in_artifacts(org: EmulatorProcess, summary: dict[str, Any]) -> None:
    """Every rejected row is in a partition's CSV with Salesforce's error code, and nothing else is."""
    rows: dict[str, dict[str, str]] = {}
    for url in summary["artifacts"]:
        path = Path(url.removeprefix("file://"))
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                # Columns hold the values as sent: a NULL goes to Bulk API as "#N/A".
                key = row["external_id"]
                rows[key if key not in ("", "#N/A") else f"<null {len(rows)}>"] = row
    bad = manifest(org)["bad_row_list"]
    for b in bad:
        assert rows[b["external_id"]]["error_code"] == b["expected_error_code"], b
        assert rows[b["external_id"]]["error_message"]
    nulls = [r for k, r in rows.items() if k.startswith("<null")]
    assert len(nulls) == NULL_KEYS and {r["error_code"] for r in nulls} == {"MISSING_ARGUMENT"}
    assert len(rows) == BAD_ROWS + NULL_KEYS


def assert_green(dr: Any, org: EmulatorProcess) -> dict[str, Any]:
    from airflow.utils.state import DagRunState, TaskInstanceState

    assert dr.state == DagRunState.SUCCESS, states(dr)
    assert set(states(dr).values()) == {TaskInstanceState.SUCCESS}
    summary = xcom(dr, "verify")
    assert summary["ok"] and summary["problems"] == []
    assert summary["rows"] == RECORDS and summary["failed"] == BAD_ROWS + NULL_KEYS
    assert summary["upserted"] == RECORDS - BAD_ROWS - NULL_KEYS
    assert summary["salesforce_count"] == summary["expected_salesforce_count"] == RECORDS - BAD_ROWS - NULL_KEYS
    assert "UNABLE_TO_LOCK_ROW" not in summary["failed_by_code"]
    assert org.stats()["duplicate_uploads"] == 0
    return summary


# -- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition_key", ["account", "external_id"])
def test_every_row_arrives_field_by_field(dag: Any, fresh_org: EmulatorProcess, partition_key: str) -> None:
    dr = run(dag, fresh_org, partitions=4, partition_key=partition_key)
    summary = assert_green(dr, fresh_org)
    partitions = xcom(dr, "discover")
    assert len(partitions) == 4 + (partition_key == "external_id")  # + the NULL-key bucket
    labels = {ti.map_index: ti.rendered_map_index for ti in dr.get_task_instances() if ti.task_id == "load_partition"}
    assert labels == {p["partition"]["index"]: p["partition"]["label"] for p in partitions}
    if partition_key == "external_id":  # balanced on the real distribution, not on min..max
        sizes = [p["partition"]["expected_rows"] for p in partitions if not p["partition"]["null_bucket"]]
        assert max(sizes) - min(sizes) <= 1
    assert_every_row_matches(fresh_org)
    assert_bad_rows_in_artifacts(fresh_org, summary)


def test_partitions_per_task_loads_groups_of_partitions(dag: Any, fresh_org: EmulatorProcess) -> None:
    """Four serial partitions in two tasks: every row arrives, every bad row is reported, verify reconciles per task."""
    dr = run(dag, fresh_org, partitions=4, partitions_per_task=2)
    summary = assert_green(dr, fresh_org)
    groups = [p["partition"] for p in xcom(dr, "discover")]
    assert [len(g["members"]) for g in groups] == [2, 2]
    labels = {ti.map_index: ti.rendered_map_index for ti in dr.get_task_instances() if ti.task_id == "load_partition"}
    assert labels == {g["index"]: g["label"] for g in groups} and all(" 2 lanes " in g["label"] for g in groups)
    assert_every_row_matches(fresh_org)
    assert_bad_rows_in_artifacts(fresh_org, summary)


def test_second_night_updates_in_place(dag: Any, fresh_org: EmulatorProcess) -> None:
    """Running again over a loaded org changes nothing in the counts: upserts update, verify stays exact."""
    assert_green(run(dag, fresh_org, partitions=3), fresh_org)
    summary = assert_green(run(dag, fresh_org, partitions=5, partition_key="external_id"), fresh_org)
    assert summary["salesforce_count_before"] == RECORDS - BAD_ROWS - NULL_KEYS
    assert fresh_org.stats()["bulk_jobs_created"] >= 5
    assert_every_row_matches(fresh_org)


def test_account_partitioning_avoids_lock_contention(dag: Any, org: EmulatorProcess) -> None:
    """Same data, same contention: partitioning by Account loses far fewer rows to locks, and none for good.

    Salesforce splits a job into internal batches that run in parallel; Opportunities lock their Account, so
    two batches touching the same Account contend. Small internal batches make a partition's job run as
    many parallel batches -- the situation of several partitions loading at once in production.
    """
    locks = {}
    try:
        org.control("PUT", "profile", {"name": "instant", "internal_batch_records": 1_000, "per_record_ms": 0.02,
                                           "lock_wait_timeout_s": 0.01})
        for key in ("external_id", "account"):
            org.reset()
            org.set_faults(lock_contention_rate=0.3)
            dr = run(dag, org, partitions=4, partition_key=key)
            assert_green(dr, org)  # every transient lock failure was re-sent and ended upserted
            locks[key] = org.stats()["failures_by_code"].get("UNABLE_TO_LOCK_ROW", 0)
            assert xcom(dr, "verify")["retried"] >= locks[key]
            assert_every_row_matches(org)
    finally:
        org.clear_faults()
        org.control("PUT", "profile", {"name": "instant"})
    assert locks["external_id"] > 100, locks
    assert locks["account"] * 5 < locks["external_id"], locks


def _drive(dag: Any, dr: Any) -> Any:
    """What the scheduler does after a clear, done the way ``dag.test()`` does it: run whatever is schedulable."""
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:
        dr = session.merge(dr)
        dr.dag = scheduler_dag
        dr.state = DagRunState.RUNNING
        session.commit()
        while dr.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = dr.update_state(session=session)
            for ti in schedulable:
                ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            for ti in [t for t in dr.get_task_instances(session=session) if t.state == TaskInstanceState.SCHEDULED]:
                try:
                    _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
                except Exception:  # dag.test() logs and carries on; the TI state says what happened
                    pass
            session.commit()
        return dr


def test_clearing_one_failed_partition_resumes_it_and_sends_nothing_twice(dag: Any, fresh_org: EmulatorProcess) -> None:
    from airflow.models.taskinstance import clear_task_instances
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    load = dag.get_task("load_partition")
    saved = load.partial_kwargs["retries"]
    load.partial_kwargs["retries"] = 0  # fail for good on the first error: the partition waits for a human
    try:
        # The first job-close request of the run gets a non-retryable 400: that partition fails after its first
        # job's rows were uploaded (the ledger knows they are at Salesforce); the other partitions load.
        fresh_org.set_faults(rules=[{"path": r"/jobs/ingest/[^/]+/?$", "methods": ["PATCH"], "status": 400,
                                     "rate": 1.0, "remaining": 1}])
        dr = run(dag, fresh_org, partitions=4, partition_key="account", max_records_per_job=2_000)
    finally:
        load.partial_kwargs["retries"] = saved
    first = states(dr)
    failed = [idx for (task, idx), state in first.items() if task == "load_partition" and state == "failed"]
    assert dr.state == DagRunState.FAILED and len(failed) == 1, first
    assert first[("verify", -1)] == TaskInstanceState.FAILED  # the missing partition fails the run
    uploads_before = fresh_org.stats()["bulk_uploads"]

    # "Clear" the failed partition with its downstream, as the Grid view does; then let it run.
    with create_session() as session:
        tis = [ti for ti in dr.get_task_instances(session=session)
               if (ti.task_id, ti.map_index) in {("load_partition", failed[0]), ("verify", -1)}]
        clear_task_instances(tis, session)
    dr = _drive(dag, dr)

    after = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
    assert dr.state == DagRunState.SUCCESS, states(dr)
    assert after[("load_partition", failed[0])].try_number == 2
    assert {ti.try_number for (task, idx), ti in after.items() if task == "load_partition" and idx != failed[0]} == {1}
    stats = fresh_org.stats()
    assert stats["duplicate_uploads"] == 0  # the uploaded job was closed, not sent again
    assert stats["bulk_uploads"] > uploads_before  # ... and the rest of the partition was streamed
    summary = xcom(dr, "verify")
    assert summary["ok"] and summary["upserted"] == RECORDS - BAD_ROWS - NULL_KEYS
    assert_every_row_matches(fresh_org)


def test_setup_problems_stop_the_run_before_any_write(dag: Any, fresh_org: EmulatorProcess,
                                                      airflow_env: Path) -> None:
    settings = yaml.safe_load((airflow_env / "sync_config.yaml").read_text())
    settings["mapping"]["Foo__c"] = "Foo__c"
    settings["mapping"]["Type__c"] = "IsClosed"
    broken = airflow_env / "broken.yaml"
    broken.write_text(yaml.safe_dump(settings))
    os.environ["SYNC_CONFIG_PATH"] = str(broken)
    try:
        dr = run(dag, fresh_org, partitions=2)
    finally:
        os.environ["SYNC_CONFIG_PATH"] = str(airflow_env / "sync_config.yaml")
    result = states(dr)
    assert result[("discover", -1)] == "failed"
    assert result[("load_partition", -1)] == "upstream_failed"
    assert result[("verify", -1)] == "failed"
    assert fresh_org.stats().get("bulk_jobs_created", 0) == 0


@pytest.mark.parametrize(("change", "problem"), [
    (lambda s: s["source"].update(dmo="Missing__dlm"), "source.dmo: Data Cloud object Missing__dlm cannot be read"),
    (lambda s: s["mapping"].update(Nope__c="Name"), "mapping.Nope__c: column Nope__c does not exist in Data Cloud "
                                                    "object Opportunity_Sync__dlm"),
    (lambda s: s["mapping"].update(Type__c="Foo__c"), "mapping.Type__c: field Foo__c does not exist on Opportunity"),
    (lambda s: s["mapping"].update(Type__c="IsClosed"), "mapping.Type__c: field IsClosed on Opportunity is not "
                                                        "createable/updateable"),
    (lambda s: s["mapping"].update(AccountExternalId__c="Account.Name__x"),
     "mapping.AccountExternalId__c: field Name__x does not exist on Account"),
    (lambda s: s["target"].update(external_id_field="Name") or s["mapping"].update(ExternalId__c="Name",
                                                                                    Name__c="Description"),
     "target.external_id_field: field Name on Opportunity is not marked External ID"),
], ids=["unknown-dmo", "unknown-column", "unknown-field", "read-only-field", "unknown-parent-field", "not-external-id"])
def test_discover_names_each_setup_problem_against_the_live_org(fresh_org: EmulatorProcess, airflow_env: Path,
                                                                 change: Any, problem: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from sf_datacloud_sync.discover import run_discover

    settings = yaml.safe_load((airflow_env / "sync_config.yaml").read_text())
    change(settings)
    path = airflow_env / "case.yaml"
    path.write_text(yaml.safe_dump(settings))

    class NoPush:
        def xcom_push(self, **_: Any) -> None:
            raise AssertionError("discover must not plan anything for a broken setup")

    with pytest.raises(AirflowFailException) as err:
        run_discover({"partitions": 3, "partition_key": "account"}, NoPush(), config_path=str(path))
    assert problem in str(err.value)
    assert fresh_org.stats().get("bulk_jobs_created", 0) == 0


def test_dry_run_writes_nothing(dag: Any, fresh_org: EmulatorProcess) -> None:
    dr = run(dag, fresh_org, partitions=3, dry_run=True)
    assert dr.state == "success", states(dr)
    summary = xcom(dr, "verify")
    assert summary["dry_run"] and summary["reported"] == summary["partition_count"] == 3
    stats = fresh_org.stats()
    assert stats.get("bulk_jobs_created", 0) == 0 and stats.get("bulk_uploads", 0) == 0
    assert fresh_org.stats()["requests"].get("POST /services/data/vXX.X/jobs/ingest", 0) == 0


def test_empty_source_loads_nothing_and_verifies_zero(dag: Any, org: EmulatorProcess) -> None:
    """Runs last: re-seeds the module's org with no rows at all."""
    subprocess.run([sys.executable, "-m", "emulator", "seed", "--data-dir", str(org.data_dir), "--records", "0"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    org.reset()
    dr = run(dag, org, partitions=4)
    result = states(dr)
    assert dr.state == "success", result
    assert result[("discover", -1)] == "success" and result[("verify", -1)] == "success"
    assert result.get(("load_partition", -1)) == "skipped"
    summary = xcom(dr, "verify")
    assert summary["partition_count"] == 0 and summary["salesforce_count"] == 0 == summary["expected_salesforce_count"]


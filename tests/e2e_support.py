"""Shared helpers of the end-to-end tests: run the DAG with ``dag.test()`` and check every row afterwards.

Used by ``tests/scenarios`` (and usable by ``tests/dags``): the Airflow metadata DB and pool set-up, a run with
every param given, XCom and task-state readers, and the row-by-row reconciliation of Data Cloud against the
org and the partitions' failure artifacts.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emulator.harness import EmulatorProcess

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "datacloud_opportunity_sync"
DMO = "Opportunity_Sync__dlm"
DC_COLUMNS = ("ExternalId__c", "AccountExternalId__c", "Name__c", "StageName__c", "CloseDate__c", "Amount__c",
              "Probability__c", "Type__c", "LeadSource__c", "Description__c")
SF_COLUMNS = ("o.ExternalId__c", "a.ExternalId__c", "o.Name", "o.StageName", "o.CloseDate", "o.Amount",
              "o.Probability", "o.Type", "o.LeadSource", "o.Description")
DEFAULT_CONF: dict[str, Any] = {"partitions": 4, "target_partition_rows": None, "partition_key": "account",
                                "max_records_per_job": 100_000, "dry_run": False, "tolerance": 0, "partitions_per_task": 1}
#: Test-speed timings of the load settings (production waits seconds to minutes).
# A Data Cloud page of rows, on either query API (faults slow it down to hold a run mid-read).
DC_ROWS_PATH = r"(/ssot/query-sql|/api/v3/query)/[^/]+/rows"
FAST_LOAD = {"transient_backoff_s": 0.05, "transient_retry_budget": 10, "poll_interval_s": 0.1, "poll_max_interval_s": 0.5}


# -- Airflow set-up ------------------------------------------------------------------------------------------------
def write_settings(path: Path, change: Any = None, **load: Any) -> Path:
    """``include/sync_config.yaml`` with fast load timings, optionally changed by ``change(settings)``."""
    settings = yaml.safe_load((ROOT / "include" / "sync_config.yaml").read_text())
    settings["load"].update({**FAST_LOAD, **load})
    if change is not None:
        change(settings)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or with ``None`` remove) environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def airflow_for(org: EmulatorProcess, work: Path) -> Iterator[Path]:
    """A fresh metadata DB with the pool, the emulator as ``salesforce_default`` and fast load settings."""
    settings = write_settings(work / "sync_config.yaml")
    env = {
        "AIRFLOW_CONN_SALESFORCE_DEFAULT": org.info["airflow_conn"],
        "SYNC_CONFIG_PATH": str(settings),
        "SYNC_ARTIFACTS_URL": f"file://{work}/artifacts",
        "SYNC_DEADLINE_HOURS": "0",  # dag.test() on 3.3.2 crashes on a successful run with a deadline alert
    }
    with environ(**env):
        from airflow.utils import db

        from sf_datacloud_sync.setup import ensure_pool

        db.resetdb()
        assert ensure_pool()["include_deferred"] is True
        yield work


def load_dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def run(dag: Any, org: EmulatorProcess, **conf: Any) -> Any:
    """``dag.test()`` with every param given: in-process runs leak one run's conf into the next run's params."""
    org.control("POST", "stats/reset")  # duplicate_uploads, faults_injected etc. per run
    return dag.test(run_conf={**DEFAULT_CONF, **conf})


def states(dr: Any) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}


def xcom(dr: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=dr.run_id, key=key, dag_ids=DAG_ID, task_ids=task_id,
                                                 map_indexes=map_index)).first()
        return None if row is None else XComModel.deserialize_value(row)


# -- reading both ends ---------------------------------------------------------------------------------------------
def manifest(org: EmulatorProcess) -> dict[str, Any]:
    return json.loads((org.data_dir / "seed_manifest.json").read_text())


def source_rows(org: EmulatorProcess) -> list[tuple[Any, ...]]:
    """Every Data Cloud row (``DC_COLUMNS``), NULL keys included."""
    cols = ", ".join(f'"{c}"' for c in DC_COLUMNS)
    with sqlite3.connect(f"file:{org.data_dir / 'datacloud.sqlite'}?mode=ro", uri=True, timeout=30) as dc:
        return list(dc.execute(f'SELECT {cols} FROM "{DMO}"'))


def target_rows(org: EmulatorProcess) -> dict[str, tuple[Any, ...]]:
    """Every Opportunity by external id (``SF_COLUMNS``, the Account's external id joined)."""
    with sqlite3.connect(f"file:{org.data_dir / 'org.sqlite'}?mode=ro", uri=True, timeout=30) as sf:
        return {r[0]: r for r in sf.execute(
            f'SELECT {", ".join(SF_COLUMNS)} FROM "Opportunity" o LEFT JOIN "Account" a ON a."Id" = o."AccountId"')}


def artifact_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """Every row of every partition's failure CSV that ``verify`` lists."""
    rows: list[dict[str, str]] = []
    for url in summary.get("artifacts") or []:
        with Path(url.removeprefix("file://")).open(newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))
    return rows


def norm(column: str, value: Any) -> Any:
    if value is None or value == "" or value == "#N/A":
        # Salesforce has no empty strings: blank is null. "#N/A" is Bulk API 2.0's null token: a source text of
        # exactly "#N/A" cannot be written as text through Bulk CSV and arrives as null (RELIABILITY.md).
        return None
    if column in ("Amount__c", "Probability__c"):
        return round(float(value), 2)
    return value


# -- the promise: every row arrived exactly or is reported with its reason -----------------------------------------
@dataclass
class Reconciliation:
    rows: int = 0
    landed: int = 0
    reported: int = 0
    lost: list[Any] = field(default_factory=list)
    mismatches: list[tuple[Any, str, Any, Any]] = field(default_factory=list)
    failed_codes: dict[str, str] = field(default_factory=dict)


def reconcile_rows(org: EmulatorProcess, summary: Mapping[str, Any]) -> Reconciliation:
    """Check every source row: in the org field by field, or in a failure artifact with an error code.

    A key that several source rows share lands once (the last one wins in Salesforce's order), so for duplicate
    keys one of the rows must match and the others may be reported.
    """
    result = Reconciliation()
    target = target_rows(org)
    failed = artifact_rows(summary)
    failed_keys: dict[str, list[dict[str, str]]] = {}
    null_failures = 0
    for row in failed:
        assert row["error_code"], row  # a reason for every reported row
        key = row["external_id"]
        if key in ("", "#N/A"):
            null_failures += 1
        else:
            failed_keys.setdefault(key, []).append(row)
            result.failed_codes[key] = row["error_code"]
    by_key: dict[Any, list[tuple[Any, ...]]] = {}
    for src in source_rows(org):
        by_key.setdefault(src[0], []).append(src)
    for key, srcs in by_key.items():
        result.rows += len(srcs)
        if key is None or key == "":
            continue  # counted against the NULL-key failures below
        got = target.get(key)
        matching = [s for s in srcs if got is not None and all(
            norm(c, s[i]) == norm(c, got[i]) for i, c in enumerate(DC_COLUMNS))]
        reported = len(failed_keys.get(key, []))
        result.landed += 1 if matching else 0
        result.reported += reported
        if got is not None and not matching and reported < len(srcs):
            src = srcs[0]
            result.mismatches.extend((key, c, src[i], got[i]) for i, c in enumerate(DC_COLUMNS)
                                     if norm(c, src[i]) != norm(c, got[i]))
        if (1 if matching else 0) + reported < len(srcs):
            result.lost.append(key)
    nulls = sum(len(v) for k, v in by_key.items() if k is None or k == "")
    result.reported += null_failures
    if null_failures < nulls:
        result.lost.extend([None] * (nulls - null_failures))
    return result


def assert_nothing_lost(dr: Any, org: EmulatorProcess, *, expect_failed: int | None = None) -> Reconciliation:
    """The run is green, ``verify`` reconciles, every row is in the org exactly or reported, nothing twice."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    assert dr.state == DagRunState.SUCCESS, states(dr)
    assert set(states(dr).values()) <= {TaskInstanceState.SUCCESS, TaskInstanceState.SKIPPED}, states(dr)
    summary = xcom(dr, "verify")
    assert summary["ok"] and summary["problems"] == [], summary
    rec = reconcile_rows(org, summary)
    assert rec.lost == [] and rec.mismatches[:10] == [], (rec.lost[:10], rec.mismatches[:10])
    assert summary["rows"] == rec.rows == summary["upserted"] + summary["failed"], summary
    assert summary["salesforce_count"] == summary["expected_salesforce_count"], summary
    assert "UNABLE_TO_LOCK_ROW" not in summary["failed_by_code"], summary["failed_by_code"]
    if expect_failed is not None:
        assert summary["failed"] == expect_failed, summary["failed_by_code"]
    assert org.stats()["duplicate_uploads"] == 0
    return rec


# -- security ------------------------------------------------------------------------------------------------------
def issued_tokens(org: EmulatorProcess) -> list[str]:
    """Every access token (core and Data Cloud) the emulator issued, from its ``oauth_tokens`` table."""
    with sqlite3.connect(f"file:{org.data_dir / 'org.sqlite'}?mode=ro", uri=True, timeout=30) as db:
        return [r[0] for r in db.execute("SELECT token FROM oauth_tokens")]


def assert_no_secrets(org: EmulatorProcess, texts: Mapping[str, str]) -> int:
    """No password, client secret or issued token appears in any of ``texts`` (name → text); returns tokens."""
    tokens = issued_tokens(org)
    secrets = {"password": org.info["password"], "client_secret": org.info["client_secret"],
               **{f"token {t[:6]}…": t for t in tokens}}
    leaks = [(where, what) for where, text in texts.items() for what, secret in secrets.items()
             if secret and secret in text]
    assert leaks == [], leaks
    return len(tokens)

"""Bad input: edge-case rows written straight into the Data Cloud table, each landing exactly or reported.

A small org (300 seeded rows) gets the rows of :data:`CASES` inserted into ``Opportunity_Sync__dlm`` before it
starts. After one DAG run every case is checked against its expected outcome: the exact field values of the
Opportunity, or the Salesforce error code in the partition's failure CSV.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.harness import EmulatorProcess
from tests.e2e_support import (
    DC_COLUMNS,
    DMO,
    artifact_rows,
    assert_nothing_lost,
    environ,
    norm,
    run,
    target_rows,
    xcom,
)

ACCOUNT = "ACC-0000003"
BASE = {"AccountExternalId__c": ACCOUNT, "Name__c": "Edge deal", "StageName__c": "Prospecting",
        "CloseDate__c": "2027-03-31", "Amount__c": 1234.5, "Probability__c": 10.0, "Type__c": "New Customer",
        "LeadSource__c": "Web", "Description__c": "plain"}
LANDS = "lands"

#: (case, external id, column overrides, expected: LANDS with field overrides of what Salesforce holds, or a code).
CASES: list[tuple[str, Any, dict[str, Any], tuple[str, dict[str, Any]] | str]] = [
    ("double quotes", "EDGE-01", {"Name__c": 'He said "hi", then "bye"'}, (LANDS, {})),
    ("delimiters", "EDGE-02", {"Name__c": "a,b,,c;d|e\tf"}, (LANDS, {})),
    ("LF inside", "EDGE-03", {"Description__c": "line one\nline two\n"}, (LANDS, {})),
    ("lone CR inside", "EDGE-04", {"Name__c": "CR only\rDeal"}, (LANDS, {})),
    ("CRLF inside", "EDGE-05", {"Description__c": "a\r\nb\r\n\r\nc"}, (LANDS, {})),
    ("BOM at start of value", "EDGE-06", {"Name__c": "\ufeffBOM first"}, (LANDS, {})),
    ("emoji", "EDGE-07", {"Name__c": "🚀 Launch 👍🏽 deal", "Description__c": "🔥💰"}, (LANDS, {})),
    ("non-ASCII scripts", "EDGE-08", {"Name__c": "عقد 数据云 Ωμέγα Заказ Straße"}, (LANDS, {})),
    ("empty string vs null", "EDGE-09", {"Description__c": "", "LeadSource__c": None}, (LANDS, {})),
    ("null optional fields", "EDGE-10", {"Description__c": None, "Type__c": None, "Amount__c": None},
     (LANDS, {})),
    ("quote at end", "EDGE-11", {"Description__c": 'ends with a quote"'}, (LANDS, {})),
    ("zero-width and nbsp", "EDGE-12", {"Name__c": "zero\u200bwidth\u00a0nbsp"}, (LANDS, {})),
    ("name exactly 120", "EDGE-13", {"Name__c": "N" * 120}, (LANDS, {})),
    ("description 32000", "EDGE-14", {"Description__c": "d" * 32_000}, (LANDS, {})),
    ("name 121 chars", "EDGE-15", {"Name__c": "N" * 121}, "STRING_TOO_LONG"),
    ("description 32001", "EDGE-16", {"Description__c": "d" * 32_001}, "STRING_TOO_LONG"),
    ("invalid date", "EDGE-17", {"CloseDate__c": "2026-02-30"}, "INVALID_FIELD"),
    ("date in local format", "EDGE-18", {"CloseDate__c": "31/12/2026"}, "INVALID_FIELD"),
    ("number as text", "EDGE-19", {"Amount__c": "12abc"}, "INVALID_FIELD"),
    ("amount too large", "EDGE-20", {"Amount__c": 1e20}, "NUMBER_OUTSIDE_VALID_RANGE"),
    ("probability negative", "EDGE-21", {"Probability__c": -5}, "NUMBER_OUTSIDE_VALID_RANGE"),
    ("unknown restricted picklist", "EDGE-22", {"StageName__c": "Almost Won"},
     "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"),
    ("unknown open picklist", "EDGE-23", {"Type__c": "Weird Type", "LeadSource__c": "Carrier pigeon"},
     (LANDS, {})),
    ("required name null", "EDGE-24", {"Name__c": None}, "REQUIRED_FIELD_MISSING"),
    ("required name empty", "EDGE-25", {"Name__c": ""}, "REQUIRED_FIELD_MISSING"),
    ("account does not exist", "EDGE-26", {"AccountExternalId__c": "ACC-NOPE-404"}, "INVALID_FIELD"),
    ("no account", "EDGE-27", {"AccountExternalId__c": None}, (LANDS, {})),
    ("key with double quotes", 'EDGE-"28"', {}, (LANDS, {})),
    ("key with backslash", "EDGE-29\\x\\", {}, (LANDS, {})),
    ("key with SQL metacharacters", "EDGE-30'; DROP TABLE x;--", {}, (LANDS, {})),
    ("key with SOQL metacharacters", "EDGE-31%_*()", {}, (LANDS, {})),
    ("key with comma and newline", "EDGE-32,\nX", {}, (LANDS, {})),
    ("key 81 characters", "EDGE-33-" + "K" * 73, {}, "STRING_TOO_LONG"),
    ("NULL key", None, {"Name__c": "null key row"}, "MISSING_ARGUMENT"),
    ("empty key", "", {"Name__c": "empty key row"}, "MISSING_ARGUMENT"),
    ("literal #N/A text", "EDGE-36", {"Description__c": "#N/A"}, (LANDS, {"Description__c": None})),
    ("far-future date", "EDGE-37", {"CloseDate__c": "9999-12-31"}, (LANDS, {})),
]
#: A key twice in the source: both rows go in one job and Salesforce rejects both (``DUPLICATE_VALUE``).
DUPLICATE_KEY = "EDGE-DUP"
DUPLICATES = [{"Name__c": "dup first"}, {"Name__c": "dup second"}]


def _insert(data_dir: Path) -> None:
    rows = [{**BASE, **over, "ExternalId__c": key} for _, key, over, _ in CASES]
    rows += [{**BASE, **over, "ExternalId__c": DUPLICATE_KEY} for over in DUPLICATES]
    cols = ", ".join(f'"{c}"' for c in DC_COLUMNS)
    with sqlite3.connect(data_dir / "datacloud.sqlite") as db:
        db.executemany(f'INSERT INTO "{DMO}" ({cols}) VALUES ({", ".join("?" * len(DC_COLUMNS))})',
                       [[r[c] for c in DC_COLUMNS] for r in rows])


@pytest.fixture(scope="module")
def edge_org(tmp_path_factory: pytest.TempPathFactory, scen_airflow: Path) -> Iterator[EmulatorProcess]:
    proc = EmulatorProcess(tmp_path_factory.mktemp("edge_org"))
    proc.seed(records=300, accounts=10, random_seed=5)
    _insert(proc.data_dir)
    try:
        proc.start()
        with environ(AIRFLOW_CONN_SALESFORCE_DEFAULT=proc.info["airflow_conn"]):
            yield proc
    finally:
        proc.stop()


def test_edge_case_rows_land_exactly_or_are_reported(scen_dag: Any, edge_org: EmulatorProcess,
                                                      figures: list) -> None:
    dr = run(scen_dag, edge_org, partitions=2, partition_key="external_id", max_records_per_job=100)
    rec = assert_nothing_lost(dr, edge_org)
    summary = xcom(dr, "verify")
    target = target_rows(edge_org)
    reported: dict[Any, list[str]] = {}
    for row in artifact_rows(summary):
        key = row["external_id"]
        reported.setdefault(None if key in ("", "#N/A") else key, []).append(row["error_code"])
    problems = []
    for case, key, over, expected in CASES:
        source = {**BASE, **over, "ExternalId__c": key}
        lookup = None if key in ("", None) else key
        if isinstance(expected, str):
            if expected not in reported.get(lookup, []):
                problems.append(f"{case}: expected {expected}, reported {reported.get(lookup)}, "
                                f"in org: {lookup in target}")
            continue
        want = {**source, **expected[1]}
        got = target.get(key)
        if got is None:
            problems.append(f"{case}: expected to land, reported {reported.get(lookup)}")
            continue
        diff = {c: (want[c], got[i]) for i, c in enumerate(DC_COLUMNS) if norm(c, want[c]) != norm(c, got[i])}
        if diff:
            problems.append(f"{case}: fields differ {diff}")
    dup = target.get(DUPLICATE_KEY)
    if dup is not None or reported.get(DUPLICATE_KEY) != ["DUPLICATE_VALUE", "DUPLICATE_VALUE"]:
        problems.append(f"duplicate key: org {dup and dup[2]}, reported {reported.get(DUPLICATE_KEY)}")
    assert problems == [], "\n".join(problems)
    figures.append({"scenario": "bad input table", "rows_checked": rec.rows, "edge_cases": len(CASES) + 2,
                    "landed": rec.landed, "reported_failed": rec.reported, "rows_lost": len(rec.lost),
                    "faults_injected": 0})

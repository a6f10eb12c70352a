"""Regression: resuming a partition's range query after any row neither skips nor repeats a row.

Found by ``tests/scenarios`` (scenario 5): Data Cloud orders NULLs LAST for ASC (PostgreSQL/Hyper), the resume
predicate assumed NULLS FIRST, so after a restart the NULL-key rows of the Account being streamed were skipped.
Run through the emulator's Data Cloud SQL translation, which applies Data Cloud's NULL placement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator import dcsql
from emulator.schema import DMO_COLUMNS, DMO_NAME
from emulator.state import connect, init_datacloud_db
from sf_datacloud_sync.utils.partitions import Partition, order_columns, range_query

KEY, ACCOUNT = "ExternalId__c", "AccountExternalId__c"
# (external id, account): NULL keys inside and at the end of accounts, and an account that is all NULL keys.
ROWS = [("K1", "A"), (None, "A"), ("K2", "A"), ("K3", "B"), (None, "B"), ("K4", "C"), (None, "D"), ("K5", "E")]


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("resume") / "datacloud.sqlite"
    with connect(path) as c:
        init_datacloud_db(c)
        cols = list(DMO_COLUMNS)
        c.executemany(f'INSERT INTO "{DMO_NAME}" ("{KEY}", "{ACCOUNT}", "Name__c") VALUES (?, ?, ?)',
                      [(k, a, f"row {i}") for i, (k, a) in enumerate(ROWS)])
        assert KEY in cols and ACCOUNT in cols
        c.commit()
    return dcsql.open_dmo(path)


def _query(conn, part: Partition, after) -> list[list]:
    sql, params = range_query(part, dmo=DMO_NAME, columns=[KEY, ACCOUNT, "Name__c"], key_column=KEY,
                              account_column=ACCOUNT, resume_after=after)
    # As the Data Cloud hook sends them: a list of {name, type, value}.
    tr = dcsql.translate(sql, [{"name": k, "type": "Varchar", "value": v} for k, v in params.items()])
    names = dcsql.result_names(conn, tr)
    return [json.loads(r[0]) for r in conn.execute(dcsql.execution_sql(tr, len(names), tr.column_types(names)),
                                                   tr.bindings)]


@pytest.mark.parametrize("part", [Partition(0, 1, "account", None, None),
                                  Partition(0, 2, "account", "B", None)], ids=["all-accounts", "from-B"])
def test_resume_after_every_row_returns_exactly_the_rest(conn, part: Partition) -> None:
    full = _query(conn, part, None)
    assert len(full) == sum(1 for _, a in ROWS if part.contains(a))
    positions = [[KEY, ACCOUNT].index(c) for c in order_columns(part, KEY, ACCOUNT)]
    # Keys are unique here except NULL ones; resume only after rows whose key is unique in its account.
    for i, row in enumerate(full):
        if row[0] is None and sum(1 for r in full if r[1] == row[1] and r[0] is None) > 1:
            continue
        after = [row[p] for p in positions]
        assert _query(conn, part, after) == full[i + 1:], after

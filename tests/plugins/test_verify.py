"""The reconciliation ``verify`` runs: missing partitions, unbalanced rows, count mismatches, dry runs."""

from __future__ import annotations

from typing import Any

import pytest

from sf_datacloud_sync.utils.partitions import Partition
from sf_datacloud_sync.verify import (
    MAX_TABLE_ROWS_IN_XCOM,
    _as_list,
    expected_salesforce_count,
    reconcile,
    run_verify,
)


def planned(n: int = 3, null_bucket: bool = True) -> list[dict[str, Any]]:
    bounds = [None, *(f"K{i}" for i in range(1, n)), None]
    parts = [Partition(index=i, count=n + null_bucket, key="external_id", lower=bounds[i], upper=bounds[i + 1],
                       expected_rows=100) for i in range(n)]
    if null_bucket:
        parts.append(Partition(index=n, count=n + 1, key="external_id", lower=None, upper=None, null_bucket=True,
                               expected_rows=5))
    return [{"partition": p.to_dict()} for p in parts]


def summary(index: int, rows: int = 100, upserted: int | None = None, failed: int = 0, **extra: Any) -> dict:
    upserted = rows - failed if upserted is None else upserted
    return {"index": index, "label": f"P{index:02d}", "rows": rows, "upserted": upserted, "failed": failed,
            "failed_by_code": {"STRING_TOO_LONG": failed} if failed else {}, "retried": 2, "duration_s": 1.5,
            "job_count": 1, "artifact": f"file:///tmp/P{index:02d}_failed.csv" if failed else None, **extra}


PLAN = {"key": "external_id", "total_rows": 305, "null_rows": 5, "unkeyed_rows": 5, "keyed_rows": 300,
        "salesforce_count_before": 0}


def all_summaries() -> list[dict[str, Any]]:
    # 3 data partitions of 100 (2 rows of P01 failed for good) + the NULL bucket whose 5 rows all failed.
    return [summary(0), summary(1, failed=2), summary(2), summary(3, rows=5, failed=5)]


def test_green_run() -> None:
    result = reconcile(planned(), all_summaries(), PLAN, salesforce_count=298, tolerance=0)
    assert result.ok, result.problems
    t = result.totals
    assert (t["rows"], t["upserted"], t["failed"], t["expected_salesforce_count"], t["difference"]) == \
        (305, 298, 7, 298, 0)
    assert t["failed_by_code"] == {"STRING_TOO_LONG": 7}
    assert t["artifacts"] == ["file:///tmp/P01_failed.csv", "file:///tmp/P03_failed.csv"]
    table = result.table()
    assert "P01" in table and "ok, some failed" in table and "TOTAL" in table
    assert result.as_dict()["ok"] is True


def test_missing_partition_fails_even_though_the_others_are_fine() -> None:
    summaries = [s for s in all_summaries() if s["index"] != 2]  # P02 failed: Airflow's sequence just omits it
    result = reconcile(planned(), summaries, PLAN, salesforce_count=198, tolerance=0)
    assert not result.ok
    assert result.problems == ["P02 [K2, +∞): no result -- the task failed, was marked failed or was skipped "
                               "(see its log; clear it to load this partition again)"]
    assert [r["state"] for r in result.rows] == ["ok", "ok, some failed", "MISSING", "ok, some failed"]


def test_rows_that_are_neither_upserted_nor_failed_fail_the_run() -> None:
    summaries = all_summaries()
    summaries[0] = summary(0, rows=100, upserted=97, failed=0)
    result = reconcile(planned(), summaries, PLAN, salesforce_count=295, tolerance=10)
    assert any(p.startswith("P00 [−∞, K1): read 100 rows but upserted 97 + failed 0 = 97 (+3 rows unaccounted for)")
               for p in result.problems)


def test_rows_read_must_match_what_discover_counted() -> None:
    summaries = all_summaries()
    summaries[2] = summary(2, rows=90)
    result = reconcile(planned(), summaries, PLAN, salesforce_count=288)
    assert result.problems[0] == ("Data Cloud had 305 rows when discover ran but the partitions read 295 (-10): "
                                  "Data Cloud changed during the run, or rows were skipped")
    assert result.problems[1].startswith("Salesforce count 288 != expected 298")  # the consequence, also named
    assert reconcile(planned(), summaries, PLAN, salesforce_count=288, tolerance=10).ok


@pytest.mark.parametrize(("salesforce_count", "tolerance", "ok"), [(298, 0, True), (299, 0, False), (297, 0, False),
                                                                   (303, 5, True), (304, 5, False)])
def test_salesforce_count_within_tolerance(salesforce_count: int, tolerance: int, ok: bool) -> None:
    result = reconcile(planned(), all_summaries(), PLAN, salesforce_count=salesforce_count, tolerance=tolerance)
    assert result.ok is ok, result.problems


def test_count_mismatch_messages_explain_the_direction() -> None:
    more = reconcile(planned(), all_summaries(), {**PLAN, "salesforce_count_before": 40}, salesforce_count=310)
    assert "Salesforce count 310 != expected 298 = 300 Data Cloud rows with an external id - 2 of them failed " \
           "permanently (tolerance 0)" in more.problems[0]
    assert "12 Opportunities with an external id that this run did not write (there were 40 before" in more.problems[0]
    fewer = reconcile(planned(), all_summaries(), PLAN, salesforce_count=290)
    assert "8 rows reported as upserted are not in Salesforce" in fewer.problems[0]


def test_expected_count_takes_rows_without_a_key_out_of_the_failures() -> None:
    assert expected_salesforce_count(keyed_rows=300, unkeyed_rows=5, failed_rows=7) == 298
    assert expected_salesforce_count(keyed_rows=300, unkeyed_rows=5, failed_rows=3) == 300  # fewer failed than unkeyed
    assert expected_salesforce_count(keyed_rows=0, unkeyed_rows=0, failed_rows=0) == 0


def test_empty_source_verifies_zero() -> None:
    plan = {**PLAN, "total_rows": 0, "null_rows": 0, "unkeyed_rows": 0, "keyed_rows": 0}
    assert reconcile([], [], plan, salesforce_count=0).ok
    result = reconcile([], [], plan, salesforce_count=3)
    assert not result.ok and "Salesforce count 3 != expected 0" in result.problems[0]


def test_dry_run_only_checks_that_every_partition_reported() -> None:
    dry = [summary(i, rows=100, upserted=0, failed=0, dry_run=True) for i in range(4)]
    assert reconcile(planned(), dry, PLAN, salesforce_count=None, dry_run=True).ok
    result = reconcile(planned(), dry[:3], PLAN, salesforce_count=None, dry_run=True)
    assert [p.split(":")[0] for p in result.problems] == ["P03 NULL external_id"]


def test_no_plan_means_discover_failed() -> None:
    result = reconcile([], [], None, salesforce_count=None)
    assert result.problems == ["discover did not finish: there is no plan to verify against (see its log)"]


def test_unplanned_summary_is_reported() -> None:
    result = reconcile(planned(), [*all_summaries(), summary(9)], PLAN, salesforce_count=398)
    assert "partition index 9 reported a result but discover did not plan it" in result.problems


def test_returned_table_is_capped() -> None:
    n = MAX_TABLE_ROWS_IN_XCOM + 20
    plan = {**PLAN, "total_rows": 100 * n, "null_rows": 0, "unkeyed_rows": 0, "keyed_rows": 100 * n}
    result = reconcile(planned(n, null_bucket=False), [summary(i) for i in range(n)], plan, salesforce_count=100 * n)
    out = result.as_dict()
    assert result.ok and len(out["partitions"]) == MAX_TABLE_ROWS_IN_XCOM and out["partitions_truncated"]


def test_as_list_normalises_xcom_pull() -> None:
    assert _as_list(None) == []
    assert _as_list({"index": 0}) == [{"index": 0}]
    assert _as_list([{"index": 0}, None]) == [{"index": 0}]


class FakeTI:
    def __init__(self, xcoms: dict[tuple[str, str], Any]) -> None:
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.xcoms.get((task_ids, key))


def test_run_verify_raises_with_every_problem_and_never_queries_salesforce_for_an_incomplete_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    ti = FakeTI({("discover", "plan"): PLAN, ("discover", "return_value"): planned(),
                 ("load_partition", "return_value"): all_summaries()[:2]})
    with pytest.raises(AirflowFailException) as err:
        run_verify({"dry_run": False, "tolerance": 0}, ti)
    assert "P02 [K2, +∞): no result" in str(err.value) and "P03 NULL external_id: no result" in str(err.value)


def test_run_verify_dry_run_single_partition_summary_as_a_dict() -> None:
    one = planned(1, null_bucket=False)
    ti = FakeTI({("discover", "plan"): PLAN, ("discover", "return_value"): one,
                 ("load_partition", "return_value"): summary(0, upserted=0, dry_run=True)})
    out = run_verify({"dry_run": True, "tolerance": 0}, ti)
    assert out["ok"] and out["dry_run"] and out["reported"] == 1


def test_table_names_what_each_lane_holds() -> None:
    """A lane lists its Accounts, plus the key range it was topped up with; a plain range its bounds."""
    parts = [Partition(index=0, count=3, key="account", lower=None, upper=None, expected_rows=100,
                       accounts=("WHALE",)),
             Partition(index=1, count=3, key="account", lower=None, upper="ACC-5", expected_rows=100,
                       accounts=("BIG", "BIGGER"), exclude=("WHALE", "BIG", "BIGGER"), with_range=True),
             Partition(index=2, count=3, key="account", lower="ACC-5", upper=None, expected_rows=100,
                       exclude=("WHALE", "BIG", "BIGGER"))]
    plan = {**PLAN, "key": "account", "total_rows": 300, "null_rows": 0, "unkeyed_rows": 0, "keyed_rows": 300}
    result = reconcile([{"partition": p.to_dict()} for p in parts], [summary(i) for i in range(3)], plan,
                       salesforce_count=300)
    assert result.ok, result.problems
    assert [r["range"] for r in result.rows] == [
        "account IN ('WHALE')", "account IN ('BIG', 'BIGGER') or [-inf, 'ACC-5')", "['ACC-5', +inf)"]


def test_table_names_every_partition_of_a_group() -> None:
    """A task loading a group of partitions reconciles as one row that lists each member's rows."""
    members = (Partition(index=0, count=2, key="account", lower=None, upper=None, expected_rows=200, accounts=("WHALE",)),
               Partition(index=1, count=2, key="account", lower="ACC-5", upper=None, expected_rows=100,
                         exclude=("WHALE",)))
    group = Partition(index=0, count=1, key="account", lower=None, upper=None, expected_rows=300, members=members)
    plan = {**PLAN, "key": "account", "total_rows": 300, "null_rows": 0, "unkeyed_rows": 0, "keyed_rows": 300,
            "partition_count": 1, "expected_rows": {0: 300}}
    result = reconcile([{"partition": group.to_dict()}], [summary(0, rows=300)], plan,
                       salesforce_count=300)
    assert result.ok, result.problems
    assert [r["range"] for r in result.rows] == ["account IN ('WHALE') + ['ACC-5', +inf)"]

"""``make status``: what it reads from Airflow's REST API and how it prints it."""

from __future__ import annotations

from typing import Any

import pytest

from include import status as status_mod
from include.status import AirflowApi, collect, main, render, render_verify

RUN_ID = "manual__2026-11-28T02:00:00+00:00"
BASE = f"dags/datacloud_opportunity_sync/dagRuns/{RUN_ID.replace(':', '%3A').replace('+', '%2B')}"
PARTITIONS = [
    {"partition": {"index": 0, "label": "P00 [−∞, ACC-2)", "key": "account", "lower": None, "upper": "ACC-2",
                   "null_bucket": False, "expected_rows": 100}},
    {"partition": {"index": 1, "label": "P01 [ACC-2, +∞)", "key": "account", "lower": "ACC-2", "upper": None,
                   "null_bucket": False, "expected_rows": 120}},
    {"partition": {"index": 2, "label": "P02 NULL account", "key": "account", "lower": None, "upper": None,
                   "null_bucket": True, "expected_rows": 3}},
]
LEDGER_RUNNING = {"version": 1, "label": "P01 [ACC-2, +∞)", "phase": "waiting",
                  "counters": {"rows": 40, "upserted": 39, "failed": 1},
                  "progress": {"read": 120, "uploaded": 40, "jobs_done": 1, "jobs_open": 2, "failed": 1}}


class FakeApi(AirflowApi):
    """Answers ``get`` from a dict of canned bodies; records every path."""

    def __init__(self, bodies: dict[str, Any]) -> None:  # no HTTP, no login
        self.bodies = bodies
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get(self, path: str, **params: Any) -> Any:
        self.calls.append((path, params))
        key = path + ("" if params.get("map_index") in (None, -1) else f"#{params['map_index']}")
        return self.bodies.get(key)


def _ti(task_id: str, state: str | None, map_index: int = -1, **extra: Any) -> dict[str, Any]:
    return {"task_id": task_id, "map_index": map_index, "state": state, "try_number": 1,
            "start_date": "2026-11-28T02:00:01Z", "end_date": None, "rendered_map_index": None, **extra}


def running_run_api() -> FakeApi:
    tis = [
        _ti("discover", "success", end_date="2026-11-28T02:00:05Z"),
        _ti("load_partition", "success", 0, rendered_map_index="P00 [−∞, ACC-2)", end_date="2026-11-28T02:01:05Z"),
        _ti("load_partition", "deferred", 1, rendered_map_index="P01 [ACC-2, +∞)"),
        _ti("load_partition", "scheduled", 2, start_date=None),
        _ti("verify", None, start_date=None),
    ]
    return FakeApi({
        "dags/datacloud_opportunity_sync/dagRuns": {"dag_runs": [{"dag_run_id": RUN_ID, "state": "running",
                                                                  "start_date": "2026-11-28T02:00:00Z"}]},
        f"{BASE}/taskInstances": {"task_instances": tis, "total_entries": len(tis)},
        f"{BASE}/taskInstances/discover/xcomEntries/return_value": {"value": PARTITIONS},
        f"{BASE}/taskInstances/discover/xcomEntries/plan": {"value": {"total_rows": 223, "partition_count": 3,
                                                                      "key": "account"}},
        f"{BASE}/taskInstances/load_partition/xcomEntries/return_value#0": {
            "value": {"index": 0, "rows": 100, "upserted": 98, "failed": 2}},
        f"{BASE}/taskInstances/load_partition/state-store/load_partition.ledger#0": {
            "value": {**LEDGER_RUNNING, "phase": "done", "progress": {"read": 100, "jobs_open": 0, "failed": 2}}},
        f"{BASE}/taskInstances/load_partition/state-store/load_partition.ledger#1": {"value": LEDGER_RUNNING},
    })


def test_collect_reads_tis_plan_ledgers_and_summaries() -> None:
    api = running_run_api()
    st = collect(api)
    assert st.run["dag_run_id"] == RUN_ID
    assert set(st.partitions) == {0, 1, 2}
    assert st.progress[1]["jobs_open"] == 2 and st.progress[1]["read"] == 120
    assert st.summaries == {0: {"index": 0, "rows": 100, "upserted": 98, "failed": 2}}
    # A partition that has not started is not asked for its ledger; verify has not run.
    asked = [(p, kw.get("map_index")) for p, kw in api.calls]
    assert (f"{BASE}/taskInstances/load_partition/state-store/load_partition.ledger", 2) not in asked
    assert st.verify is None


def test_render_prints_one_line_per_partition() -> None:
    text = render(collect(running_run_api()), {"object": "Opportunity", "total": 1_234, "with_external_id": 1_200,
                                                "external_id_field": "ExternalId__c"})
    lines = text.splitlines()
    assert lines[0].startswith(f"datacloud_opportunity_sync  run {RUN_ID}  RUNNING  for ")
    assert "223 rows, 3 partitions by account" in lines[1]
    p1 = next(line for line in lines if "P01 [ACC-2, +∞)" in line and "deferred" in line)
    assert "[ACC-2, +∞)" in p1 and "120" in p1 and "waiting" in p1
    assert p1.split()[-3] == "2" or " 2 " in p1  # two open jobs
    p0 = next(line for line in lines if line.lstrip().startswith("0 "))
    assert "success" in p0 and " 98" not in p0 and "100" in p0
    total = next(line for line in lines if "TOTAL" in line)
    assert "1 deferred, 1 scheduled, 1 success" in total and "223" in total
    assert lines[-1] == "Salesforce      Opportunity: 1,234 in total, 1,200 with ExternalId__c"


def test_render_without_runs_and_with_errors() -> None:
    api = FakeApi({})
    text = render(collect(api), {"error": "no connection salesforce_default"})
    assert text.splitlines() == ["datacloud_opportunity_sync: no runs yet",
                                 "Salesforce      count unavailable: no connection salesforce_default"]


def test_render_verify_summary() -> None:
    summary = {"ok": True, "dry_run": False, "partition_count": 2, "rows": 220, "upserted": 217, "failed": 3,
               "retried": 5, "duration_s": 12.5, "salesforce_count": 217, "salesforce_count_before": 0,
               "expected_salesforce_count": 217, "keyed_rows": 220, "difference": 0, "tolerance": 0,
               "failed_by_code": {"STRING_TOO_LONG": 3}, "artifacts": ["file:///a/P01_failed.csv"],
               "partitions": [{"label": "P00", "range": "[-inf, 'ACC-2')", "state": "ok", "rows": 100,
                               "upserted": 100, "failed": 0, "retried": 5, "duration_s": 5.0},
                              {"label": "P01", "range": "['ACC-2', +inf)", "state": "ok, some failed", "rows": 120,
                               "upserted": 117, "failed": 3, "retried": 0, "duration_s": 7.5}]}
    text = render_verify(summary)
    assert "TOTAL" in text and "217" in text and "STRING_TOO_LONG 3" in text
    assert "file:///a/P01_failed.csv" in text and "difference 0 (tolerance 0)" in text
    assert render_verify(None).startswith("verify: no summary")


def test_main_prints_status(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_mod, "load_demo_settings", lambda: None)
    assert main(["--no-salesforce"], api_factory=running_run_api) == 0
    out = capsys.readouterr().out
    assert "P01 [ACC-2, +∞)" in out and "TOTAL" in out


def test_main_explains_an_unreachable_api(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_mod, "load_demo_settings", lambda: None)

    def down() -> AirflowApi:
        raise ConnectionError("connection refused")

    assert main([], api_factory=down) == 2
    assert "cannot reach Airflow's API" in capsys.readouterr().err


def test_paginates() -> None:
    class Paged(FakeApi):
        def get(self, path: str, **params: Any) -> Any:
            items = [{"i": i} for i in range(250)]
            return {"task_instances": items[params["offset"]: params["offset"] + params["limit"]],
                    "total_entries": 250}

    assert len(Paged({}).get_all("x", "task_instances")) == 250


def test_demo_settings_fill_only_missing_variables(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "demo.json"
    f.write_text('{"AIRFLOW_API_URL": "http://127.0.0.1:9999", "STATUS_TEST_ONLY": "x"}')
    monkeypatch.setenv("AIRFLOW_API_URL", "http://127.0.0.1:8080")
    monkeypatch.delenv("STATUS_TEST_ONLY", raising=False)
    status_mod.load_demo_settings(f)
    import os

    assert os.environ["AIRFLOW_API_URL"] == "http://127.0.0.1:8080" and os.environ["STATUS_TEST_ONLY"] == "x"
    monkeypatch.delenv("STATUS_TEST_ONLY")


def test_range_of_a_group_names_its_size_and_first_partition() -> None:
    group = {"members": [{"accounts": ["ACC-0011242", "ACC-2"], "lower": None, "upper": None},
                         {"lower": "ACC-5", "upper": None}]}
    assert status_mod._range(group) == "2 lanes: 2 accounts from ACC-0011242, …"


def test_render_counts_partitions_and_tasks_of_groups() -> None:
    api = running_run_api()
    api.bodies[f"{BASE}/taskInstances/discover/xcomEntries/plan"] = {
        "value": {"total_rows": 223, "partition_count": 3, "member_count": 15, "key": "account"}}
    text = render(collect(api), {"error": "not asked"})
    assert "223 rows, 15 partitions in 3 tasks by account" in text

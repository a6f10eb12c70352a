"""``make status``: where the latest run of the sync stands, one line per partition, plus Salesforce's totals.

Source: **Airflow's REST API** (``/api/v2``), the same API the UI uses. It works while ``airflow standalone`` (or
any deployment) is running, against any metadata database, without database credentials and without competing
with the scheduler for SQLite's write lock. Per partition it reads

* the task instance (state, try, start/end) from ``GET .../dagRuns/{run}/taskInstances``,
* the load operator's live ledger progress (rows read, results counted, failed, open Bulk jobs, phase) from the
  task state store, ``GET .../taskInstances/load_partition/state-store/load_partition.ledger?map_index=N``,
* the planned key range and expected rows from ``discover``'s XCom,

and, when ``verify`` ran, its verdict. Salesforce's Opportunity totals come from ``SalesforceBulk2Hook.query_count``
on the sync's connection.

Settings (environment variables win; ``make demo`` writes the demo's into ``.demo/demo.json``):
``AIRFLOW_API_URL`` (default ``http://127.0.0.1:8080``), ``AIRFLOW_API_TOKEN`` or ``AIRFLOW_API_USERNAME`` +
``AIRFLOW_API_PASSWORD`` (default: the admin password ``airflow standalone`` generated under ``$AIRFLOW_HOME``),
``AIRFLOW_CONN_SALESFORCE_DEFAULT`` for the Salesforce count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
DEMO_SETTINGS = ROOT / ".demo" / "demo.json"
DAG_ID = "datacloud_opportunity_sync"
LOAD_TASK = "load_partition"
LEDGER_KEY = "load_partition.ledger"  # sf_datacloud_sync.utils.ledger.LEDGER_KEY
_NOT_STARTED = {None, "none", "scheduled", "queued", "removed", "upstream_failed", "skipped"}


def load_demo_settings(path: Path = DEMO_SETTINGS) -> None:
    """Fill missing environment variables from the demo's settings file, if there is one."""
    if path.exists():
        for key, value in json.loads(path.read_text()).items():
            os.environ.setdefault(key, str(value))


class AirflowApi:
    """A minimal client of Airflow's public REST API (token from ``POST /auth/token``)."""

    def __init__(self, base_url: str, *, token: str | None = None, username: str | None = None,
                 password: str | None = None, session: Any = None, timeout: float = 15.0) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.http = session or requests.Session()
        self.timeout = timeout
        if token is None and username:
            resp = self.http.post(f"{self.base_url}/auth/token", json={"username": username, "password": password},
                                  timeout=timeout)
            resp.raise_for_status()
            token = resp.json()["access_token"]
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **params: Any) -> Any:
        """``GET /api/v2/{path}``; ``None`` on 404."""
        resp = self.http.get(f"{self.base_url}/api/v2/{path.lstrip('/')}", params=params or None,
                             timeout=self.timeout)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()

    def get_all(self, path: str, collection: str, page: int = 100, **params: Any) -> list[dict[str, Any]]:
        """Every item of a paginated collection."""
        items: list[dict[str, Any]] = []
        while True:
            body = self.get(path, limit=page, offset=len(items), **params) or {}
            batch = body.get(collection) or []
            items.extend(batch)
            if not batch or len(items) >= int(body.get("total_entries") or 0):
                return items


def api_from_env() -> AirflowApi:
    """An authenticated client from the environment (see the module docstring)."""
    url = os.environ.get("AIRFLOW_API_URL", "http://127.0.0.1:8080")
    token = os.environ.get("AIRFLOW_API_TOKEN")
    username = os.environ.get("AIRFLOW_API_USERNAME")
    password = os.environ.get("AIRFLOW_API_PASSWORD")
    if not token and not username:
        generated = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow")) / \
            "simple_auth_manager_passwords.json.generated"
        if generated.exists():
            username, password = next(iter(json.loads(generated.read_text()).items()))
    return AirflowApi(url, token=token, username=username, password=password)


@dataclass
class RunStatus:
    """Everything ``render`` prints, gathered from the API."""

    dag_id: str
    run: dict[str, Any] | None
    task_instances: list[dict[str, Any]] = field(default_factory=list)
    partitions: dict[int, dict[str, Any]] = field(default_factory=dict)  # map index -> discover's partition
    progress: dict[int, dict[str, Any]] = field(default_factory=dict)  # map index -> ledger progress
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)  # map index -> load_partition's XCom
    plan: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None


def _xcom(api: AirflowApi, dag_id: str, run_id: str, task_id: str, key: str = "return_value",
          map_index: int = -1) -> Any:
    body = api.get(f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/{key}",
                   map_index=map_index, deserialize="true")
    return None if body is None else body.get("value")


def _ledger_progress(value: Any) -> dict[str, Any] | None:
    """The ``progress`` part of a ledger (mirrors ``sf_datacloud_sync.utils.ledger.read_progress``)."""
    if not isinstance(value, Mapping):
        return None
    counters = value.get("counters") or {}
    return {"label": value.get("label"), "phase": value.get("phase"), "rows": counters.get("rows"),
            "upserted": counters.get("upserted"), **(value.get("progress") or {})}


def collect(api: AirflowApi, dag_id: str = DAG_ID, run_id: str | None = None, workers: int = 8) -> RunStatus:
    """Read the latest run (or ``run_id``) of ``dag_id`` through the REST API."""
    if run_id is None:
        runs = (api.get(f"dags/{dag_id}/dagRuns", order_by="-run_after", limit=1) or {}).get("dag_runs") or []
        if not runs:
            return RunStatus(dag_id=dag_id, run=None)
        run = runs[0]
    else:
        run = api.get(f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
        if run is None:
            return RunStatus(dag_id=dag_id, run=None)
    rid = run["dag_run_id"]
    path = f"dags/{dag_id}/dagRuns/{quote(rid, safe='')}"
    status = RunStatus(dag_id=dag_id, run=run)
    status.task_instances = api.get_all(f"{path}/taskInstances", "task_instances")
    states = {ti["task_id"]: ti.get("state") for ti in status.task_instances if ti.get("map_index", -1) == -1}
    if states.get("discover") == "success":
        for item in _xcom(api, dag_id, rid, "discover") or []:
            p = item.get("partition", item)
            status.partitions[int(p["index"])] = p
        status.plan = _xcom(api, dag_id, rid, "discover", key="plan")
    loads = [ti for ti in status.task_instances if ti["task_id"] == LOAD_TASK and ti.get("map_index", -1) >= 0]

    def fetch(ti: dict[str, Any]) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None]:
        idx = int(ti["map_index"])
        if ti.get("state") in _NOT_STARTED:
            return idx, None, None
        entry = api.get(f"{path}/taskInstances/{LOAD_TASK}/state-store/{LEDGER_KEY}", map_index=idx)
        progress = _ledger_progress(entry.get("value")) if entry else None
        summary = _xcom(api, dag_id, rid, LOAD_TASK, map_index=idx) if ti.get("state") == "success" else None
        return idx, progress, summary

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for idx, progress, summary in pool.map(fetch, loads):
            if progress:
                status.progress[idx] = progress
            if isinstance(summary, Mapping):
                status.summaries[idx] = dict(summary)
    if states.get("verify") in ("success", "failed"):
        status.verify = _xcom(api, dag_id, rid, "verify")
    return status


def _num(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _range(p: Mapping[str, Any] | None) -> str:
    if not p:
        return ""
    if p.get("members"):
        return f"{len(p['members'])} lanes: {_range(p['members'][0])}" + (", …" if len(p["members"]) > 1 else "")
    if p.get("null_bucket"):
        return "NULL"
    lo = "−∞" if p.get("lower") is None else str(p["lower"])
    hi = "+∞" if p.get("upper") is None else str(p["upper"])
    if p.get("accounts"):
        lane = f"{len(p['accounts'])} accounts from {str(p['accounts'][0])[:18]}"
        return lane + (f" + [{lo[:18]}, {hi[:18]})" if p.get("with_range") else "")
    return f"[{lo[:18]}, {hi[:18]})"


def _since(iso: str | None, end: str | None = None) -> str:
    if not iso:
        return ""
    start = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    stop = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else datetime.now(start.tzinfo)
    seconds = int((stop - start).total_seconds())
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


def render(status: RunStatus, salesforce: Mapping[str, Any] | None = None) -> str:
    """The text ``make status`` prints."""
    lines: list[str] = []
    if status.run is None:
        lines.append(f"{status.dag_id}: no runs yet")
    else:
        run = status.run
        lines.append(f"{status.dag_id}  run {run['dag_run_id']}  {str(run.get('state')).upper()}  "
                     f"{'for ' if run.get('state') in ('running', 'queued') else 'took '}"
                     f"{_since(run.get('start_date'), run.get('end_date'))}")
        singles = {ti["task_id"]: ti for ti in status.task_instances if ti.get("map_index", -1) == -1}
        plan = status.plan or {}
        discover = singles.get("discover", {})
        tasks = plan.get("partition_count", 0)
        members = plan.get("member_count") or tasks  # partitions_per_task > 1: several partitions per task
        in_tasks = f" in {tasks} tasks" if members != tasks else ""
        detail = f"  {plan.get('total_rows', 0):,} rows, {members} partitions{in_tasks} by {plan.get('key')}" \
            if plan else ""
        lines.append(f"discover        {discover.get('state') or '-'}{detail}")
        loads = sorted((ti for ti in status.task_instances if ti["task_id"] == LOAD_TASK
                        and ti.get("map_index", -1) >= 0), key=lambda ti: ti["map_index"])
        if loads:
            header = ("idx", "partition", "state", "try", "range", "expected", "read", "done", "failed",
                      "open jobs", "phase", "time")
            rows = []
            totals = {"expected": 0, "read": 0, "done": 0, "failed": 0, "open": 0}
            for ti in loads:
                idx = int(ti["map_index"])
                p = status.partitions.get(idx, {})
                prog = status.progress.get(idx) or {}
                summ = status.summaries.get(idx) or {}
                read = prog.get("read", summ.get("rows"))
                done = summ.get("rows", prog.get("rows", prog.get("uploaded")))
                failed = summ.get("failed", prog.get("failed"))
                open_jobs = prog.get("jobs_open") if not summ else 0
                label = ti.get("rendered_map_index") or p.get("label") or str(idx)
                rows.append((str(idx), label, str(ti.get("state") or "-"), str(ti.get("try_number") or "-"),
                             _range(p), _num(p.get("expected_rows")), _num(read), _num(done), _num(failed),
                             _num(open_jobs), str(prog.get("phase") or ""),
                             _since(ti.get("start_date"), ti.get("end_date"))))
                for k, v in (("expected", p.get("expected_rows")), ("read", read), ("done", done),
                             ("failed", failed), ("open", open_jobs)):
                    totals[k] += int(v or 0)
            states: dict[str, int] = {}
            for ti in loads:
                states[str(ti.get("state"))] = states.get(str(ti.get("state")), 0) + 1
            rows.append(("", "TOTAL", ", ".join(f"{n} {s}" for s, n in sorted(states.items())), "", "",
                         _num(totals["expected"]), _num(totals["read"]), _num(totals["done"]),
                         _num(totals["failed"]), _num(totals["open"]), "", ""))
            lines.append(_table(header, rows, numeric={0, 3, 5, 6, 7, 8, 9}))
        else:
            lines.append("load_partition  " + ("no partitions (nothing to load)" if discover.get("state") == "success"
                                               else "not started"))
        verify = singles.get("verify", {})
        verdict = ""
        if status.verify:
            v = status.verify
            verdict = (f"  upserted {v.get('upserted', 0):,}, failed {v.get('failed', 0):,}, Salesforce "
                       f"{_num(v.get('salesforce_count'))} vs expected {_num(v.get('expected_salesforce_count'))}")
        lines.append(f"verify          {verify.get('state') or '-'}{verdict}")
    if salesforce:
        if "error" in salesforce:
            lines.append(f"Salesforce      count unavailable: {salesforce['error']}")
        else:
            lines.append(f"Salesforce      {salesforce['object']}: {salesforce['total']:,} in total, "
                         f"{salesforce['with_external_id']:,} with {salesforce['external_id_field']}")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def render_verify(summary: Mapping[str, Any] | None) -> str:
    """``verify``'s returned summary as a table (what the demo prints at the end)."""
    if not summary:
        return "verify: no summary (it did not succeed; its log has the reconciliation table and the problems)"
    header = ("partition", "range", "state", "rows", "upserted", "failed", "retried", "seconds")
    rows = [(str(r.get("label", "")), str(r.get("range", "")), str(r.get("state", "")), _num(r.get("rows")),
             _num(r.get("upserted")), _num(r.get("failed")), _num(r.get("retried")),
             "-" if r.get("duration_s") is None else f"{float(r['duration_s']):.1f}")
            for r in summary.get("partitions") or []]
    rows.append(("TOTAL", f"{summary.get('partition_count', 0)} partitions", "ok" if summary.get("ok") else "FAILED",
                 _num(summary.get("rows")), _num(summary.get("upserted")), _num(summary.get("failed")),
                 _num(summary.get("retried")), f"{float(summary.get('duration_s') or 0):.1f}"))
    lines = [_table(header, rows, numeric={3, 4, 5, 6, 7})]
    if summary.get("partitions_truncated"):
        lines.append("(more partitions in verify's log)")
    if summary.get("dry_run"):
        lines.append("dry run: nothing was written to Salesforce")
    elif "salesforce_count" in summary:
        lines.append(f"Salesforce: {_num(summary.get('salesforce_count'))} Opportunities with an external id "
                     f"(before the run: {_num(summary.get('salesforce_count_before'))}); expected "
                     f"{_num(summary.get('expected_salesforce_count'))} = {_num(summary.get('keyed_rows'))} Data "
                     f"Cloud rows with an external id - permanently failed ones; difference "
                     f"{summary.get('difference')} (tolerance {summary.get('tolerance')})")
    if summary.get("failed_by_code"):
        lines.append("permanently failed rows by error code: " + ", ".join(
            f"{code} {n:,}" for code, n in summary["failed_by_code"].items()))
    for artifact in summary.get("artifacts") or []:
        lines.append(f"failed rows: {artifact}")
    return "\n".join(lines)


def salesforce_totals() -> dict[str, Any]:
    """Opportunity totals via the sync's own hook and connection; ``{"error": ...}`` when unreachable."""
    try:
        sys.path.insert(0, str(ROOT / "plugins"))
        from sf_datacloud_sync.config import load_config
        from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

        cfg = load_config()
        hook = SalesforceBulk2Hook(cfg.salesforce_conn_id)
        try:
            total = hook.query_count(f"SELECT COUNT() FROM {cfg.target_object}")
            keyed = hook.query_count(f"SELECT COUNT() FROM {cfg.target_object} WHERE {cfg.external_id_field} != null")
        finally:
            hook.close()
        return {"object": cfg.target_object, "total": total, "with_external_id": keyed,
                "external_id_field": cfg.external_id_field}
    except Exception as exc:
        return {"error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}


def main(argv: list[str] | None = None, *, api_factory: Callable[[], AirflowApi] = api_from_env) -> int:
    parser = argparse.ArgumentParser(prog="make status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", help="a specific run instead of the latest")
    parser.add_argument("--dag-id", default=DAG_ID)
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until the run ends")
    parser.add_argument("--no-salesforce", action="store_true", help="skip the Salesforce count")
    parser.add_argument("--verify", action="store_true", help="also print verify's reconciliation table")
    args = parser.parse_args(argv)
    load_demo_settings()
    try:
        api = api_factory()
    except Exception as exc:
        print(f"cannot reach Airflow's API at {os.environ.get('AIRFLOW_API_URL', 'http://127.0.0.1:8080')}: {exc}\n"
              f"(is `make demo` or your Airflow running? set AIRFLOW_API_URL / AIRFLOW_API_USERNAME / "
              f"AIRFLOW_API_PASSWORD)", file=sys.stderr)
        return 2
    while True:
        status = collect(api, args.dag_id, args.run_id)
        text = render(status, None if args.no_salesforce else salesforce_totals())
        if args.verify and status.run is not None:
            text += "\n\n" + render_verify(status.verify)
        if args.watch:
            print("\033[2J\033[H", end="")
        print(text, flush=True)
        running = status.run is not None and status.run.get("state") in ("running", "queued")
        if not args.watch or not running:
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())

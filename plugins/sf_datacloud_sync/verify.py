"""What the ``verify`` task checks after every partition has finished (or failed).

A run is only green when all of this holds (``tolerance`` is the ``tolerance`` DAG param, default 0):

1. **Every planned partition reported.** ``discover``'s list is the reference: a mapped task that failed, was
   marked failed or was skipped pushes no summary, and Airflow's lazy XCom sequence silently leaves it out.
2. **Every partition accounts for every row it read**: ``rows == upserted + failed`` (``failed`` = rows
   Salesforce rejected for good; transient failures that a later job fixed count as upserted).
3. **Nothing was lost between Data Cloud and the partitions**: the rows read add up to the rows ``discover``
   counted, within ``tolerance`` (a difference means Data Cloud changed during the run or rows were skipped).
4. **Salesforce agrees.** After the run, ``SELECT COUNT() FROM Opportunity WHERE ExternalId__c != null`` must be

       expected = keyed_rows - failed_keyed_rows

   within ``tolerance``, where ``keyed_rows`` are the Data Cloud rows that carry an external id (not NULL, not
   empty) and ``failed_keyed_rows`` are the permanently failed rows among them. Rows without an external id can
   never become an Opportunity with one; Salesforce rejects an upsert without its key, so they are among the
   failed rows and are taken out of them: ``failed_keyed_rows = failed - min(failed, unkeyed_rows)``.
   Each successfully upserted keyed row is exactly one Opportunity (created or updated), so with a target
   that only this sync writes, the difference is 0 -- also on the second night, because updating a record
   does not change the count. A *positive* difference means Opportunities with an external id exist that
   this run did not write: they existed before the run (its count is logged as ``before``) and are not in
   Data Cloud any more, or their row failed tonight after succeeding on an earlier night. A *negative*
   difference means rows reported as upserted are missing in Salesforce, or Data Cloud holds duplicate
   external ids that collapsed into one record.

In a dry run nothing was written, so only check 1 applies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The returned table is cut at this many partitions so the XCom stays small; the log has all of them.
MAX_TABLE_ROWS_IN_XCOM = 100


class VerificationError(AssertionError):
    """The run did not reconcile; the message lists every problem, one per line."""


def _partition_of(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """``discover`` returns ``{"partition": {...}}`` (the load operator's kwargs); accept the bare dict too."""
    inner = item.get("partition")
    return inner if isinstance(inner, Mapping) else item


def _range_text(p: Mapping[str, Any]) -> str:
    if p.get("members"):
        return " + ".join(_range_text(m) for m in p["members"])
    if p.get("null_bucket"):
        return f"{p.get('key', '')} IS NULL"
    lo = "-inf" if p.get("lower") is None else repr(p["lower"])
    hi = "+inf" if p.get("upper") is None else repr(p["upper"])
    if p.get("accounts"):
        accounts = list(p["accounts"])
        lane = f"{p.get('key', '')} IN ({', '.join(map(repr, accounts[:3]))}{', ...' if len(accounts) > 3 else ''})"
        return lane + (f" or [{lo}, {hi})" if p.get("with_range") else "")
    return f"[{lo}, {hi})"


@dataclass
class Reconciliation:
    """The outcome: a problem list (empty = green), the per-partition table and the totals."""

    problems: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """A fixed-width text table for the task log."""
        headers = ["partition", "range", "state", "rows", "upserted", "failed", "retried", "duration_s"]
        body = [[r["label"], r["range"], r["state"], *(_fmt(r.get(k)) for k in headers[3:])] for r in self.rows]
        t = self.totals
        body.append(["TOTAL", f"{len(self.rows)} partitions", "ok" if self.ok else "FAILED",
                     *(_fmt(t.get(k)) for k in ("rows", "upserted", "failed", "retried", "duration_s"))])
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=True)]
        numeric = {3, 4, 5, 6, 7}

        def line(cells: Sequence[Any]) -> str:
            return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(headers), rule, *(line(b) for b in body[:-1]), rule, line(body[-1])])

    def as_dict(self) -> dict[str, Any]:
        """What the task returns (XCom): totals, the problems, and the table (cut for very many partitions)."""
        return {
            "ok": self.ok,
            **self.totals,
            "problems": self.problems,
            "partitions": self.rows[:MAX_TABLE_ROWS_IN_XCOM],
            "partitions_truncated": len(self.rows) > MAX_TABLE_ROWS_IN_XCOM,
        }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def expected_salesforce_count(keyed_rows: int, unkeyed_rows: int, failed_rows: int) -> int:
    """Opportunities with an external id the run should leave behind (see check 4 in the module docstring)."""
    failed_keyed = failed_rows - min(failed_rows, unkeyed_rows)
    return keyed_rows - failed_keyed


def reconcile(partitions: Sequence[Mapping[str, Any]], summaries: Iterable[Mapping[str, Any] | None],
              plan: Mapping[str, Any] | None, *, salesforce_count: int | None, tolerance: int = 0,
              dry_run: bool = False) -> Reconciliation:
    """Compare what ``discover`` planned with what the partitions reported and what Salesforce holds."""
    result = Reconciliation()
    if tolerance < 0:
        raise ValueError("tolerance must not be negative")
    if plan is None:
        result.problems.append("discover did not finish: there is no plan to verify against (see its log)")
    planned = sorted((_partition_of(p) for p in partitions), key=lambda p: int(p["index"]))
    by_index: dict[int, Mapping[str, Any]] = {}
    for s in summaries:
        if isinstance(s, Mapping) and "index" in s:
            by_index[int(s["index"])] = s
    planned_indexes = {int(p["index"]) for p in planned}
    for extra in sorted(set(by_index) - planned_indexes):
        result.problems.append(f"partition index {extra} reported a result but discover did not plan it")

    totals: Counter[str] = Counter()
    failed_by_code: Counter[str] = Counter()
    artifacts: list[str] = []
    missing = 0
    for p in planned:
        idx = int(p["index"])
        label = str(p.get("label") or f"P{idx:02d}")
        row: dict[str, Any] = {"index": idx, "label": label, "range": _range_text(p),
                               "expected_rows": p.get("expected_rows")}
        s = by_index.get(idx)
        if s is None:
            missing += 1
            row["state"] = "MISSING"
            result.problems.append(f"{label}: no result -- the task failed, was marked failed or was skipped "
                                   f"(see its log; clear it to load this partition again)")
            result.rows.append(row)
            continue
        rows, upserted, failed = (int(s.get(k) or 0) for k in ("rows", "upserted", "failed"))
        row.update(rows=rows, upserted=upserted, failed=failed, retried=int(s.get("retried") or 0),
                   duration_s=s.get("duration_s"), jobs=s.get("job_count"), artifact=s.get("artifact"))
        row["state"] = "dry run" if dry_run else "ok"
        if not dry_run and rows != upserted + failed:
            row["state"] = "MISMATCH"
            result.problems.append(f"{label}: read {rows:,} rows but upserted {upserted:,} + failed {failed:,} = "
                                   f"{upserted + failed:,} ({rows - upserted - failed:+,} rows unaccounted for)")
        elif failed and not dry_run:
            row["state"] = "ok, some failed"
        for k in ("rows", "upserted", "failed", "retried"):
            totals[k] += row[k]
        totals["duration_s"] += float(s.get("duration_s") or 0.0)
        failed_by_code.update({str(k): int(v) for k, v in (s.get("failed_by_code") or {}).items()})
        if failed and s.get("artifact"):
            artifacts.append(str(s["artifact"]))
        result.rows.append(row)

    result.totals = {
        "dry_run": dry_run,
        "partition_count": len(planned),
        "reported": len(planned) - missing,
        "rows": totals["rows"],
        "upserted": totals["upserted"],
        "failed": totals["failed"],
        "retried": totals["retried"],
        "duration_s": round(totals["duration_s"], 1),
        "failed_by_code": dict(failed_by_code.most_common()),
        "artifacts": artifacts,
        "tolerance": tolerance,
    }
    if plan is None or dry_run or missing:
        # A missing partition already fails the run; totals over the others would only add noise.
        return result

    planned_rows = int(plan.get("total_rows") or 0)
    if abs(totals["rows"] - planned_rows) > tolerance:
        result.problems.append(
            f"Data Cloud had {planned_rows:,} rows when discover ran but the partitions read {totals['rows']:,} "
            f"({totals['rows'] - planned_rows:+,}): Data Cloud changed during the run, or rows were skipped")

    keyed, unkeyed = int(plan.get("keyed_rows") or 0), int(plan.get("unkeyed_rows") or 0)
    expected = expected_salesforce_count(keyed, unkeyed, totals["failed"])
    before = plan.get("salesforce_count_before")
    result.totals.update(data_cloud_rows=planned_rows, keyed_rows=keyed, unkeyed_rows=unkeyed,
                         expected_salesforce_count=expected, salesforce_count=salesforce_count,
                         salesforce_count_before=before)
    if salesforce_count is None:
        result.problems.append("the Salesforce count could not be read")
        return result
    difference = salesforce_count - expected
    result.totals["difference"] = difference
    if abs(difference) > tolerance:
        if difference > 0:
            why = (f"Salesforce holds {difference:,} Opportunities with an external id that this run did not "
                   f"write (there were {before if before is not None else '?'} before the run): records created "
                   f"elsewhere, rows deleted from Data Cloud, or rows failing tonight that loaded on an earlier "
                   f"night. Raise the tolerance param if that is expected")
        else:
            why = (f"{-difference:,} rows reported as upserted are not in Salesforce, or Data Cloud holds "
                   f"duplicate external ids that collapsed into one record")
        result.problems.append(
            f"Salesforce count {salesforce_count:,} != expected {expected:,} = {keyed:,} Data Cloud rows with an "
            f"external id - {totals['failed'] - min(totals['failed'], unkeyed):,} of them failed permanently "
            f"(tolerance {tolerance:,}): {why}")
    return result


def _as_list(value: Any) -> list[Any]:
    """``xcom_pull`` gives ``None`` (nothing), one value (one map index) or a list; always a list here."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    return [v for v in value if v is not None]


def run_verify(params: Mapping[str, Any], ti: Any, config_path: str | None = None,
               load_task_id: str = "load_partition", discover_task_id: str = "discover") -> dict[str, Any]:
    """Body of the ``verify`` task: pull what discover planned and what the partitions reported, reconcile.

    Everything is pulled here rather than passed as task arguments so that a failed ``discover`` or a mapped
    task with failed (or zero) indexes still gets a precise verdict instead of an XCom resolution error.
    """
    import logging

    from airflow.sdk.exceptions import AirflowFailException

    log = logging.getLogger(__name__)
    dry_run = bool(params.get("dry_run"))
    tolerance = int(params.get("tolerance") or 0)
    plan = ti.xcom_pull(task_ids=discover_task_id, key="plan")
    partitions = _as_list(ti.xcom_pull(task_ids=discover_task_id, key="return_value"))
    summaries = _as_list(ti.xcom_pull(task_ids=load_task_id, key="return_value")) if partitions else []
    salesforce_count = None
    reported = {int(s["index"]) for s in summaries if isinstance(s, Mapping) and "index" in s}
    all_reported = all(int(_partition_of(p)["index"]) in reported for p in partitions)
    if plan is not None and not dry_run and all_reported:
        from sf_datacloud_sync.config import load_config
        from sf_datacloud_sync.discover import salesforce_count_soql
        from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

        cfg = load_config(config_path)
        hook = SalesforceBulk2Hook(cfg.salesforce_conn_id)
        try:
            salesforce_count = hook.query_count(salesforce_count_soql(cfg))
        finally:
            hook.close()
    result = reconcile(partitions, summaries, plan, salesforce_count=salesforce_count, tolerance=tolerance,
                       dry_run=dry_run)
    t = result.totals
    log.info("reconciliation%s:\n%s", " (dry run: nothing was written)" if dry_run else "", result.table())
    if not dry_run and "expected_salesforce_count" in t:
        log.info("Salesforce: %s records with an external id (before the run: %s); expected %s = %s Data Cloud "
                 "rows with an external id - permanently failed ones; difference %s (tolerance %s)",
                 t.get("salesforce_count"), t.get("salesforce_count_before"), t.get("expected_salesforce_count"),
                 t.get("keyed_rows"), t.get("difference"), tolerance)
    if t.get("failed_by_code"):
        log.info("permanently failed rows by error code: %s", t["failed_by_code"])
    for artifact in t.get("artifacts") or []:
        log.info("failed rows with their errors: %s", artifact)
    if not result.ok:
        raise AirflowFailException("verification failed:\n" + "\n".join(f"  - {p}" for p in result.problems))
    return result.as_dict()

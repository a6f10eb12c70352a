"""Wait for a set of Bulk API 2.0 ingest jobs in the triggerer, without holding a worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

# Imported here, not in run(): an import inside the triggerer's event loop blocks every other trigger (~0.5 s).
from sf_datacloud_sync.hooks._http import SalesforceApiError
from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
from sf_datacloud_sync.utils.progress import seconds_left

TERMINAL_STATES = frozenset({"JobComplete", "Failed", "Aborted"})
_ERROR_TEXT = 500


class BulkJobsTrigger(BaseTrigger):
    """
    Poll Bulk API 2.0 ingest jobs until every one is finished, or until the deadline.

    Fires exactly one small event: ``{"status": "success" | "timeout" | "error", "jobs": {job_id: {"state",
    "processed", "failed"[, "error"]}}, "message": str}``. ``timeout`` means the jobs are *still running* at
    Salesforce (nothing failed); the task can wait for them again. Rows never travel in the event.

    :param conn_id: Airflow ``salesforce`` connection id.
    :param job_ids: Ingest jobs to wait for.
    :param poll_interval: First interval between polls (seconds); grows 1.5x per poll.
    :param max_poll_interval: Cap of the poll interval (seconds).
    :param timeout: Seconds to wait at most.
    :param deadline: Absolute deadline (epoch seconds); computed from ``timeout`` when not given and then
        serialized, so that a trigger moved to another triggerer keeps the original deadline.
    :param label: The partition label, for log lines.
    :param min_wait: Seconds after deferral before the event may fire. Airflow 3.3 can fail a resumed task when
        the trigger fires before the scheduler has drained the worker's defer-exit event (apache/airflow#72716,
        #71580); Bulk jobs take longer than this anyway, so the wait costs nothing in practice.
    :param not_before: Absolute form of ``min_wait`` (epoch seconds), serialized like ``deadline``.
    :param job_records: Rows uploaded per job. With them, once the oldest running job shows progress, the next poll
        is timed from its processing rate (half the estimated time left, at most twice ``max_poll_interval``)
        instead of the fixed back-off: a long wait costs a handful of requests, not one per ``max_poll_interval``.
    """

    def __init__(self, conn_id: str, job_ids: list[str], poll_interval: float = 2.0, max_poll_interval: float = 30.0,
                 timeout: float = 21_600.0, deadline: float | None = None, label: str = "", min_wait: float = 0.0,
                 not_before: float | None = None, job_records: dict[str, int] | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.job_ids = list(dict.fromkeys(job_ids))
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = max(float(max_poll_interval), self.poll_interval)
        self.timeout = float(timeout)
        self.deadline = float(deadline) if deadline is not None else time.time() + self.timeout
        self.label = label
        self.min_wait = float(min_wait)
        self.not_before = float(not_before) if not_before is not None else time.time() + self.min_wait
        self.job_records = {str(k): int(v) for k, v in (job_records or {}).items()}
        self._pending: list[str] = list(self.job_ids)
        self._first_seen: dict[str, tuple[float, int]] = {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "sf_datacloud_sync.triggers.bulk_jobs.BulkJobsTrigger",
            {
                "conn_id": self.conn_id,
                "job_ids": self.job_ids,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "timeout": self.timeout,
                "deadline": self.deadline,
                "label": self.label,
                "min_wait": self.min_wait,
                "not_before": self.not_before,
                "job_records": self.job_records,
            },
        )

    def _hook(self) -> Any:
        return SalesforceBulk2Hook(salesforce_conn_id=self.conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        jobs: dict[str, dict[str, Any]] = {j: {"state": "Unknown", "processed": 0, "failed": 0} for j in self.job_ids}
        interval = self.poll_interval
        last_line = ""

        try:
            while True:
                unreachable = ""
                try:
                    # Oldest first, up to the first job still running: ~one request per round, not one per job.
                    for job_id, info in await hook.apoll_in_order(self._pending):
                        entry = {"state": str(info.get("state") or "Unknown"),
                                 "processed": int(info.get("numberRecordsProcessed") or 0),
                                 "failed": int(info.get("numberRecordsFailed") or 0)}
                        if info.get("errorMessage"):
                            entry["error"] = str(info["errorMessage"])[:_ERROR_TEXT]
                        jobs[job_id] = entry
                except SalesforceApiError as exc:
                    if not exc.retryable:
                        # A job that no longer exists or a login that stopped working: waiting cannot fix it.
                        yield TriggerEvent(self._event("error", jobs, f"polling Bulk jobs failed: {exc}"))
                        return
                    # The hook already retried within its budget; Salesforce may be down for longer. The jobs run
                    # on regardless, so keep polling until the deadline rather than calling anything failed.
                    unreachable = f" (last poll failed: {exc})"
                    self.log.warning("%sBulk job status not available; polling again%s", self._prefix, unreachable)
                self._pending = [j for j in self._pending if jobs[j]["state"] not in TERMINAL_STATES]
                if not self._pending:
                    await asyncio.sleep(max(0.0, self.not_before - time.time()))
                    failed = [j for j, e in jobs.items() if e["state"] != "JobComplete"]
                    note = f"; {len(failed)} ended Failed/Aborted: {', '.join(failed[:10])}" if failed else ""
                    yield TriggerEvent(self._event("success", jobs, f"{len(jobs)} Bulk jobs finished{note}"))
                    return
                line = self._progress(jobs)
                if line != last_line:
                    self.log.info("%s%s", self._prefix, line)
                    last_line = line
                remaining = self.deadline - time.time()
                if remaining <= 0:
                    ids = ", ".join(self._pending[:20]) + (" ..." if len(self._pending) > 20 else "")
                    yield TriggerEvent(self._event(
                        "timeout", jobs,
                        f"{len(self._pending)} Bulk jobs STILL RUNNING at Salesforce after waiting {self.timeout:.0f}s "
                        f"(not failed; a retry re-attaches to them): {ids}{unreachable}"))
                    return
                await asyncio.sleep(min(self._estimate(jobs, interval), remaining))
                interval = min(self.max_poll_interval, interval * 1.5)
        finally:
            await hook.aclose()

    async def on_kill(self) -> None:
        """The user marked the task failed/success or cleared it: abort the jobs still running at Salesforce.

        Rows already committed by Salesforce stay committed; a cleared task finds these jobs ``Aborted`` in its
        ledger and sends their unprocessed rows again.
        """
        hook = self._hook()
        try:
            for job_id in list(self._pending):
                try:
                    info = await hook.aabort_job(job_id)
                    self.log.info("%sAborted Bulk job %s (%s)", self._prefix, job_id, info.get("state"))
                except SalesforceApiError as exc:
                    # INVALIDJOBSTATE: it finished meanwhile; nothing left to stop.
                    self.log.warning("%sCould not abort Bulk job %s: %s", self._prefix, job_id, exc)
        finally:
            await hook.aclose()

    # -- helpers -----------------------------------------------------------------------------------------------
    @property
    def _prefix(self) -> str:
        return f"{self.label} " if self.label else ""

    def _estimate(self, jobs: dict[str, dict[str, Any]], backoff: float) -> float:
        """Seconds until the next poll: from the oldest running job's processing rate when known, else ``backoff``.

        Half the estimated time left, so a speed-up (threads freed by other jobs) is noticed within a poll or two.
        """
        job_id = self._pending[0]
        processed = int(jobs[job_id]["processed"])
        now = time.monotonic()
        since, start = self._first_seen.setdefault(job_id, (now, processed))
        left = seconds_left((since, start), now, processed, self.job_records.get(job_id) or 0)
        if left is None:
            return backoff
        return max(self.poll_interval, min(left / 2, 2 * self.max_poll_interval))

    @staticmethod
    def _progress(jobs: dict[str, dict[str, Any]]) -> str:
        done = sum(1 for e in jobs.values() if e["state"] in TERMINAL_STATES)
        processed = sum(e["processed"] for e in jobs.values())
        failed = sum(e["failed"] for e in jobs.values())
        return (f"Bulk jobs done {done}/{len(jobs)}, records processed {processed}, failed {failed} "
                f"(states: {_state_counts(jobs)})")

    def _event(self, status: str, jobs: dict[str, dict[str, Any]], message: str) -> dict[str, Any]:
        # Jobs never asked (an older one was still running) are left out: the task asks for them itself.
        return {"status": status, "jobs": {j: e for j, e in jobs.items() if e["state"] != "Unknown"},
                "message": message}


def _state_counts(jobs: dict[str, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for e in jobs.values():
        counts[e["state"]] = counts.get(e["state"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

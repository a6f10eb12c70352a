"""Emergency stop: abort a partition's Bulk jobs when a person marks its run or task failed.

What Airflow 3.3.2 runs when a ``load_partition`` task instance is marked failed depends on where the partition is:

* **streaming in a worker**: the supervisor's next heartbeat (every ``[workers] min_heartbeat_interval``, 5 s) is
  answered 409; the supervisor SIGTERMs the task, whose signal handler calls
  :meth:`LoadPartitionOperator.on_kill <sf_datacloud_sync.operators.load_partition.LoadPartitionOperator.on_kill>`;
* **waiting in the triggerer**: the triggerer cancels the trigger "by user action" and awaits
  :meth:`BulkJobsTrigger.on_kill <sf_datacloud_sync.triggers.bulk_jobs.BulkJobsTrigger.on_kill>`;
* **handing over**, last upload done and ``self.defer()`` on its way: neither. The server refuses the deferral
  (``409 TI was not in the running state``); the task runner logs "Failed to report terminal task state" and, the
  state being DEFERRED, exits 0 after ``finalize()``, which runs no callback for DEFERRED, before the next
  heartbeat. No trigger ever exists;
* **just deferred**, the trigger not started yet: neither. Marked failed before the triggerer's next
  ``clean_unused()`` (up to about a second), the trigger row is deleted without ever running, so no ``on_kill``.

A task's ``on_failure_callback`` does not help: 3.3.2 runs it in the task process only when the task itself ends
FAILED, never for a state set through the API (the scheduler only sends a failure callback for a task instance it
still sees queued or running). What does run is the API server's listener hook ``on_task_instance_failed``, fired
for every task instance the ``PATCH`` stopped, and the task runner's ``before_stopping``. So two more pieces:

* :class:`AttemptEndGuard` (task process): at the end of ``finalize()``, whatever the outcome, if the server says the
  task instance ended in a state this process did not report, abort every job of the partition not finished;
* :class:`MarkedFailedListener` (API server, registered by ``plugins/sf_datacloud_sync_plugin.py``): when a
  ``load_partition`` task instance is marked failed, read its ledger from the task state store and abort its jobs
  not finished, in a background thread.

Aborting a job twice is harmless: Salesforce answers ``400 INVALIDJOBSTATE`` for a finished job (ignored here).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pluggy import HookimplMarker

log = logging.getLogger(__name__)
#: Marks listener methods for Airflow's listener manager (what ``airflow.listeners.hookimpl`` is).
hookimpl = HookimplMarker("airflow")

#: Task instance states that end an attempt for good. Set by someone else while the task still held jobs, they
#: mean "stop": nothing will resume the partition and wait for its jobs.
ENDED_STATES = frozenset({"failed", "success", "skipped", "upstream_failed", "removed"})

_current: AttemptEndGuard | None = None


def is_finished_error(exc: BaseException) -> bool:
    """Salesforce's answer to aborting a job that finished meanwhile (400 ``INVALIDJOBSTATE``) or is gone (404)."""
    from sf_datacloud_sync.hooks._http import SalesforceApiError

    return isinstance(exc, SalesforceApiError) and (
        (exc.status == 400 and exc.error_code.upper() == "INVALIDJOBSTATE") or exc.status == 404)


def abort_jobs(bulk: Any, job_ids: Iterable[str], *, label: str = "", logger: Any = None) -> dict[str, str]:
    """Abort each job; a job that already finished is not an error. Never raises for a single job.

    :param bulk: A :class:`~sf_datacloud_sync.hooks.salesforce_bulk2.SalesforceBulk2Hook`.
    :return: job id → ``"Aborted"``, ``"finished"`` (it was no longer open) or ``"error: ..."``.
    """
    logger = logger or log
    prefix = f"{label}: " if label else ""
    outcome: dict[str, str] = {}
    for job_id in job_ids:
        try:
            info = bulk.abort_job(job_id)
            outcome[job_id] = str(info.get("state") or "Aborted")
            logger.info("%saborted Bulk job %s (%s)", prefix, job_id, outcome[job_id])
        except Exception as exc:
            if is_finished_error(exc):
                outcome[job_id] = "finished"
                logger.info("%sBulk job %s had already finished; nothing to abort", prefix, job_id)
            else:  # unreachable or refused: keep going with the others
                outcome[job_id] = f"error: {exc}"
                logger.warning("%scould not abort Bulk job %s: %s", prefix, job_id, exc)
    return outcome


def server_state(ti: Any) -> str | None:
    """The task instance's state as the API server has it now (``None`` if unknown)."""
    map_index = getattr(ti, "map_index", -1)
    map_index = -1 if map_index is None else int(map_index)
    states = ti.get_task_states(dag_id=ti.dag_id, map_index=map_index if map_index >= 0 else None,
                                task_ids=[ti.task_id], run_ids=[ti.run_id])
    of_run: Mapping[str, Any] = (states or {}).get(ti.run_id) or {}
    key = ti.task_id if map_index < 0 else f"{ti.task_id}_{map_index}"
    state = of_run.get(key)
    return None if state is None else str(getattr(state, "value", state))


class AttemptEndGuard:
    """Aborts the partition's open jobs when the task process stops after someone else ended the attempt.

    Registered with the task runner's listener manager while a ``load_partition`` attempt runs (one per task
    process; installing a new one retires the previous). ``before_stopping`` fires once, after the runner has sent
    its outcome (success, retry, failure or deferral) and run ``finalize()``.

    :param ti: The runtime task instance (``context["ti"]``): its ``state`` is what this process reported,
        ``get_task_states`` asks the server.
    :param open_job_ids: The partition's jobs not finished yet, from the live ledger.
    :param abort: Aborts the given jobs (see :func:`abort_jobs`).
    :param label: The partition label, for log lines.
    :param logger: Where to log (the task's logger).
    """

    def __init__(self, ti: Any, open_job_ids: Callable[[], list[str]], abort: Callable[[list[str]], Any], *,
                 label: str = "", logger: Any = None) -> None:
        self.ti = ti
        self.open_job_ids = open_job_ids
        self.abort = abort
        self.label = label
        self.log = logger or log
        self.fired = False

    @classmethod
    def install(cls, ti: Any, open_job_ids: Callable[[], list[str]], abort: Callable[[list[str]], Any], *,
                label: str = "", logger: Any = None) -> AttemptEndGuard | None:
        """Register a guard for this attempt; ``None`` outside a task runner (no way to ask the server)."""
        global _current
        if not callable(getattr(ti, "get_task_states", None)):
            return None
        from airflow.sdk.listener import get_listener_manager

        manager = get_listener_manager()
        if _current is not None and manager.pm.is_registered(_current):
            manager.pm.unregister(_current)  # dag.test() runs many attempts in one process; one guard at a time
        _current = cls(ti, open_job_ids, abort, label=label, logger=logger)
        manager.add_listener(_current)
        return _current

    def reported_state(self) -> str | None:
        """The state this process reported for the attempt."""
        reported = getattr(self.ti, "state", None)
        return None if reported is None else str(getattr(reported, "value", reported))

    def ended_elsewhere(self) -> str | None:
        """The state someone else gave this attempt, or ``None`` when it ended as this process reported."""
        state = server_state(self.ti)
        if state in ENDED_STATES and state != self.reported_state():
            return state
        return None

    def check(self) -> dict[str, str]:
        """Abort the open jobs if the attempt was ended elsewhere; what was done, per job (empty: nothing)."""
        if self.fired:
            return {}
        self.fired = True
        job_ids = self.open_job_ids()
        if not job_ids:  # nothing to stop: no need to ask the server
            return {}
        try:
            state = self.ended_elsewhere()
        except Exception as exc:  # the server cannot be asked: leave the jobs, a clear re-attaches to them
            self.log.warning("%s: could not read this task instance's state at the end of the attempt: %s",
                             self.label, exc)
            return {}
        if state is None:
            return {}
        self.log.warning("%s: the task instance was marked %s while this attempt was ending (it reported %s); "
                         "aborting its %d Bulk jobs still open at Salesforce: %s", self.label, state,
                         self.reported_state(), len(job_ids), ", ".join(job_ids[:20]))
        return dict(self.abort(job_ids) or {})

    def uninstall(self) -> None:
        """Leave the listener manager (the guard holds the task, its hooks and their HTTP sessions)."""
        global _current
        from airflow.sdk.listener import get_listener_manager

        manager = get_listener_manager()
        if manager.pm.is_registered(self):
            manager.pm.unregister(self)  # safe inside the hook call: pluggy iterates over a copy
        if _current is self:
            _current = None

    @hookimpl
    def before_stopping(self, component: Any) -> None:
        """Task runner hook, at the very end of ``finalize()``; never raises into the runner."""
        try:
            self.check()
        except Exception:
            self.log.exception("%s: aborting the open Bulk jobs at the end of the attempt failed", self.label)
        finally:
            self.uninstall()


# -- the API server's side --------------------------------------------------------------------------------------------
def open_job_ids(ledger: Any) -> list[str]:
    """Jobs of a stored ledger value that may still be open or running at Salesforce."""
    from sf_datacloud_sync.utils.ledger import LEDGER_VERSION, UNFINISHED_STATES, Ledger

    if not isinstance(ledger, Mapping) or ledger.get("version") != LEDGER_VERSION:
        return []
    return Ledger(dict(ledger)).job_ids(UNFINISHED_STATES)


def abort_ledger_jobs(ledger: Mapping[str, Any], job_ids: list[str], *, logger: Any = None) -> dict[str, str]:
    """Abort ``job_ids`` (:func:`open_job_ids` of a stored ledger value) with the connection the partition used."""
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    conn_id = ledger.get("conn_id")
    if not conn_id:  # a ledger written before the connection was recorded in it
        from sf_datacloud_sync.config import load_config

        conn_id = load_config().salesforce_conn_id
    hook = SalesforceBulk2Hook(salesforce_conn_id=conn_id)
    try:
        return abort_jobs(hook, job_ids, label=str(ledger.get("label") or ""), logger=logger)
    finally:
        hook.close()


class MarkedFailedListener:
    """API-server listener: a ``load_partition`` task instance marked failed gets its open Bulk jobs aborted.

    ``on_task_instance_failed`` also fires in the scheduler and in task processes (``previous_state`` RUNNING, the
    task failed by itself: its jobs stay for a retry or a clear to re-attach); only the API's manual state change
    passes ``previous_state=None``. The aborts run in a daemon thread so that the request does not wait for
    Salesforce.

    :param operator: The operator class name whose task instances are watched.
    """

    def __init__(self, operator: str = "LoadPartitionOperator") -> None:
        self.operator = operator

    def wants(self, previous_state: Any, task_instance: Any) -> bool:
        return previous_state is None and getattr(task_instance, "operator", None) == self.operator

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        try:
            if not self.wants(previous_state, task_instance):
                return
            ti = task_instance
            key = (str(ti.dag_id), str(ti.run_id), str(ti.task_id), int(ti.map_index if ti.map_index is not None
                                                                         else -1))
        except Exception:  # never break the API request
            log.exception("emergency stop: could not read the task instance marked failed")
            return
        threading.Thread(target=self.stop, args=key, name=f"sync-stop-{key[2]}-{key[3]}", daemon=True).start()

    def stop(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict[str, str]:
        """Read the partition's ledger from the task state store and abort its open jobs; never raises."""
        try:
            import json

            from airflow.state import TaskScope, get_state_backend

            from sf_datacloud_sync.utils.ledger import LEDGER_KEY

            raw = get_state_backend().get(TaskScope(dag_id=dag_id, run_id=run_id, task_id=task_id,
                                                    map_index=map_index), LEDGER_KEY)
            ledger = json.loads(raw) if isinstance(raw, str) else raw
            job_ids = open_job_ids(ledger)
            if not job_ids:
                return {}
            log.warning("%s %s[%d] was marked failed with %d Bulk jobs open; aborting them: %s", run_id, task_id,
                        map_index, len(job_ids), ", ".join(job_ids[:20]))
            return abort_ledger_jobs(ledger, job_ids, logger=log)
        except Exception:
            log.exception("emergency stop: aborting the Bulk jobs of %s %s[%d] failed", run_id, task_id, map_index)
            return {}

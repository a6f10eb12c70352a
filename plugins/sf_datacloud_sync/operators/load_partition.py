"""Load one partition: Data Cloud rows → Bulk API 2.0 upsert jobs, resumable through a job ledger.

What one task instance does, in order (each step is recorded in the ledger, see
:mod:`sf_datacloud_sync.utils.ledger`, before the next one starts):

1. **Reconcile** the ledger with Salesforce (a retry, a clear or a resume after a crash): jobs whose upload
   was never confirmed are aborted and their rows streamed again, uploaded-but-unclosed jobs are closed,
   running jobs are re-attached, finished ones keep their results.
2. **Stream** the partition's rows in key order, strictly after the last committed key, into CSV chunks; one
   upsert job per chunk (``stream_rows_to_jobs``). Each job is in the ledger before its upload starts.
3. **Wait** for every running job in the triggerer (:class:`~sf_datacloud_sync.triggers.bulk_jobs.BulkJobsTrigger`),
   without holding a worker slot.
4. **Read the results** of the finished jobs as streams: rows that failed for a transient reason (row locks,
   ``API_TEMPORARILY_UNAVAILABLE``...) and rows a failed job never processed are sent again in follow-up jobs
   after a backoff, within a budget of rounds; every other failure goes to the partition's CSV artifact with
   Salesforce's error code and message. Then back to 3 until nothing runs.
5. **Return** a small summary; ``rows == upserted + failed`` is asserted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from sf_datacloud_sync.utils.ledger import (
    ABORTED,
    FAILED,
    JOB_COMPLETE,
    MAX_JOB_IDS,
    OPEN,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    UPLOAD_COMPLETE,
    UPLOADED,
    Ledger,
)
from sf_datacloud_sync.utils.partitions import Partition, order_columns, range_query
from sf_datacloud_sync.utils.serial_pacing import SerialPacer

if TYPE_CHECKING:
    from sf_datacloud_sync.config import SyncConfig
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
    from sf_datacloud_sync.utils.artifacts import FailedRowsArtifact
    from sf_datacloud_sync.utils.csv_encoder import CsvChunk
    from sf_datacloud_sync.utils.transfer import SubmittedJob

#: Job-level ``errorMessage`` prefixes (``"TooManyLockFailure : ..."``) after which the unprocessed rows are worth
#: sending again. Any other whole-job failure (``InvalidBatch : Field name not found``, ``ExceededQuota``...) needs
#: a person: the task fails with Salesforce's message.
TRANSIENT_JOB_ERRORS = frozenset({"TooManyLockFailure", "Unknown", "Timeout", "InternalServerError"})
UNPROCESSED_CODE = "UNPROCESSED"
MAX_BACKOFF_S = 300.0
MAX_QUERY_RESUMES = 5
SETTLE_TIMEOUT_S = 120.0
_DEFER_MARGIN_S = 600.0


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def job_error_code(message: str | None) -> str:
    """``"InvalidBatch : Field name not found : X"`` → ``"InvalidBatch"``."""
    return (message or "").split(":", 1)[0].strip()


class LoadPartitionOperator(BaseOperator):
    """
    Upsert one partition of the Data Cloud source into Salesforce through Bulk API 2.0 upsert jobs.

    Rows stream from Data Cloud in key order into CSV chunks, one job per chunk; the task then defers until
    Salesforce has finished them, re-sends rows that failed for transient reasons and writes the rest to a
    CSV artifact. A job ledger in the task state store makes retries and clears resume without uploading a
    row twice. Returns a small summary dict (never rows).

    :param partition: The partition (``Partition.to_dict()``), usually mapped from ``discover``.
    :param salesforce_conn_id: Airflow connection (default: the settings file's ``salesforce_conn_id``).
    :param config_path: Settings file (default: ``SYNC_CONFIG_PATH`` or ``include/sync_config.yaml``).
    :param max_records_per_job: Rows per Bulk job (templated; default: the settings file's).
    :param dry_run: Read and encode the rows and check the header against ``describe``; write nothing
        (templated).
    :param deferrable: Wait for the jobs in the triggerer (default) instead of polling from the worker.
    :param poll_interval: First job-status poll interval in seconds (default: the settings file's).
    """

    template_fields: Sequence[str] = ("max_records_per_job", "dry_run", "salesforce_conn_id", "config_path")
    ui_color = "#e3f2fd"

    def __init__(self, *, partition: dict[str, Any], salesforce_conn_id: str | None = None,
                 config_path: str | None = None, max_records_per_job: int | str | None = None,
                 dry_run: bool | str = False, deferrable: bool = True, poll_interval: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.partition = partition
        self.salesforce_conn_id = salesforce_conn_id
        self.config_path = config_path
        self.max_records_per_job = max_records_per_job
        self.dry_run = dry_run
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self._run: _PartitionRun | None = None

    # -- settings and hooks --------------------------------------------------------------------------------------
    @property
    def partition_label(self) -> str:
        """What the Grid view shows for this map index, e.g. ``P03 [OPP-0420…, OPP-0630)``."""
        try:
            return Partition.from_dict(self.partition).label
        except (TypeError, KeyError, AttributeError):
            return ""

    @cached_property
    def config(self) -> SyncConfig:
        from sf_datacloud_sync.config import load_config

        return load_config(self.config_path)

    @property
    def conn_id(self) -> str:
        return self.salesforce_conn_id or self.config.salesforce_conn_id

    @cached_property
    def bulk(self) -> SalesforceBulk2Hook:
        from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

        return SalesforceBulk2Hook(salesforce_conn_id=self.conn_id)

    @cached_property
    def datacloud(self) -> DataCloudHook:
        from sf_datacloud_sync.hooks.datacloud import DataCloudHook

        return DataCloudHook(salesforce_hook=self.bulk, dataspace=self.config.dataspace)

    @property
    def records_per_job(self) -> int:
        value = self.max_records_per_job
        if value in (None, ""):
            return self.config.load.max_records_per_job
        try:
            n = int(value)  # templated: "{{ params.max_records_per_job }}" may arrive as text
        except (TypeError, ValueError):
            raise AirflowFailException(f"max_records_per_job must be a whole number, got {value!r}") from None
        if n < 1:
            raise AirflowFailException(f"max_records_per_job must be at least 1, got {n}")
        return n

    def job_records(self, part: Partition) -> int:
        """Rows per job for ``part``: a serial partition's jobs are one internal batch at most."""
        if part.serial:
            return min(self.records_per_job, self.config.load.serial_job_records)
        return self.records_per_job

    # -- entry points --------------------------------------------------------------------------------------------
    def execute(self, context: Mapping[str, Any]) -> dict[str, Any]:
        if _as_bool(self.dry_run):
            return self._dry_run(context)
        run = self._open_run(context)
        if run.ledger.phase == "done":
            # A finished partition cleared again: its jobs are done and counted; report them, send nothing twice.
            self.log.info("%s was already loaded in this DAG run (ledger phase done); returning its summary",
                          run.label)
            return run.summary()
        run.reconcile()
        if not run.ledger.stream["done"]:
            run.stream_source()
        return self._advance(run)

    def execute_complete(self, context: Mapping[str, Any], event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after :class:`BulkJobsTrigger` fired; everything needed is in ``event`` and the ledger."""
        run = self._open_run(context)
        event = event or {}
        status = event.get("status")
        run.apply_job_states(event.get("jobs") or {})
        run.save()
        if status == "timeout":
            still = run.ledger.running_job_ids()
            raise AirflowException(
                f"{run.label}: {len(still)} Bulk jobs STILL RUNNING at Salesforce (not failed): "
                f"{', '.join(still[:20])}. A retry or a clear re-attaches to them. {event.get('message', '')}")
        if status != "success":
            raise AirflowException(f"{run.label}: waiting for Bulk jobs failed: {event.get('message') or event}")
        return self._advance(run)

    def on_kill(self) -> None:
        """Abort every job of this partition still open or running at Salesforce (mark failed, emergency stop).

        Runs in the task's signal handler: it only sends aborts and does not write the ledger (the next attempt
        reads the jobs' states from Salesforce anyway).
        """
        run = self._run
        if run is None:
            return
        run.killed.set()
        run.abort(run.unfinished_job_ids())

    # -- the loop ------------------------------------------------------------------------------------------------
    def _open_run(self, context: Mapping[str, Any]) -> _PartitionRun:
        from sf_datacloud_sync.stop import AttemptEndGuard

        run = self._run = _PartitionRun(self, context)
        # Marked failed while handing over to the triggerer, the attempt gets neither on_kill nor the trigger's:
        # the guard aborts the open jobs once the task runner is done (see sf_datacloud_sync.stop).
        AttemptEndGuard.install(context["ti"], run.unfinished_job_ids, run.abort, label=run.label, logger=self.log)
        return run

    def _advance(self, run: _PartitionRun) -> dict[str, Any]:
        """Wait for running jobs, then read results and send follow-ups, until nothing is left to do."""
        cfg = self.config.load
        while True:
            running = run.ledger.running_job_ids()
            if running:
                run.ledger.phase = "waiting"
                run.progress()
                # A serial partition knows its jobs take longer than that: defer at once.
                quick = not (run.part.serial and run.pacer.took_s > cfg.wait_before_defer_s)
                if self.deferrable and cfg.wait_before_defer_s > 0 and quick and not run.wait_here(
                        running, timeout=cfg.wait_before_defer_s, poll_interval=1.5):
                    # Finished within seconds (small jobs, a quick org): a deferral would cost the triggerer round
                    # trip, min_defer_s and a new task process, and more polls than this.
                    continue
                if self.deferrable:
                    from sf_datacloud_sync.triggers.bulk_jobs import BulkJobsTrigger

                    self.log.info("%s: waiting in the triggerer for %d Bulk jobs: %s", run.label, len(running),
                                  ", ".join(running[:10]) + (" ..." if len(running) > 10 else ""))
                    self.defer(
                        trigger=BulkJobsTrigger(conn_id=self.conn_id, job_ids=running,
                                                poll_interval=self.poll_interval or cfg.poll_interval_s,
                                                max_poll_interval=cfg.poll_max_interval_s,
                                                timeout=cfg.job_timeout_s, label=run.label,
                                                min_wait=cfg.min_defer_s,
                                                job_records={j: run.ledger.jobs[j]["records"] for j in running}),
                        method_name="execute_complete",
                        # Our trigger answers "timeout" at job_timeout_s; Airflow's own timeout is only a backstop.
                        timeout=timedelta(seconds=cfg.job_timeout_s + _DEFER_MARGIN_S),
                    )
                still = run.wait_here(running, timeout=cfg.job_timeout_s)
                if still:
                    raise AirflowException(
                        f"{run.label}: {len(still)} Bulk jobs STILL RUNNING at Salesforce (not failed): "
                        f"{', '.join(still[:20])}. A retry or a clear re-attaches to them.")
                continue
            if run.ledger.pending_round or run.ledger.finished_job_ids():
                run.check_fatal()
                run.process_round()
                continue
            return run.finish()

    # -- dry run -------------------------------------------------------------------------------------------------
    def _dry_run(self, context: Mapping[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        part = Partition.from_dict(self.partition)
        cfg = self.config
        problems = check_header(self.bulk, cfg.target_object, cfg.target_fields, cfg.external_id_field)
        if problems:
            raise AirflowFailException(f"{part.label}: the CSV header does not fit {cfg.target_object}:\n  - "
                                       + "\n  - ".join(problems))
        source = open_source(self.datacloud, part, cfg, after=None, log=self.log)
        chunks = nbytes = 0
        try:
            for chunk in source.chunks(self.job_records(part), cfg.load.max_bytes_per_job):
                chunks += 1
                nbytes += chunk.nbytes
                self.log.info("%s dry run: read %d/%d rows, %d jobs would be created (%d bytes)", part.label,
                              source.read, part.expected_rows, chunks, nbytes)
        finally:
            source.close()
        self.log.info("%s dry run: %d rows, %d jobs of at most %d rows, %d CSV bytes; nothing was written",
                      part.label, source.read, chunks, self.job_records(part), nbytes)
        return {**_partition_fields(part), "rows": source.read, "upserted": 0, "failed": 0, "failed_by_code": {},
                "retried": 0, "rounds": 0, "jobs": [], "job_count": 0, "would_create_jobs": chunks,
                "csv_bytes": nbytes, "duration_s": round(time.monotonic() - started, 2), "artifact": None,
                "dry_run": True}


# -- one task instance's work ---------------------------------------------------------------------------------------
class _PartitionRun:
    """The state of one execute/resume call: ledger, store, counters for the progress lines."""

    def __init__(self, op: LoadPartitionOperator, context: Mapping[str, Any]) -> None:
        self.op = op
        self.log = op.log
        self.cfg = op.config
        self.part = Partition.from_dict(op.partition)
        self.label = self.part.label
        self.store = context["task_state_store"]
        ti = context["ti"]
        self.attempt = int(getattr(ti, "try_number", 1) or 1)
        self.dag_id = str(getattr(ti, "dag_id", None) or context["dag"].dag_id)
        self.run_id = str(context.get("run_id") or ti.run_id)
        self.lock = threading.RLock()
        self.killed = threading.Event()
        self.aborted: set[str] = set()
        self.closed_at: dict[str, float] = {}  # serial partitions: when this attempt closed each job
        load = self.cfg.load
        self.pacer = SerialPacer(get_job=self._job_status, pause=self._pause, label=self.label,
                                 poll_interval_s=load.poll_interval_s, poll_max_interval_s=load.poll_max_interval_s,
                                 job_timeout_s=load.job_timeout_s, logger=self.log)
        self._last_line = ""
        self.ledger, stale = Ledger.load(self.store, run_id=self.run_id, label=self.label,
                                         bounds=self.part.bounds, attempt=self.attempt)
        if stale is not None:
            self._abandon(stale)
        # The API server aborts this partition's jobs when it is marked failed (sf_datacloud_sync.stop): it reads
        # the ledger and needs the connection the jobs were created with.
        self.ledger.data["conn_id"] = op.conn_id

    # -- ledger I/O ----------------------------------------------------------------------------------------------
    def save(self) -> None:
        with self.lock:
            self.ledger.save(self.store)

    def record(self, change: Callable[[Ledger], Any]) -> Any:
        """Apply a change and store the ledger at once (uploader thread and task thread share it)."""
        with self.lock:
            result = change(self.ledger)
            self.ledger.save(self.store)
            return result

    def unfinished_job_ids(self) -> list[str]:
        """Jobs to abort on kill. Called from a signal handler: never wait long for the lock (the thread holding
        it may itself wait for the interrupted one); a plain read of the in-memory ledger is good enough."""
        locked = self.lock.acquire(timeout=2)
        try:
            for _ in range(3):
                try:
                    return self.ledger.job_ids(UNFINISHED_STATES)
                except RuntimeError:  # changed while read by the uploader thread
                    continue
            return []
        finally:
            if locked:
                self.lock.release()

    def abort(self, job_ids: list[str]) -> dict[str, str]:
        """Abort jobs, skipping those this attempt already aborted (on_kill, then the end-of-attempt guard)."""
        from sf_datacloud_sync.stop import abort_jobs

        todo = [j for j in job_ids if j not in self.aborted]
        outcome = abort_jobs(self.op.bulk, todo, label=self.label, logger=self.log)
        self.aborted.update(j for j, result in outcome.items() if not result.startswith("error"))
        return outcome

    def _abandon(self, stale: Ledger) -> None:
        """A ledger written for other bounds (partitions were planned again): stop its jobs, start afresh."""
        self.log.warning("%s: the stored ledger belongs to %s (other bounds); starting a new one", self.label,
                         stale.data.get("label"))
        for job_id in stale.job_ids(UNFINISHED_STATES):
            try:
                self.op.bulk.abort_job(job_id)
            except Exception as exc:
                self.log.warning("%s: could not abort job %s of the stale ledger: %s", self.label, job_id, exc)

    # -- 1. reconcile ----------------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Bring the ledger in line with Salesforce before anything new is sent."""
        from sf_datacloud_sync.hooks._http import SalesforceApiError

        bulk = self.op.bulk
        ledger = self.ledger
        if ledger.is_fresh:
            self.save()
            return
        self.log.info("%s: resuming from the ledger (attempt %d): %d rows committed up to key %r, %d jobs "
                      "uncounted, %d counted", self.label, self.attempt, ledger.counters["rows"],
                      ledger.stream["committed"], len(ledger.jobs), ledger.data["done_jobs"]["count"])
        for job_id, entry in list(ledger.jobs.items()):
            if entry["state"] in TERMINAL_STATES:
                continue
            try:
                info = bulk.get_job(job_id)
            except SalesforceApiError as exc:
                if exc.status == 404 and entry["state"] == OPEN:
                    ledger.drop_job(job_id)  # never got data; nothing to lose
                    continue
                raise
            state = info.get("state")
            if entry["state"] == OPEN:
                if state in (OPEN, ABORTED):
                    # The crash came between "job created" and "upload acknowledged": the upload may or may not
                    # have reached Salesforce, and an Open job cannot tell. Abort it and stream its rows again
                    # (committed key unchanged). If the upload had in fact arrived, Salesforce never processes
                    # it (the job is aborted before close), so no row is applied twice -- the only cost is
                    # that the same bytes travel once more. (Aborted: on_kill stopped it before the close.)
                    if state == OPEN:
                        self._abort(job_id)
                    ledger.drop_job(job_id)
                    self.log.info("%s: job %s was created but its upload not confirmed: aborted, its %d rows "
                                  "will be streamed again", self.label, job_id, entry["records"])
                    continue
                ledger.job_uploaded(job_id)  # closed by the earlier attempt after all: the rows are there
            elif entry["state"] == UPLOADED and state == OPEN:
                info = bulk.close_job(job_id)
                self.log.info("%s: closed job %s, uploaded by an earlier attempt", self.label, job_id)
            ledger.job_status(job_id, info)
        fatal = [j for j, e in ledger.jobs.items() if e.get("fatal") and e["round"] == 0]
        if fatal:
            # The user fixed the setup and cleared the task: these chunks must be read again with it.
            later = [j for j, e in ledger.jobs.items() if e["round"] == 0 and e["state"] not in TERMINAL_STATES
                     and e["seq"] > min(ledger.jobs[f]["seq"] for f in fatal)]
            for job_id in later:
                self._abort(job_id)
            self.log.info("%s: jobs %s had failed as a whole; streaming their rows again", self.label, fatal)
            ledger.rewind_stream(fatal)
        for entry in ledger.jobs.values():
            if entry.get("fatal"):
                entry["fatal_seen"] = True  # a follow-up job's failure was reported once; now count its rows
        self.save()

    def _abort(self, job_id: str) -> None:
        try:
            self.op.bulk.abort_job(job_id)
        except Exception as exc:
            self.log.warning("%s: could not abort job %s: %s", self.label, job_id, exc)

    # -- 2. stream ---------------------------------------------------------------------------------------------------
    def stream_source(self) -> None:
        from sf_datacloud_sync.utils.transfer import DEFAULT_SPOOL_BYTES, stream_chunks_to_jobs

        cfg = self.cfg
        ledger = self.ledger
        after = ledger.stream["committed"]
        base = ledger.counters["rows"]
        ledger.phase = "streaming"
        self.save()
        self.log.info("%s: streaming rows from Data Cloud %s (%d rows already at Salesforce)", self.label,
                      f"after key {after!r}" if after is not None else "from the start", base)
        source = open_source(self.op.datacloud, self.part, cfg, after=after, log=self.log)
        bulk = LedgerBulk(self.op.bulk, self, round_=0)
        try:
            chunks = source.chunks(self.op.job_records(self.part),
                                   min(cfg.load.max_bytes_per_job, bulk.max_upload_bytes),
                                   spool_threshold=DEFAULT_SPOOL_BYTES)
            for _job in stream_chunks_to_jobs(
                bulk, chunks, object_name=cfg.target_object, external_id_field=cfg.external_id_field,
                line_ending=cfg.load.line_ending, on_job_submitted=self._submitted, on_job_created=bulk.job_created,
            ):
                self.progress(read=base + source.read)
        finally:
            source.close()
        self.record(lambda led: led.stream.update(done=True))
        self.progress(read=base + source.read)
        self.log.info("%s: all %d rows are at Salesforce in %d jobs", self.label, ledger.counters["rows"],
                      ledger.job_count)

    def _submitted(self, job: SubmittedJob) -> None:
        """``stream_rows_to_jobs``' own figures for the job; they win over those parsed back from the CSV."""
        entry = self.ledger.jobs.get(job.job_id)
        if entry is not None and entry["round"] == 0 and (
                entry["records"] != job.records or entry["last"] != _jsonable(job.last_key)):
            self.log.warning("%s: job %s holds %d rows up to %r, the ledger said %d up to %r; corrected",
                             self.label, job.job_id, job.records, job.last_key, entry["records"], entry["last"])
            self.record(lambda led: led.correct_job(job.job_id, records=job.records, first_key=job.first_key,
                                                    last_key=job.last_key))

    # -- 3. wait (non-deferrable mode) -------------------------------------------------------------------------------
    def wait_here(self, job_ids: list[str], *, timeout: float, poll_interval: float | None = None) -> list[str]:
        """Wait in the worker, oldest job first, until every job is finished or ``timeout`` seconds pass.

        A job is only asked again once the ones before it are finished (they finish roughly in order), so a
        wait costs about one request per poll plus one per job. The jobs' states go to the ledger.

        :return: the jobs still running at the deadline (not failed: they keep running at Salesforce).
        """
        cfg = self.cfg.load
        deadline = time.monotonic() + timeout
        still = list(job_ids)
        while still:
            wait = self.op.bulk.wait_for_job(still[0], timeout=max(0.0, deadline - time.monotonic()),
                                             poll_interval=poll_interval or self.op.poll_interval or cfg.poll_interval_s,
                                             max_poll_interval=cfg.poll_max_interval_s)
            self.ledger.job_status(still[0], wait.info)
            if not wait.finished:
                break
            still.pop(0)
        self.save()
        return still

    def wait_turn(self) -> None:
        """Serial partitions: block until the next job may be closed (:mod:`~sf_datacloud_sync.utils.serial_pacing`)."""
        running = self.ledger.running_job_ids()
        if running:
            records = {job_id: int(self.ledger.jobs[job_id]["records"]) for job_id in running}
            newest = running[-1]
            self.pacer.wait_turn(newest, records[newest], closed=self.closed_at.get(newest),
                                 older=[(job_id, records[job_id]) for job_id in running[:-1]])
        # Not saved here: the close that follows records the ledger with these states.

    def _job_status(self, job_id: str) -> Mapping[str, Any]:
        """Ask Salesforce for one job's state and record it in the ledger."""
        info = self.op.bulk.get_job(job_id)
        with self.lock:
            self.ledger.job_status(job_id, info)
        return info

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self.killed.wait(seconds):
            raise AirflowException(f"{self.label}: stopped; no further Bulk job is started")

    def apply_job_states(self, jobs: Mapping[str, Mapping[str, Any]]) -> None:
        """The trigger event's states; jobs it does not mention are asked directly."""
        for job_id in self.ledger.running_job_ids():
            info = jobs.get(job_id)
            if info is None:
                self._job_status(job_id)
            else:
                self.ledger.job_status(job_id, info)

    # -- 4. results and follow-ups -------------------------------------------------------------------------------
    def check_fatal(self) -> None:
        """A job that failed as a whole for a reason only a person can fix fails the task with its message."""
        fatal = []
        for job_id in self.ledger.finished_job_ids():
            entry = self.ledger.jobs[job_id]
            if entry["state"] != FAILED or entry.get("fatal_seen"):
                continue
            if not entry.get("error"):
                self.ledger.job_status(job_id, self.op.bulk.get_job(job_id))  # the event may predate the message
            if not self.transient_job_error(entry.get("error")):
                entry["fatal"] = True
                fatal.append((job_id, entry.get("error") or "no errorMessage given"))
        if fatal:
            self.ledger.phase = "failed"
            self.save()
            self.progress()
            details = "; ".join(f"job {j}: {msg}" for j, msg in fatal[:5])
            raise AirflowFailException(
                f"{self.label}: {len(fatal)} Bulk jobs failed as a whole: {details}. Fix the cause, then clear "
                f"this partition: it sends the rows of these jobs again.")

    def transient_job_error(self, message: str | None) -> bool:
        code = job_error_code(message)
        text = (message or "").upper()
        return code in TRANSIENT_JOB_ERRORS or any(c.upper() in text for c in self.cfg.load.transient_error_codes)

    def process_round(self) -> None:
        """Read the finished jobs' results; re-send what may succeed now; count and forget the jobs.

        The round is announced in the ledger first (``pending_round``). Its retry rows are derived from the
        parents' result files, which never change, in a fixed order: after a crash the round is derived again
        and the rows already in uploaded follow-up jobs are skipped, so none is sent twice. Part files of the
        artifact are rewritten, not appended. One ledger save at the end counts the whole round.
        """
        from sf_datacloud_sync.utils.transfer import stream_rows_to_jobs

        ledger = self.ledger
        pending = ledger.pending_round
        if pending is None:
            round_ = ledger.rounds + 1
            parents = ledger.finished_job_ids()
            self.record(lambda led: led.begin_round(round_, parents))
            skip = 0
        else:
            round_, parents = int(pending["round"]), list(pending["parents"])
            skip = ledger.submitted_records(round_)
            self.log.info("%s: resuming round %d over jobs %s (%d rows already re-sent)", self.label, round_,
                          parents, skip)
        ledger.phase = "results"
        retry = _RetryRows(self, parents, round_, skip)
        header = self.cfg.target_fields
        ext_pos = header.index(self.cfg.external_id_field)
        bulk = LedgerBulk(self.op.bulk, self, round_=round_)
        for _job in stream_rows_to_jobs(
            bulk, retry, object_name=self.cfg.target_object, external_id_field=self.cfg.external_id_field,
            header=header, column_types=None, key_func=lambda row: [row[ext_pos]],
            max_records_per_job=self.op.job_records(self.part), max_bytes_per_job=self.cfg.load.max_bytes_per_job,
            line_ending=self.cfg.load.line_ending, on_job_created=bulk.job_created,
        ):
            self.progress()
        tallies = retry.tallies
        total_retry = sum(t["retried"] for t in tallies.values())
        self.record(lambda led: led.finish_round(tallies, round_=round_, submitted_any=total_retry > 0))
        codes: dict[str, int] = {}
        for t in tallies.values():
            for code, n in t["retry_codes"].items():
                codes[code] = codes.get(code, 0) + n
        if total_retry:
            self.log.info("%s round %d: %d rows re-sent in follow-up jobs (%s); %d failed for good so far",
                          self.label, round_, total_retry, _codes_text(codes), ledger.counters["failed"])
        else:
            self.log.info("%s: results of %d jobs counted, nothing to re-send; %d failed for good so far",
                          self.label, len(parents), ledger.counters["failed"])
        self.progress()

    def settle(self, job_id: str) -> None:
        """Wait until a Failed/Aborted job's result files are complete.

        The state turns ``Failed``/``Aborted`` at once, but a batch in flight finishes its chunk first: until then
        ``numberRecordsProcessed`` still grows and ``unprocessedrecords`` is incomplete. Complete means every row
        of the job is either processed or unprocessed.
        """
        bulk = self.op.bulk
        entry = self.ledger.jobs[job_id]
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        delay = 0.2
        while True:
            self.ledger.job_status(job_id, bulk.get_job(job_id))
            unprocessed = sum(1 for _ in bulk.iter_job_results(job_id, "unprocessed"))
            if int(entry["processed"]) + unprocessed >= int(entry["records"]):
                return
            if time.monotonic() + delay > deadline:
                self.log.warning("%s: job %s (%s) still accounts for only %d processed + %d unprocessed of %d rows "
                                 "after %.0fs", self.label, job_id, entry["state"], entry["processed"], unprocessed,
                                 entry["records"], SETTLE_TIMEOUT_S)
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    @cached_property
    def artifact(self) -> FailedRowsArtifact:
        from sf_datacloud_sync.utils.artifacts import FailedRowsArtifact

        return FailedRowsArtifact(self.cfg.artifacts_url(), self.dag_id, self.run_id, self.label,
                                  self.cfg.source_columns)

    # -- 5. finish ---------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        ledger = self.ledger
        c = ledger.counters
        ledger.data["artifact"] = self.artifact.assemble(ledger.data["artifact_parts"]) \
            if ledger.data["artifact_parts"] else None
        if c["rows"] != c["upserted"] + c["failed"]:
            ledger.phase = "failed"
            self.save()
            raise AirflowFailException(
                f"{self.label}: the rows do not reconcile: read {c['rows']} = upserted {c['upserted']} + failed "
                f"{c['failed']} does not hold (difference {c['rows'] - c['upserted'] - c['failed']}). Jobs: "
                f"{', '.join(ledger.all_job_ids()[:10])}")
        ledger.phase = "done"
        ledger.data["finished_at"] = time.time()
        self.progress()
        self.save()
        summary = self.summary()
        self.log.info("%s done: %d rows, %d upserted, %d failed (%s), %d re-sent in %d rounds, %d jobs, %.1fs%s",
                      self.label, summary["rows"], summary["upserted"], summary["failed"],
                      _codes_text(summary["failed_by_code"]) or "none", summary["retried"], summary["rounds"],
                      summary["job_count"], summary["duration_s"],
                      f"; failed rows: {summary['artifact']}" if summary["artifact"] else "")
        return summary

    def summary(self) -> dict[str, Any]:
        ledger = self.ledger
        c = ledger.counters
        return {
            **_partition_fields(self.part),
            "rows": c["rows"], "upserted": c["upserted"], "failed": c["failed"],
            "failed_by_code": dict(sorted(c["by_code"].items())), "retried": c["retried"], "rounds": ledger.rounds,
            "jobs": ledger.all_job_ids()[:MAX_JOB_IDS], "job_count": ledger.job_count,
            "duration_s": round(float(ledger.data.get("finished_at") or time.time())
                                - float(ledger.data["started_at"]), 2),
            "artifact": ledger.data.get("artifact"), "dry_run": False,
        }

    # -- progress ----------------------------------------------------------------------------------------------------
    def progress(self, **values: Any) -> None:
        """One line like the old "check all partitions" script, and the same figures in the ledger."""
        with self.lock:
            if "read" not in values and "read" not in self.ledger.data.get("progress", {}):
                values["read"] = self.ledger.counters["rows"]
            p = self.ledger.set_progress(expected=self.part.expected_rows, **values)
            self.ledger.save(self.store)
        line = (f"{self.label} read {p['read']}{'/' + str(p['expected']) if p['expected'] else ''} rows, uploaded "
                f"{p['uploaded']}, jobs done {p['jobs_done']} open {p['jobs_open']}, failed so far {p['failed']}"
                + (f", re-sent {p['retried']} in {p['rounds']} rounds" if p["retried"] else ""))
        if line != self._last_line:
            self.log.info("%s", line)
            self._last_line = line


class _RetryRows:
    """The rows of one round to send again, as CSV tuples, produced while the parents' results are read.

    Permanent failures go to the artifact on the way. The backoff before the round happens lazily, right before
    the first row is handed out, so a round without retry rows never waits.
    """

    def __init__(self, run: _PartitionRun, parents: list[str], round_: int, skip: int) -> None:
        self.run = run
        self.parents = parents
        self.round = round_
        self.skip = skip
        self.tallies: dict[str, dict[str, Any]] = {}
        self._waited = skip > 0  # a resumed round already waited

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        from sf_datacloud_sync.utils.results import parse_sf_error

        run = self.run
        cfg = run.cfg
        bulk = run.op.bulk
        header = cfg.target_fields
        transient = set(cfg.load.transient_error_codes)
        budget_left = self.round <= cfg.load.transient_retry_budget
        emitted = 0
        for job_id in self.parents:
            entry = run.ledger.jobs[job_id]
            state = entry["state"]
            if state in (FAILED, ABORTED):
                run.settle(job_id)
            processed, failed = int(entry["processed"]), int(entry["failed"])
            tally = {"upserted": max(0, processed - failed), "failed": 0, "retried": 0, "by_code": {},
                     "retry_codes": {}, "artifact": False}
            if state == ABORTED:
                unprocessed_retry = True  # stopped by a person (on_kill) or by us, not by an error: always again
            elif state == FAILED:
                # A follow-up job that failed for a setup reason was reported once; now its rows are counted.
                unprocessed_retry = budget_left and not entry.get("fatal_seen") and \
                    run.transient_job_error(entry.get("error"))
            else:
                unprocessed_retry = budget_left
            with run.artifact.part(job_id) as part:
                sources: list[tuple[str, Any]] = []
                if failed:
                    sources.append(("failed", bulk.iter_job_results(job_id, "failed")))
                if state in (FAILED, ABORTED) or processed < int(entry["records"]):
                    sources.append(("unprocessed", bulk.iter_job_results(job_id, "unprocessed")))
                seen = {"failed": 0, "unprocessed": 0}
                for kind, rows in sources:
                    for row in rows:
                        seen[kind] += 1
                        if kind == "failed":
                            code, message, fields = parse_sf_error(row.get("sf__Error", ""))
                            again = budget_left and code in transient
                        else:
                            code = UNPROCESSED_CODE
                            message = f"not processed: job {job_id} ended {state}" + (
                                f" ({entry['error']})" if entry.get("error") else "")
                            fields = []
                            again = unprocessed_retry
                        if again:
                            tally["retried"] += 1
                            tally["retry_codes"][code] = tally["retry_codes"].get(code, 0) + 1
                            emitted += 1
                            if emitted <= self.skip:
                                continue  # already in a follow-up job uploaded before the crash
                            self._backoff()
                            yield tuple(row.get(f, "") for f in header)
                        else:
                            tally["failed"] += 1
                            tally["by_code"][code or "UNKNOWN"] = tally["by_code"].get(code or "UNKNOWN", 0) + 1
                            record = {c: row.get(cfg.mapping[c], "") for c in cfg.source_columns}
                            part.write(row.get(cfg.external_id_field, ""), code, message, ",".join(fields), record)
                tally["artifact"] = part.rows > 0
            expected = int(entry["records"])
            accounted = tally["upserted"] + seen["failed"] + seen["unprocessed"]
            if state == JOB_COMPLETE and failed != seen["failed"]:
                run.log.warning("%s: job %s reports %d failed records but failedResults has %d", run.label, job_id,
                                failed, seen["failed"])
            if accounted != expected:
                run.log.warning("%s: job %s held %d rows but its results account for %d (processed %d, failed "
                                "%d, unprocessed %d)", run.label, job_id, expected, accounted, processed,
                                seen["failed"], seen["unprocessed"])
            self.tallies[job_id] = tally

    def _backoff(self) -> None:
        if self._waited:
            return
        self._waited = True
        load = self.run.cfg.load
        delay = min(MAX_BACKOFF_S, load.transient_backoff_s * (2 ** (self.round - 1)))
        self.run.log.info("%s: waiting %.1fs before follow-up round %d", self.run.label, delay, self.round)
        if self.run.killed.wait(delay):
            raise AirflowException(f"{self.run.label}: stopped while waiting to re-send rows")


# -- the source stream ----------------------------------------------------------------------------------------------
class SourceRows:
    """The partition's rows from Data Cloud in key order, mapped columns in settings order.

    If Data Cloud drops the result before the last row (``DataCloudQueryExpired``), the query is submitted
    again strictly after the last row handed out, so a long upload never loses or repeats a row.
    """

    def __init__(self, hook: DataCloudHook, part: Partition, cfg: SyncConfig, *, after: Any,
                 log: Any) -> None:
        self.hook = hook
        self.part = part
        self.cfg = cfg
        self.after = after
        self.log = log
        self.read = 0
        columns = cfg.source_columns
        self.positions = [columns.index(c) for c in order_columns(part, cfg.key_column, cfg.account_column)]
        self._result = self._query()
        self.types: list[str] | None = list(self._result.types) or None
        if self.types and len(self.types) != len(columns):
            self.types = None

    def _query(self) -> Any:
        cfg = self.cfg
        sql, params = range_query(self.part, dmo=cfg.dmo, columns=cfg.source_columns, key_column=cfg.key_column,
                                  account_column=cfg.account_column, resume_after=self.after)
        return self.hook.query(sql, params)

    def key_of(self, row: Sequence[Any]) -> list[Any]:
        return [row[i] for i in self.positions]

    def __iter__(self) -> Iterator[tuple]:
        from sf_datacloud_sync.hooks.datacloud import DataCloudQueryExpired

        resumes = 0
        while True:
            try:
                for row in self._result:
                    self.read += 1
                    yield row
                    self.after = [row[i] for i in self.positions]
                return
            except DataCloudQueryExpired as exc:
                resumes += 1
                if resumes > MAX_QUERY_RESUMES:
                    raise
                self.log.warning("%s: %s; querying again after key %r", self.part.label, exc, self.after)
                self._result.close()
                self._result = self._query()

    def chunks(self, max_records: int, max_bytes: int, *,
               spool_threshold: int | None = None) -> Iterator[CsvChunk]:
        """The rows as job CSVs of at most ``max_records`` rows (``first_key``/``last_key``: ordering keys)."""
        from sf_datacloud_sync.utils.csv_encoder import iter_chunks

        cfg = self.cfg
        return iter_chunks(self, cfg.target_fields, max_records, max_bytes, key_func=self.key_of,
                           column_types=self.types, line_ending=cfg.load.line_ending, spool_threshold=spool_threshold)

    def close(self) -> None:
        self._result.close()


class GroupRows:
    """The rows of a group's members (``Partition.members``), one :class:`SourceRows` each, as job CSVs that hold one
    batch of each member (:func:`~sf_datacloud_sync.utils.csv_encoder.iter_lane_chunks`).

    ``after`` (the ledger's committed key) is one ``{"after": key, "sent": rows}`` per member, or ``None``.
    """

    def __init__(self, hook: DataCloudHook, part: Partition, cfg: SyncConfig, *, after: Any, log: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from sf_datacloud_sync.utils.csv_encoder import Lane

        self.cfg = cfg
        marks = after if after is not None else [None] * len(part.members)
        if len(marks) != len(part.members):
            raise AirflowFailException(f"{part.label}: the ledger holds {len(marks)} stream positions for "
                                       f"{len(part.members)} partitions")
        marks = [mark or {"after": None, "sent": 0} for mark in marks]
        hook.client  # noqa: B018 -- log in once, before the queries go out side by side
        # Each query's submit waits for its first page (a second or more while Data Cloud runs the others): one
        # after the other, a group of 5 took 7 s before its first job could start.
        with ThreadPoolExecutor(max_workers=len(part.members), thread_name_prefix="datacloud-query") as pool:
            futures = [pool.submit(SourceRows, hook, member, cfg, after=mark["after"], log=log)
                       for member, mark in zip(part.members, marks, strict=True)]
        self.sources: list[SourceRows] = [f.result() for f in futures if f.exception() is None]
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            self.close()
            raise failed
        self.lanes = [Lane(source, source.key_of, position=mark["after"], sent=int(mark["sent"]),
                           expected=member.expected_rows)
                      for source, member, mark in zip(self.sources, part.members, marks, strict=True)]

    @property
    def read(self) -> int:
        return sum(source.read for source in self.sources)

    def chunks(self, max_records: int, max_bytes: int, *,
               spool_threshold: int | None = None) -> Iterator[CsvChunk]:
        """Job CSVs of one batch of at most ``max_records`` rows per member (``first_key``/``last_key``: the marks)."""
        from sf_datacloud_sync.utils.csv_encoder import iter_lane_chunks

        types = next((source.types for source in self.sources if source.types), None)
        return iter_lane_chunks(self.lanes, self.cfg.target_fields, max_records, max_bytes, column_types=types,
                                line_ending=self.cfg.load.line_ending, spool_threshold=spool_threshold)

    def close(self) -> None:
        for source in self.sources:
            source.close()


def open_source(hook: DataCloudHook, part: Partition, cfg: SyncConfig, *, after: Any,
                log: Any) -> SourceRows | GroupRows:
    """The partition's rows, resuming after ``after`` (the ledger's committed key)."""
    if part.members:
        return GroupRows(hook, part, cfg, after=after, log=log)
    return SourceRows(hook, part, cfg, after=after, log=log)


# -- the Bulk hook as the stream sees it ---------------------------------------------------------------------------
class LedgerBulk:
    """Wraps the Bulk hook for the transfer (``stream_chunks_to_jobs``): each job enters the ledger *before* its upload.

    ``submit_ingest_job`` is create → ledger ``Open`` (with the chunk's row count and first/last key, which
    the transfer hands over through ``on_created``: pass ``on_job_created=ledger_bulk.job_created``) → upload →
    ledger ``Uploaded`` (the rows now count, the committed key moves) → close → ledger ``UploadComplete``. It runs
    in the transfer's uploader thread; the ledger is shared under a lock. For a serial partition the close waits
    for its turn (:meth:`_PartitionRun.wait_turn`).
    """

    def __init__(self, hook: SalesforceBulk2Hook, run: _PartitionRun, *, round_: int) -> None:
        self.hook = hook
        self.run = run
        self.round = round_
        self.max_upload_bytes = hook.max_upload_bytes

    def job_created(self, job: SubmittedJob) -> None:
        """The transfer's ``on_job_created``: record the chunk about to be uploaded under its new job id."""
        run = self.run
        run.record(lambda led: led.job_opened(job.job_id, seq=led.next_seq(), round_=self.round,
                                              attempt=run.attempt, records=job.records, first_key=job.first_key,
                                              last_key=job.last_key))

    def submit_ingest_job(self, object_name: str, data: bytes | IO[bytes], *, external_id_field: str | None,
                          operation: str = "upsert", line_ending: str = "LF", column_delimiter: str = "COMMA",
                          on_created: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        run = self.run
        if on_created is None:
            # Without the chunk's figures the ledger could not resume after this job: refuse rather than guess.
            raise TypeError("LedgerBulk needs stream_rows_to_jobs(..., on_job_created=ledger_bulk.job_created)")
        if run.killed.is_set():
            raise AirflowException(f"{run.label}: stopped; no further Bulk job is created")
        job = self.hook.create_ingest_job(object_name, operation, external_id_field, line_ending, column_delimiter)
        job_id = job["id"]
        try:
            on_created(job)
            if run.killed.is_set():
                # on_kill came between the check above and the ledger entry: it may not have seen this job.
                raise AirflowException(f"{run.label}: stopped; no further Bulk job is created")
            self.hook.upload_job_data(job_id, data)
        except BaseException:
            try:
                self.hook.abort_job(job_id)
                run.record(lambda led: led.drop_job(job_id))
            except Exception as exc:  # left Open in the ledger: the next attempt aborts it
                run.log.warning("%s: could not abort job %s after its upload failed: %s", run.label, job_id, exc)
            raise
        run.record(lambda led: led.job_uploaded(job_id))
        if run.part.serial:
            run.wait_turn()
        sent = time.monotonic()
        info = self.hook.close_job(job_id)  # if this fails the job stays Uploaded; the next attempt closes it
        run.closed_at[job_id] = run.pacer.job_closed(sent, time.monotonic())
        run.record(lambda led: led.job_closed(job_id, info.get("state") or UPLOAD_COMPLETE))
        return info


def check_header(bulk: SalesforceBulk2Hook, object_name: str, fields: Sequence[str],
                 external_id_field: str) -> list[str]:
    """Problems of a CSV header against ``describe``: unknown or read-only fields, relationship columns whose
    parent field is not an indexed (external id / idLookup) field. Empty when the header is fine."""
    described = bulk.describe(object_name)
    by_name = {f["name"].lower(): f for f in described.get("fields", [])}
    by_rel = {str(f.get("relationshipName") or "").lower(): f for f in described.get("fields", [])
              if f.get("relationshipName")}
    parents: dict[str, dict[str, Any]] = {}
    problems = []
    for name in fields:
        if "." in name:
            rel, parent_field = name.split(".", 1)
            ref = by_rel.get(rel.lower())
            if ref is None:
                problems.append(f"{name}: {object_name} has no relationship {rel}")
                continue
            target = (ref.get("referenceTo") or [None])[0]
            if target not in parents:
                parents[target] = {f["name"].lower(): f for f in bulk.describe(target).get("fields", [])}
            pf = parents[target].get(parent_field.lower())
            if pf is None:
                problems.append(f"{name}: {target} has no field {parent_field}")
            elif not (pf.get("externalId") or pf.get("idLookup")):
                problems.append(f"{name}: {target}.{parent_field} is not an External ID or idLookup field")
            continue
        f = by_name.get(name.lower())
        if f is None:
            problems.append(f"{name}: {object_name} has no such field")
        elif not (f.get("createable") and f.get("updateable")):
            problems.append(f"{name}: {object_name}.{name} is not createable and updateable")
    ext = by_name.get(external_id_field.lower())
    if ext is not None and not (ext.get("externalId") or ext.get("idLookup")):
        problems.append(f"{external_id_field}: not an External ID field of {object_name}")
    return problems


def _partition_fields(part: Partition) -> dict[str, Any]:
    return {"index": part.index, "label": part.label, "key": part.key, "lower": part.lower, "upper": part.upper}


def _codes_text(codes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1]))


def _jsonable(key: Any) -> Any:
    return list(key) if isinstance(key, tuple) else key

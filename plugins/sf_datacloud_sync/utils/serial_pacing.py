"""When a serial partition may close its next Bulk job.

A serial partition (``partition_key=account``) keeps one 10,000-row job running at Salesforce at a time, so two
batches never lock the same Account (a group of partitions in one task: one job holding one 10,000-row batch of each,
which the pacer sees as one batch, :func:`as_one_batch`). The next job is created and uploaded while the current one
runs; only its close waits. :class:`SerialPacer` decides how long, from what the partition's earlier jobs showed: how
long a job takes from its close to its end, how long the org keeps a closed job queued (the dequeue delay) and how
long its batch runs.

Every job but the newest must have processed all its rows. The newest one must too, except once the org has shown
that a job takes long from its close to its end (at least :data:`EARLY_CLOSE_MIN_TOOK_S`): then the next job is closed
one dequeue delay (the shortest close-to-InProgress seen) before the newest is expected to end. Its end is counted from
when its batch started: ``numberRecordsProcessed`` rows before a look, never before a look that saw it queued or
InProgress with no row yet (its batch waiting for an org thread); where the org counts only whole batches, from the
look that saw it InProgress. A batch that started sooner after its close than the dequeue delay seen shows a quicker
queue: the next close then comes one batch after this one's. A batch's length is the partition's first job's rate
(measured over a quarter of its rows, when the org counts rows up as it goes) until an older job's own
``apiActiveProcessingTime`` corrects it. So the next batch starts when this one ends, give or take the queue's spread;
two batches of one Account that meet take turns per 200-row transaction (a database queues row-lock waiters in order;
the emulator does too), with lock waits far below Salesforce's 10 s timeout.

The pacer does no I/O of its own: it looks at a job through ``get_job`` and waits through ``pause`` (which raises when
the task is stopped), on the ``clock`` it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow.sdk.exceptions import AirflowException

from sf_datacloud_sync.config import BULK_BATCH_RECORDS
from sf_datacloud_sync.utils.ledger import IN_PROGRESS, TERMINAL_STATES
from sf_datacloud_sync.utils.progress import seconds_left, seconds_per_record

log = logging.getLogger(__name__)

FIRST_POLL_SHARE = 0.8  # first look at this share of the last job's close-to-done time
MIN_POLL_S = 0.2
LEFT_SHARE = 0.9  # next look at this share of the time the processing rate says is left
RATE_SHARE = 0.25  # ... and a first job's rate is trusted once measured over this share of its rows
# Two jobs overlap only where a job takes this long from its close to its end (a real org: a dequeue delay of seconds
# plus ~36 s per 10,000 rows); where jobs are that quick, there is little to hide.
EARLY_CLOSE_MIN_TOOK_S = 10.0
# Longest pause between looks at a job waiting to be dequeued, and at most this share of a batch: a dequeue delay
# measured that late closes the next job that much too early, and its batch then waits for the Account's row locks
# (Salesforce waits 10 s for a row lock; at 36 s per batch, 2 s).
MAX_QUEUED_LOOK_S = 2.0
MAX_QUEUED_LOOK_SHARE = 0.1
# Older jobs are asked this share of a batch (at least OLDER_LOOK_LEAD_S) before the next close: their looks' round
# trips then do not delay it, and their own processing times (see _look) can still correct it.
OLDER_LOOK_LEAD_S = 1.0
OLDER_LOOK_LEAD_SHARE = 0.1
MAX_CLOSE_ROUND_TRIP_S = 1.0
# The usual first look at a job comes this long after the dequeue delay (at most this share of a batch).
USUAL_LOOK_LATE_S = 1.0
USUAL_LOOK_LATE_SHARE = 0.03
# Every so many jobs the first look comes at half the dequeue delay seen so far: an estimate inflated by one slow
# dequeue (or a batch that waited for a thread) comes down again.
PROBE_EVERY = 4


def batch_records(records: int) -> int:
    """The rows of a job's longest internal batch, which is how long the job runs."""
    return min(records, BULK_BATCH_RECORDS)


def as_one_batch(info: Mapping[str, Any], records: int) -> Mapping[str, Any]:
    """A job of ``records`` rows as if it were its longest batch alone (what :class:`SerialPacer` reasons about). A
    group's job runs one batch per partition side by side and counts all their rows: its counts are scaled down to
    one batch's. Salesforce's ``apiActiveProcessingTime`` is the sum over the batches, so per row it stays the same."""
    view = batch_records(records)
    if records <= view:
        return info
    scale = view / records
    return {**info, "numberRecordsProcessed": round(int(info.get("numberRecordsProcessed") or 0) * scale),
            "apiActiveProcessingTime": float(info.get("apiActiveProcessingTime") or 0) * scale}


class SerialPacer:
    """A serial partition's estimates of its org, and the waits between its jobs that follow from them.

    :param get_job: the job's status, as ``GET /jobs/ingest/{id}`` returns it.
    :param pause: wait that many seconds (raises when the task is stopped).
    :param job_timeout_s: a job still unfinished after this long fails the task (as still running, not failed).
    """

    def __init__(self, *, get_job: Callable[[str], Mapping[str, Any]], pause: Callable[[float], None], label: str,
                 poll_interval_s: float, poll_max_interval_s: float, job_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None) -> None:
        self.get_job = get_job
        self.log = logger or log
        self.pause = pause
        self.label = label
        self.poll_interval_s = poll_interval_s
        self.poll_max_interval_s = poll_max_interval_s
        self.job_timeout_s = job_timeout_s
        self.clock = clock
        self.took_s = 0.0  # the last finished job's close-to-done time
        self.active_per_record = 0.0  # a batch's processing time per record, in seconds (see _look)
        self.dequeue_s: float | None = None  # close to InProgress, the shortest seen
        self.counts_rows = False  # the org counts a batch's rows up as they commit (not only whole batches)
        self.watches = 0  # early-close watches so far (every PROBE_EVERY-th is a probe)
        self.close_round_trip_s = 0.0  # the last close request's

    # -- what the partition calls ------------------------------------------------------------------------------------
    def wait_turn(self, job_id: str, records: int, *, closed: float | None,
                  older: Sequence[tuple[str, int]] = ()) -> None:
        """Block until the next job may be closed: once the newest job (``job_id``, of ``records`` rows; ``closed``:
        when this attempt closed it, on :attr:`clock`) has processed all its rows or, once jobs are known to take long,
        one dequeue delay before its expected end; and once the ``older`` jobs (id, rows) have processed all theirs.
        A job of several internal batches (a group's) is watched as its longest batch (:func:`as_one_batch`).

        The newest job is watched first and the older ones are asked only then, shortly before the close
        (:data:`OLDER_LOOK_LEAD_SHARE`): by that time they have long finished, so one look each both proves it and
        reads their final state (asked before the newest, the previous job was usually a second from its end: two or
        three looks; asked at the close, each look's round trip delayed it).
        """
        if closed is not None and self.took_s >= EARLY_CLOSE_MIN_TOOK_S:
            since, rows_left = self._until_next_may_start(job_id, records, closed)
        else:
            since, rows_left = self._until_done(job_id, records, closed)
        if older:
            left = self.active_per_record * rows_left
            self._pause_until(since + left - max(OLDER_LOOK_LEAD_S, OLDER_LOOK_LEAD_SHARE * left))
            for older_id, older_records in older:
                self.wait_done(older_id, older_records)  # may correct active_per_record
        # The org closes it about half way through the request.
        close_at = since + self.active_per_record * rows_left - self.close_round_trip_s / 2
        now = self.clock()
        self.log.info("%s: the next job closes in %.1fs (job %s: %d rows of a batch left at %.2f ms each from %.1fs "
                      "ago; dequeue delay %.1fs)", self.label, max(0.0, close_at - now), job_id, rows_left,
                      self.active_per_record * 1000, now - since, self.dequeue_s or 0.0)
        self._pause_until(close_at)

    def job_closed(self, sent: float, answered: float) -> float:
        """A close request sent at ``sent`` was answered at ``answered`` (on :attr:`clock`): when the org closed the
        job, about half way (a round trip longer than :data:`MAX_CLOSE_ROUND_TRIP_S` was retried: counted from its
        end)."""
        self.close_round_trip_s = min(answered - sent, MAX_CLOSE_ROUND_TRIP_S)
        return answered - self.close_round_trip_s / 2

    def wait_done(self, job_id: str, records: int) -> None:
        """Watch a job until it has processed all its rows (an older one by then usually has: one look)."""
        self._until_done(job_id, records, None)

    # -- the watches -------------------------------------------------------------------------------------------------
    def _until_next_may_start(self, job_id: str, rows: int, closed: float) -> tuple[float, int]:
        """Jobs take long: look when the newest should have left the queue. The next job may be closed one dequeue
        delay before it ends, returned as a time and the rows the job has left to process from then.

        Every few jobs the first look is a probe at half the dequeue delay, to see the queue shrink; a probe that
        finds the job still queued halves the time left to the usual look, down to the queued looks' resolution (at a
        30 s dequeue a probe takes 5 looks; ramping up short looks from there took 15)."""
        records = batch_records(rows)
        deadline = self.clock() + self.job_timeout_s
        active = self.active_per_record * records
        max_queued_look = self._max_queued_look(active)
        dequeue = self.dequeue_s or 0.0
        # The dequeue delay is the shortest seen, so a look right after it often finds the job still queued. Where the
        # org counts rows up, the look comes up to a second later: the batch's start then follows from its rows.
        late = max(MIN_POLL_S, min(USUAL_LOOK_LATE_S, USUAL_LOOK_LATE_SHARE * active)) if self.counts_rows \
            else MIN_POLL_S
        usual = closed + dequeue + late
        self.watches += 1
        probe_step = 0.0
        if self.watches % PROBE_EVERY == 0:
            probe_step = min(max(0.1 * dequeue, MIN_POLL_S), max_queued_look)
            self._pause_until(closed + 0.5 * dequeue + MIN_POLL_S)
        else:
            self._pause_until(usual)
        queued_look = MIN_POLL_S
        left_queue = False
        not_started = closed  # the last look that saw its batch not started yet (queued, or InProgress with no row)
        while True:
            now, state, processed = self._look(job_id, rows, closed)
            if state is None:
                return now, 0
            if state == IN_PROGRESS:
                if not left_queue:
                    left_queue = True
                    self._saw_dequeue(now - closed)  # it left the queue before this look
                probe_step = 0.0
                if processed or not self.counts_rows:
                    # Its batch started ``processed`` rows ago (an org that counts whole batches only: at this look),
                    # and after the last look that saw it not started; it ends ``active`` later. The next job, closed
                    # a dequeue delay before that, cannot start earlier. A batch that started sooner after its close
                    # than that delay shows the queue was quicker this time: the next close then comes ``active``
                    # after this one's. (Counted from this look instead, a look a chunk late, 200 rows or 0.72 s,
                    # closed the next job that much late: 0.8 s between a partition's batches on average at ×1 with a
                    # 2 s dequeue.)
                    batch_started = max(not_started, now - processed * self.active_per_record)
                    return batch_started - min(self.dequeue_s, batch_started - closed), records
                # Else InProgress with no row processed: its batch still waits for an org thread and its end is not
                # in sight; look again. Counted from here, the next batch of these Accounts could start while this one
                # runs (seen at a 30 s dequeue scaled by 5: the two waited for each other's row locks until one timed
                # out).
            not_started = now
            self._check_deadline(job_id, now, deadline)
            if probe_step:
                gap = usual - now
                if gap > probe_step:
                    self.pause(gap / 2)
                else:
                    probe_step = 0.0  # from the usual time on, as any watch
                    self._pause_until(usual)
                continue
            queued_look = min(queued_look * 1.25, max_queued_look)
            self.pause(queued_look)

    def _until_done(self, job_id: str, rows: int, closed: float | None) -> tuple[float, int]:
        """Watch a job until it has processed all its rows (returns when that was seen, and 0 rows), looking shortly
        before its processing rate says it ends. The partition's first job (``closed`` and nothing known yet) may end
        the watch early: see :meth:`_first_job_early_close`."""
        records = batch_records(rows)
        took = self.took_s
        deadline = self.clock() + self.job_timeout_s
        if closed is not None and took:
            self._pause_until(closed + FIRST_POLL_SHARE * took)
        interval = max(MIN_POLL_S, min(self.poll_interval_s, took / 40)) if took else MIN_POLL_S
        max_queued_look = self._max_queued_look(self.active_per_record * records)
        queued_look = MIN_POLL_S
        first_progress: tuple[float, int] | None = None
        queued_seen = closed  # when a look last saw it still queued
        in_progress_seen: float | None = None  # when a look first saw it InProgress
        while True:
            now, state, processed = self._look(job_id, rows, closed)
            if state is None:
                return now, 0
            if closed is not None and state == IN_PROGRESS and in_progress_seen is None:
                in_progress_seen = now
            self._check_deadline(job_id, now, deadline)
            if closed is not None and state != IN_PROGRESS:
                # Watching for the start: short looks, then longer (a first job's 30 s dequeue costs ~20); at most
                # max_queued_look late, so the dequeue delay measured from it is never much too long.
                queued_seen = now
                queued_look = min(queued_look * 1.25, max_queued_look)
                self.pause(queued_look)
                continue
            if processed and first_progress is None:
                first_progress = (now, processed)
            left = seconds_left(first_progress, now, processed, records) if first_progress else None
            if left is not None and in_progress_seen is not None and not took \
                    and RATE_SHARE * records <= processed - first_progress[1]:
                since = self._first_job_early_close(records, closed, first_progress, now, processed,
                                                    in_progress_seen=in_progress_seen, queued_seen=queued_seen)
                if since is not None:
                    return since, records - processed
            # While the job counts its rows up, look again shortly before the rate says it ends, but never after
            # more than the time the rate was measured over (a rate from two close looks can be far off); else back
            # off. The partition's first job: ~8 looks instead of ~18.
            self.pause(interval if left is None else
                       max(MIN_POLL_S, min(LEFT_SHARE * left, now - first_progress[0])))
            interval = min(interval * 1.25, self.poll_max_interval_s)

    def _first_job_early_close(self, records: int, closed: float, first_progress: tuple[float, int], now: float,
                               processed: int, *, in_progress_seen: float, queued_seen: float) -> float | None:
        """The partition's first job, counting its rows up: its rate over a quarter of the job tells how long a batch
        takes, and its own close-to-InProgress the dequeue delay, so the second job can be closed early too (with a
        30 s dequeue that is at once). An org that counts only whole batches shows no rate: the job is then waited
        for. Returns the time from which the job's ``records - processed`` rows left count towards the next close,
        or ``None``: keep watching."""
        per_record = seconds_per_record(first_progress, now, processed) or 0.0
        dequeue = in_progress_seen - closed
        if dequeue + per_record * records < EARLY_CLOSE_MIN_TOOK_S:
            return None
        self._saw_dequeue(dequeue)
        self.active_per_record = per_record
        self.took_s = dequeue + per_record * records
        # This once, the dequeue delay is known from one job only, to within a queued look (up to 2 s while a batch's
        # length is unknown): the close counts with the shortest it can have been.
        return now - min(self.dequeue_s, queued_seen - closed)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _look(self, job_id: str, rows: int, closed: float | None) -> tuple[float, str | None, int]:
        """One status request: ``(as of, state, processed)`` of the job's longest batch (:func:`as_one_batch`), the
        state ``None`` once the job has processed all its rows (then, for a job this attempt closed, what it took is
        recorded)."""
        asked = self.clock()
        info = as_one_batch(self.get_job(job_id), rows)
        records = batch_records(rows)
        now = (asked + self.clock()) / 2  # the org answered as of about half way through the round trip
        state = info.get("state")
        processed = int(info.get("numberRecordsProcessed") or 0)
        if state in TERMINAL_STATES or processed >= records:
            if closed is not None:
                self.took_s = now - closed
                # Never more than this attempt saw on its own clock (an emulator scaled in time reports modelled
                # milliseconds; Salesforce's own figure is the smaller one anyway).
                active = min(float(info.get("apiActiveProcessingTime") or 0) / 1000,
                             self.took_s - (self.dequeue_s or 0.0))
                self.active_per_record = max(0.0, active) / max(1, processed)
            elif processed and self.active_per_record:
                # An older job, seen done well after its end: its close-to-done time says nothing, but the org's own
                # processing time is exact where it agrees with what this partition measured (a first job's rate
                # from counts that move per 200-row transaction is up to 8 % off, and a partition whose batches all
                # counted 37.5 s for 36 closed each next job late by the difference). An emulator scaled in time
                # reports several times more: kept out by the 25 % band.
                per_record = float(info.get("apiActiveProcessingTime") or 0) / 1000 / processed
                if 0.8 <= per_record / self.active_per_record <= 1.25:
                    self.active_per_record = per_record
            return now, None, processed
        if processed:
            self.counts_rows = True
        return now, state, processed

    def _max_queued_look(self, active: float) -> float:
        if not active:
            return MAX_QUEUED_LOOK_S
        return min(MAX_QUEUED_LOOK_S, max(MIN_POLL_S, MAX_QUEUED_LOOK_SHARE * active))

    def _saw_dequeue(self, seconds: float) -> None:
        """A job left the queue at most ``seconds`` after its close: the dequeue delay is the shortest such figure."""
        self.dequeue_s = seconds if self.dequeue_s is None else min(self.dequeue_s, seconds)

    def _check_deadline(self, job_id: str, now: float, deadline: float) -> None:
        if now > deadline:
            raise AirflowException(f"{self.label}: Bulk job {job_id} STILL RUNNING at Salesforce after "
                                   f"{self.job_timeout_s:.0f}s (not failed); a retry re-attaches to it")

    def _pause_until(self, when: float) -> None:
        seconds = when - self.clock()
        if seconds > 0:
            self.pause(seconds)

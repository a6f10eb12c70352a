"""SerialPacer on a virtual clock: when a serial partition closes its next job, and how many status requests that
costs. The org is modelled per job: queued for ``dequeue_s`` after its close, then InProgress, its batch waiting
``thread_wait_s`` for an org thread, then counting its 10,000 rows up over ``batch_s``. (The same code against the
emulator, closes checked at Salesforce: ``tests/plugins/operators/test_load_partition.py``.)"""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException

from sf_datacloud_sync.utils.serial_pacing import (
    EARLY_CLOSE_MIN_TOOK_S,
    PROBE_EVERY,
    SerialPacer,
    as_one_batch,
    batch_records,
)

ROWS = 10_000


class VirtualOrg:
    """An org's jobs on a virtual clock, which the pacer waits on. A job is queued ``dequeue_s`` after the org saw its
    close (one job, ``750J``, closed at t=0, unless :meth:`close` says otherwise), then InProgress; its batch waits
    ``thread_wait_s`` for an org thread, then processes its rows in ``batch_s``. Rows count up as they commit, or per
    ``chunk_rows``-row transaction at its start (as the emulator counts), or (``counts_rows=False``) only at the end.
    A request takes ``round_trip_s``; the org answers as of half way. A job of ``batches`` batches (a group's) runs them
    side by side and counts all their rows."""

    def __init__(self, *, dequeue_s: float, batch_s: float = 36.0, thread_wait_s: float = 0.0,
                 counts_rows: bool = True, chunk_rows: int = 0, round_trip_s: float = 0.0, batches: int = 1) -> None:
        self.batches = batches
        self.batch_s = batch_s
        self.thread_wait_s = thread_wait_s
        self.counts_rows = counts_rows
        self.chunk_rows = chunk_rows
        self.round_trip_s = round_trip_s
        self.now = 0.0
        self.looks: list[float] = []
        self.closed = {"750J": (0.0, dequeue_s)}  # job -> (when the org saw its close, how long it stays queued)

    def close(self, job_id: str, dequeue_s: float) -> tuple[float, float]:
        """Close a job now: the request's start and end, as the client sees them."""
        sent = self.now
        self.now += self.round_trip_s
        self.closed[job_id] = (sent + self.round_trip_s / 2, dequeue_s)
        return sent, self.now

    def started(self, job_id: str) -> float:
        closed, dequeue = self.closed[job_id]
        return closed + dequeue + self.thread_wait_s

    def get_job(self, job_id: str) -> dict[str, Any]:
        self.looks.append(self.now)
        self.now += self.round_trip_s
        closed, dequeue = self.closed[job_id]
        t = self.now - self.round_trip_s / 2 - closed - dequeue
        if t < 0:
            return {"id": job_id, "state": "UploadComplete", "numberRecordsProcessed": 0}
        t = max(0.0, t - self.thread_wait_s)
        if t >= self.batch_s:
            return {"id": job_id, "state": "JobComplete", "numberRecordsProcessed": ROWS * self.batches,
                    "apiActiveProcessingTime": int(self.batch_s * 1000) * self.batches}
        processed = 0
        if self.counts_rows:
            processed = int(t / self.batch_s * ROWS)
            if self.chunk_rows:
                processed = min(ROWS, (processed // self.chunk_rows + 1) * self.chunk_rows)
        return {"id": job_id, "state": "InProgress", "numberRecordsProcessed": processed * self.batches}

    def pause(self, seconds: float) -> None:
        assert seconds > 0, "a pause of nothing would be a busy loop"
        self.now += seconds

    def pacer(self, *, known_dequeue_s: float | None = None, probe: bool = False) -> SerialPacer:
        """The pacer of a partition that has seen jobs like this one (a ``known_dequeue_s`` dequeue and a batch as
        long), or (``None``) none yet."""
        pacer = SerialPacer(get_job=self.get_job, pause=self.pause, label="P00", poll_interval_s=5.0,
                            poll_max_interval_s=30.0, job_timeout_s=3600, clock=lambda: self.now)
        if known_dequeue_s is not None:
            pacer.took_s, pacer.active_per_record = known_dequeue_s + self.batch_s, self.batch_s / ROWS
            pacer.dequeue_s, pacer.counts_rows = known_dequeue_s, self.counts_rows
        pacer.watches = PROBE_EVERY - 1 if probe else 0  # the next watch is (not) a probe
        return pacer


def watch(*, dequeue_s: float, probe: bool = False, known_dequeue_s: float | None = 30.0, batch_s: float = 36.0,
          thread_wait_s: float = 0.0) -> tuple[int, float, float | None]:
    """Watch the newest job until the next one may be closed.

    :return: how many status requests that took, the virtual time it handed the close over, and the dequeue delay
        the pacer knows then.
    """
    org = VirtualOrg(dequeue_s=dequeue_s, batch_s=batch_s, thread_wait_s=thread_wait_s)
    pacer = org.pacer(known_dequeue_s=known_dequeue_s, probe=probe)
    pacer.wait_turn("750J", ROWS, closed=0.0)
    return len(org.looks), org.now, pacer.dequeue_s


@pytest.mark.parametrize("dequeue_s", [30.0, 31.0, 20.0, 26.0])
def test_a_probe_for_a_shorter_dequeue_costs_a_few_looks(dequeue_s: float) -> None:
    """Every few jobs a serial partition looks at half the dequeue delay it knows, to notice the queue got shorter.
    Finding the job still queued, it halves the time left to the usual look (15 s, 22.5 s, 26 s, 28 s, then 30 s):
    four extra requests at a 30 s dequeue, not a ramp of short looks (~14), and a shorter queue is still seen."""
    usual_looks, usual_handover, usual_dequeue = watch(dequeue_s=dequeue_s, probe=False)
    probe_looks, probe_handover, probe_dequeue = watch(dequeue_s=dequeue_s, probe=True)
    assert usual_looks <= 5
    # Either way the next job, closed at the handover and as long in the queue, starts when this one ends (at
    # dequeue_s + 36) or at most a look's resolution later.
    for handover in (usual_handover, probe_handover):
        assert 36.0 <= handover <= 38.5
    if dequeue_s >= 30:  # nothing to find: the same figure, a few looks more
        assert probe_looks <= usual_looks + 4
        assert probe_dequeue == usual_dequeue == 30.0
    else:  # the probe saw the shorter queue (a usual look cannot), the next probe to within 2.5 s
        assert usual_dequeue == 30.0
        assert probe_looks <= 5
        assert dequeue_s <= probe_dequeue < 30.0
        _, _, next_dequeue = watch(dequeue_s=dequeue_s, probe=True, known_dequeue_s=probe_dequeue)
        assert dequeue_s <= next_dequeue <= min(probe_dequeue, dequeue_s + 2.5)


def test_a_long_dequeue_is_hidden_even_where_batches_are_quick() -> None:
    """7.2 s batches behind a 6 s dequeue (a realistic org time-scaled by 5, or small jobs on a slow queue): the next
    job is still closed one dequeue delay before the newest ends, since the close-to-end time is what it hides."""
    looks, handover, dequeue = watch(dequeue_s=6.0, known_dequeue_s=6.0, batch_s=7.2)
    assert dequeue == 6.0 and looks <= 3
    assert 7.2 <= handover <= 7.7  # the newest job ends at 13.2 s; the next one, closed then, leaves the queue then


@pytest.mark.parametrize(("dequeue_s", "batch_s"), [(2.0, 36.0), (30.0, 36.0), (6.0, 7.2)])
def test_the_first_jobs_early_close_never_counts_with_a_dequeue_longer_than_it_was(dequeue_s: float,
                                                                                  batch_s: float) -> None:
    """The first job's dequeue delay is seen to within a look (up to 2 s). The second job, closed early from the first
    job's rate, counts with the shortest delay the looks allow: it leaves the queue after the first job ends, not up
    to a look before, when both batches would wait for the same Account's row locks."""
    _, handover, dequeue = watch(dequeue_s=dequeue_s, known_dequeue_s=None, batch_s=batch_s)
    assert dequeue_s <= dequeue <= dequeue_s + 2.0  # what later jobs start from; probes bring it down
    end = dequeue_s + batch_s
    assert end <= handover + dequeue_s
    if dequeue_s < 0.5 * batch_s:  # the rate is known in time (else the close is at once): at most a look late
        assert handover + dequeue_s <= end + 2.0


@pytest.mark.parametrize("thread_wait_s", [0.0, 1.0, 5.0])
def test_a_batch_waiting_for_an_org_thread_is_not_counted_as_running(thread_wait_s: float) -> None:
    """A job turns InProgress before its batch gets one of the org's threads; on a busy org that takes seconds. The
    next job is closed from when the batch started (its rows counted so far tell), so it still leaves the queue after
    this one ends, not while it runs (two batches of one Account would wait for each other's row locks)."""
    looks, handover, _ = watch(dequeue_s=6.0, known_dequeue_s=6.0, batch_s=7.2, thread_wait_s=thread_wait_s)
    end = 6.0 + thread_wait_s + 7.2
    assert end <= handover + 6.0 <= end + 1.0
    assert looks <= 3 + 2 * thread_wait_s


def test_a_look_that_comes_after_the_batch_started_does_not_delay_the_next_close() -> None:
    """The usual look comes just after the job left the queue, when its first 200-row transaction already counts.
    Its batch started then, not at the look: the next job is closed to leave the queue when this batch ends, not a
    transaction (0.72 s) later."""
    org = VirtualOrg(dequeue_s=2.0, chunk_rows=200)
    pacer = org.pacer(known_dequeue_s=2.0)
    pacer.wait_turn("750J", ROWS, closed=0.0)
    end = 2.0 + 36.0
    assert end - 0.75 <= org.now + 2.0 <= end + 0.05
    assert len(org.looks) == 1


def test_a_queue_slower_than_the_shortest_seen_costs_no_extra_look() -> None:
    """The dequeue delay the partition knows is the shortest it saw (2 s); this job waits 2.5 s. The usual look comes
    a second after the known delay, finds it InProgress and its first rows counted: one request, and the batch's start
    follows from its rows. The next job is closed 2 s before this one ends: half a second late, not early."""
    org = VirtualOrg(dequeue_s=2.5, chunk_rows=200)
    pacer = org.pacer(known_dequeue_s=2.0)
    pacer.wait_turn("750J", ROWS, closed=0.0)
    assert len(org.looks) == 1
    end = 2.5 + 36.0
    assert end - 0.75 <= org.now + 2.5 <= end + 0.6


def test_a_partitions_batches_follow_each_other_closely() -> None:
    """14 jobs closed one after the other, each queued 2.0-2.6 s (seeded), batches of 36 s counted per 200-row
    transaction, every request a 0.3 s round trip: the next batch starts on average within 0.1 s of the previous
    one's end, never more than about a transaction and the queue's spread before it, at under three status
    requests per job."""
    import random

    rnd = random.Random(7)
    org = VirtualOrg(dequeue_s=0.0, chunk_rows=200, round_trip_s=0.3)
    pacer = org.pacer()
    gaps, running = [], []
    for n in range(14):
        job_id = f"J{n}"
        closed = pacer.job_closed(*org.close(job_id, rnd.uniform(2.0, 2.6)))
        if n:
            gaps.append(org.started(job_id) - (org.started(running[-1]) + 36.0))
        running.append(job_id)
        if n < 13:
            pacer.wait_turn(job_id, ROWS, closed=closed, older=[(j, ROWS) for j in running[:-1]])
            running = running[-1:]
    later = gaps[2:]  # from the third job on: the first job's rate and dequeue delay are learnt by then
    assert abs(sum(later) / len(later)) <= 0.1
    assert min(gaps) >= -1.0
    assert len(org.looks) <= 3 * 13


def test_an_org_that_counts_whole_batches_only_is_waited_for_then_overlapped() -> None:
    """No rate while the first job runs (processed stays 0 until the end): the pacer waits for it and learns from its
    end what a job takes. The next job's watch then counts the batch from the look that saw it InProgress."""
    org = VirtualOrg(dequeue_s=2.0, counts_rows=False)
    pacer = org.pacer()
    pacer.wait_turn("750J", ROWS, closed=0.0)
    assert org.now >= 38.0  # the whole first job, not a guess
    assert pacer.took_s == pytest.approx(org.now) and pacer.took_s >= EARLY_CLOSE_MIN_TOOK_S
    assert pacer.active_per_record == pytest.approx(36.0 / ROWS) and not pacer.counts_rows
    # Looks back off by 1.25x: the end is seen at most a quarter of the time since the close late.
    assert 38.0 <= pacer.took_s <= 1.25 * 38.0

    looks = len(org.looks)
    closed = pacer.job_closed(*org.close("750K", 2.0))
    pacer.wait_turn("750K", ROWS, closed=closed)
    # Watched while queued (the dequeue delay is not known yet), seen InProgress within a short look; its end follows
    # from the last job's batch: the third job, closed at the handover, leaves the queue when this one ends.
    assert len(org.looks) - looks <= 8 and 2.0 <= pacer.dequeue_s <= 2.7
    end = org.started("750K") + 36.0
    assert end <= org.now + 2.0 <= end + 0.7


def test_quick_jobs_are_waited_for_to_their_end() -> None:
    """Jobs that take less than EARLY_CLOSE_MIN_TOOK_S from close to end: nothing overlaps."""
    org = VirtualOrg(dequeue_s=0.5, batch_s=3.0)
    pacer = org.pacer(known_dequeue_s=0.5)
    assert pacer.took_s < EARLY_CLOSE_MIN_TOOK_S
    pacer.wait_turn("750J", ROWS, closed=0.0)
    assert len(org.looks) <= 6
    assert org.now >= 3.5 and org.get_job("750J")["state"] == "JobComplete"


def test_older_jobs_are_waited_for_without_changing_the_estimates() -> None:
    """``wait_done`` (a job closed earlier, not by this watch) teaches nothing about close-to-end times."""
    org = VirtualOrg(dequeue_s=1.0, batch_s=12.0)
    pacer = org.pacer(known_dequeue_s=1.0)
    before = (pacer.took_s, pacer.active_per_record, pacer.dequeue_s)
    pacer.wait_done("750J", ROWS)
    assert org.get_job("750J")["state"] == "JobComplete"
    assert (pacer.took_s, pacer.active_per_record, pacer.dequeue_s) == before


def test_a_job_that_never_ends_fails_the_watch_as_still_running() -> None:
    org = VirtualOrg(dequeue_s=1e9)  # queued for ever
    pacer = org.pacer(known_dequeue_s=30.0)
    pacer.job_timeout_s = 120
    with pytest.raises(AirflowException, match="750J STILL RUNNING at Salesforce after 120s"):
        pacer.wait_turn("750J", ROWS, closed=0.0)
    assert 120 < org.now < 123  # counted from the start of the watch, not from its first look (at 30 s)


def test_a_group_job_is_seen_as_its_longest_batch() -> None:
    """5 batches of 10,000 side by side: half done when 25,000 rows counted; the org's processing time, summed over
    the batches, gives the same time per row as one batch would."""
    info = {"state": "InProgress", "numberRecordsProcessed": 25_000, "apiActiveProcessingTime": 90_000}
    seen = as_one_batch(info, 50_000)
    assert seen["numberRecordsProcessed"] == 5_000 and seen["state"] == "InProgress"
    assert seen["apiActiveProcessingTime"] / seen["numberRecordsProcessed"] == 90_000 / 25_000
    assert batch_records(50_000) == 10_000 and batch_records(38_291) == 10_000 and batch_records(9_000) == 9_000
    # One batch or less (a single partition, or a group's last rows in one batch): as it is.
    assert as_one_batch(info, 9_000) is info


@pytest.mark.parametrize("known_dequeue_s", [2.0, None])
def test_a_group_job_is_paced_as_its_longest_batch(known_dequeue_s: float | None) -> None:
    """A job of 5 batches side by side (50,000 rows counted together) hands the close over when a one-batch job would:
    as a partition that knows its org, and as one whose first job this is."""
    closes = []
    for batches in (1, 5):
        org = VirtualOrg(dequeue_s=2.0, batches=batches)
        org.pacer(known_dequeue_s=known_dequeue_s).wait_turn("750J", batches * ROWS, closed=0.0)
        closes.append(org.now)
    assert closes[1] == pytest.approx(closes[0], abs=0.3)
    assert 30.0 < closes[0] <= 38.5  # one dequeue delay before the batch ends at 38 s, or at its end

"""The emulator's org-wide parent-record locks: all or nothing, and waiters served in arrival order."""

from __future__ import annotations

import threading
import time

from emulator.bulk_engine import ParentLocks


def _waiting(locks: ParentLocks, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(locks._waiting) < n:
        assert time.monotonic() < deadline, "the waiter never started waiting"
        time.sleep(0.001)


def test_a_waiter_that_asked_first_gets_the_lock_before_its_holder_asks_again() -> None:
    locks, holder, waiter = ParentLocks(), object(), object()
    assert locks.acquire(["ACC-1"], holder, 0) == []
    got: list[list[str]] = []
    thread = threading.Thread(target=lambda: got.append(locks.acquire(["ACC-1"], waiter, 5)))
    thread.start()
    _waiting(locks, 1)
    locks.release(["ACC-1"], holder)
    # The holder's next transaction asks at once, before the waiter's thread has run: it queues behind the waiter.
    assert locks.acquire(["ACC-1"], object(), 0) == ["ACC-1"]
    thread.join(5)
    assert got == [[]]
    assert locks._held == {"ACC-1": waiter} and not locks._waiting


def test_disjoint_parents_never_wait_and_a_timeout_names_the_contended_ones() -> None:
    locks, a, b = ParentLocks(), object(), object()
    assert locks.acquire(["ACC-1", "ACC-2"], a, 0) == []
    assert locks.acquire(["ACC-3"], b, 0) == []
    started = time.monotonic()
    assert locks.acquire(["ACC-2", "ACC-4"], object(), 0.05) == ["ACC-2"]
    assert 0.05 <= time.monotonic() - started < 2
    assert "ACC-4" not in locks._held and not locks._waiting  # all or nothing; no waiter left behind


def test_two_batches_on_one_account_take_turns_instead_of_one_timing_out() -> None:
    """Two batches, each committing 100 transactions on the same Account, each transaction holding it 5 ms and asking
    again right away: served in order they alternate, so no wait comes near the 0.25 s timeout. (Served as whoever
    grabs the lock first, the batch holding it kept it for all its 0.5 s and the other timed out.)"""
    locks = ParentLocks()
    failures: list[int] = []

    def batch() -> None:
        for _ in range(100):
            owner = object()
            if locks.acquire(["ACC-1"], owner, 0.25):
                failures.append(1)
                continue
            time.sleep(0.005)  # the transaction's work, the GIL released as in the emulator's timed chunks
            locks.release(["ACC-1"], owner)

    threads = [threading.Thread(target=batch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def test_a_waiter_that_gives_up_lets_the_one_queued_behind_it_go() -> None:
    """W1 waits for ACC-1 (held) and ACC-2 (free); W2, queued after it, wants only ACC-2 and so waits behind W1. When
    W1 times out, W2 is woken and takes ACC-2 at once, not at the end of its own, longer wait."""
    locks, holder = ParentLocks(), object()
    assert locks.acquire(["ACC-1"], holder, 0) == []
    results: dict[str, list[str]] = {}
    first = threading.Thread(target=lambda: results.update(w1=locks.acquire(["ACC-1", "ACC-2"], object(), 0.2)))
    first.start()
    _waiting(locks, 1)
    done: list[float] = []

    def second() -> None:
        results["w2"] = locks.acquire(["ACC-2"], object(), 5)
        done.append(time.monotonic())

    started = time.monotonic()
    thread = threading.Thread(target=second)
    thread.start()
    first.join(5)
    thread.join(5)
    assert results == {"w1": ["ACC-1"], "w2": []}
    assert done[0] - started < 2  # woken when W1 gave up (0.2 s), not after its own 5 s

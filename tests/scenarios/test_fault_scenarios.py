"""The whole DAG under injected faults: every source row ends in the org field by field, or is reported.

Each scenario runs ``dag.test()`` against the emulator with a fault plan, then checks with
:func:`tests.e2e_support.assert_nothing_lost`: the run is green, ``verify`` reconciles, each of the 4,000 Data
Cloud rows is an Opportunity with identical fields or a row of a partition's failure CSV with its error code
(exactly the 15 the seed makes bad), no chunk was uploaded twice and no row was lost to a transient error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from emulator.harness import EmulatorProcess
from tests.e2e_support import DC_ROWS_PATH, Reconciliation, assert_no_secrets, assert_nothing_lost, run, xcom
from tests.scenarios.conftest import EXPECTED_FAILED

#: Every path except the OAuth token endpoints (they get their own, lower rate).
NOT_TOKEN = r"^(?!/services/oauth2/token)(?!/services/a360/token)"


def note(figures: list[dict[str, Any]], name: str, org: EmulatorProcess, rec: Reconciliation, dr: Any,
         **extra: Any) -> dict[str, Any]:
    """One line of RELIABILITY.md's figures: rows checked, faults injected (emulator stats), rows lost."""
    stats = org.stats()
    summary = xcom(dr, "verify")
    row = {"scenario": name, "rows_checked": rec.rows, "landed": rec.landed, "reported_failed": rec.reported,
           "rows_lost": len(rec.lost), "faults_injected": sum(stats.get("faults_injected", {}).values()),
           "requests": sum(stats["requests"].values()),
           "retried_rows": summary["retried"], "duplicate_uploads": stats["duplicate_uploads"], **extra}
    figures.append(row)
    return row


def _failed_jobs(org: EmulatorProcess) -> list[str]:
    import sqlite3

    with sqlite3.connect(f"file:{org.data_dir / 'org.sqlite'}?mode=ro", uri=True, timeout=30) as db:
        return [r[0] for r in db.execute("SELECT id FROM bulk_jobs WHERE state = 'Failed'")]


@contextmanager
def every(seconds: float, action: Callable[[], Any], limit: int | None = None) -> Iterator[list[int]]:
    """Call ``action`` every ``seconds`` in a background thread while the block runs; yields the call count."""
    stop = threading.Event()
    count = [0]

    def loop() -> None:
        while not stop.wait(seconds) and (limit is None or count[0] < limit):
            try:
                action()
                count[0] += 1
            except Exception:  # the emulator may be busy or restarting; the next tick tries again
                pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join(timeout=30)


def test_5xx_and_429_on_every_endpoint(scen_dag: Any, org: EmulatorProcess, figures: list, capfd: Any,
                                       caplog: Any) -> None:
    """1. 10 % of requests answer 5xx and 5 % answer 429, on Salesforce and Data Cloud paths; tokens 3 %.

    Security: the retries log request URLs and errors; none of the output holds a secret or a token."""
    org.set_faults(rules=[
        {"path": r"^/services/(oauth2|a360)/token", "status": 503, "rate": 0.03},
        {"path": NOT_TOKEN, "status": 503, "rate": 0.07},
        {"path": NOT_TOKEN, "status": 500, "rate": 0.03},
        {"path": NOT_TOKEN, "status": 429, "rate": 0.05, "retry_after": 0},
    ])
    dr = run(scen_dag, org, partitions=3, partition_key="account", max_records_per_job=200)
    rec = assert_nothing_lost(dr, org, expect_failed=EXPECTED_FAILED)
    injected = org.stats()["faults_injected"]
    out = capfd.readouterr()
    tokens = assert_no_secrets(org, {"stdout": out.out, "stderr": out.err, "log": caplog.text})
    row = note(figures, "1 5xx/429 everywhere", org, rec, dr, tokens_checked=tokens)
    assert row["faults_injected"] >= 10, injected
    # Both APIs and both kinds of fault were really hit.
    assert any("ssot" in k or "/api/v" in k for k in injected), injected
    assert any("jobs/ingest" in k for k in injected), injected
    assert any(k.startswith("429") for k in injected) and any(k.startswith("503") for k in injected), injected


def test_sessions_expiring_every_few_seconds(scen_dag: Any, org: EmulatorProcess, figures: list, capfd: Any,
                                             caplog: Any) -> None:
    """2. Sessions live 2 s, and every session is revoked every 0.5 s besides.

    Security: many sessions are issued and renewed; none of their tokens (nor the secrets) reaches the output."""
    # Bulk processing at 1 ms/row keeps each partition busy for seconds, so sessions end while polls, uploads
    # and result downloads run: the 401 renews once and re-sends.
    org.set_faults(session_lifetime_s=2, per_record_ms=1)
    with every(0.5, lambda: org.control("POST", "sessions/expire")) as expiries:
        dr = run(scen_dag, org, partitions=3, partition_key="external_id", max_records_per_job=400)
    rec = assert_nothing_lost(dr, org, expect_failed=EXPECTED_FAILED)
    stats = org.stats()
    invalid_sessions = stats["status_codes"].get("401", 0)
    out = capfd.readouterr()
    tokens = assert_no_secrets(org, {"stdout": out.out, "stderr": out.err, "log": caplog.text})
    note(figures, "2 sessions expiring", org, rec, dr, forced_expiries=expiries[0], http_401=invalid_sessions,
         tokens_checked=tokens)
    assert tokens >= 3
    assert expiries[0] >= 2 and invalid_sessions > 0, stats["status_codes"]


def test_lock_contention_with_external_id_partitions(scen_dag: Any, org: EmulatorProcess, figures: list) -> None:
    """3. 20 % lock contention, partitions by external id (worst case): every lock failure ends upserted."""
    try:
        # Small internal batches run in parallel and share Accounts: the contention the knob draws from.
        org.control("PUT", "profile", {"name": "instant", "internal_batch_records": 200, "per_record_ms": 0.05,
                                       "lock_wait_timeout_s": 0.01})
        org.set_faults(lock_contention_rate=0.2)
        dr = run(scen_dag, org, partitions=3, partition_key="external_id", max_records_per_job=1_000)
        rec = assert_nothing_lost(dr, org, expect_failed=EXPECTED_FAILED)
        locks = org.stats()["failures_by_code"].get("UNABLE_TO_LOCK_ROW", 0)
        summary = xcom(dr, "verify")
        note(figures, "3 lock contention 20%", org, rec, dr, lock_failures=locks)
        assert locks > 50 and summary["retried"] >= locks, (locks, summary["retried"])
    finally:
        org.control("PUT", "profile", {"name": "instant"})


def test_emulator_down_for_ten_seconds(scen_dag: Any, org: EmulatorProcess, figures: list) -> None:
    """5. The whole org (Salesforce and Data Cloud) stops for 10 s mid-run and comes back on the same data."""
    outage: dict[str, float] = {}

    def outage_when_loading() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if org.stats().get("bulk_jobs_created", 0) >= 3:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        outage["at_jobs"] = org.stats().get("bulk_jobs_created", 0)
        org.stop(kill=True)  # no graceful goodbye: open connections break mid-request
        outage["stopped"] = time.monotonic()
        time.sleep(10)
        org.start()
        outage["down_s"] = time.monotonic() - outage["stopped"]

    # Slow Bulk processing a little so jobs are still running when the org goes away.
    org.set_faults(per_record_ms=0.5)
    thread = threading.Thread(target=outage_when_loading, daemon=True)
    thread.start()
    try:
        dr = run(scen_dag, org, partitions=3, partition_key="account", max_records_per_job=400)
    finally:
        thread.join(timeout=90)
        if org.proc is None:
            org.start()
    assert outage.get("down_s", 0) >= 10, outage
    org.set_faults(per_record_ms=0)
    rec = assert_nothing_lost(dr, org, expect_failed=EXPECTED_FAILED)
    note(figures, "5 org down 10 s", org, rec, dr, outage_s=round(outage["down_s"], 1),
         jobs_before_outage=outage["at_jobs"])


def test_datacloud_query_expires_mid_partition(scen_dag: Any, org: EmulatorProcess, figures: list) -> None:
    """6. Data Cloud drops the query results while partitions stream: each resumes after its last committed key."""
    # Small pages, each a little slow, so a partition's read spans many requests and several expiries.
    org.control("PUT", "profile", {"name": "instant", "dc_first_page_max_rows": 100, "dc_page_max_bytes": 20_000})
    org.set_faults(rules=[{"path": DC_ROWS_PATH, "status": 0, "latency_ms": 120, "rate": 1.0}])
    try:
        with every(0.8, lambda: org.control("POST", "datacloud/expire", {})) as expiries:
            dr = run(scen_dag, org, partitions=3, partition_key="external_id", max_records_per_job=300)
    finally:
        org.control("PUT", "profile", {"name": "instant"})
    rec = assert_nothing_lost(dr, org, expect_failed=EXPECTED_FAILED)
    stats = org.stats()
    expired_reads = sum(n for k, n in stats["status_codes"].items() if k == "400")
    note(figures, "6 Data Cloud query expiry", org, rec, dr, forced_expiries=expiries[0],
         expired_reads=expired_reads)
    assert expiries[0] >= 3, expiries


@pytest.mark.parametrize("limit", [250])
def test_jobs_failed_part_way_are_resubmitted(scen_dag: Any, org: EmulatorProcess, figures: list,
                                               limit: int) -> None:
    """7. Salesforce fails every job after ``limit`` rows; the unprocessed rows go again in follow-up jobs."""
    org.set_faults(fail_job_after_records=limit)
    dr = run(scen_dag, org, partitions=3, partition_key="account", max_records_per_job=600)
    rec = assert_nothing_lost(dr, org, expect_failed=EXPECTED_FAILED)
    summary = xcom(dr, "verify")
    failed_jobs = len(_failed_jobs(org))
    note(figures, "7 jobs failed part-way", org, rec, dr, fail_job_after_records=limit, failed_jobs=failed_jobs)
    assert failed_jobs >= 3
    assert summary["retried"] >= 1  # the unprocessed rows went again and ended upserted

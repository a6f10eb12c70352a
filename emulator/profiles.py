"""Timing profiles: ``instant`` for tests and throughput, ``realistic`` from published Salesforce figures.

The realistic values and their sources are in ``shared/reference/timing_model.md`` (section 3); every
duration is divided by ``time_scale`` so that long runs can be shrunk uniformly without changing ratios.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Profile:
    name: str = "instant"
    time_scale: float = 1.0
    rest_latency_ms: float = 0.0
    upload_mbps: float = 0.0  # 0 = unlimited
    download_mbps: float = 0.0
    internal_batch_records: int = 10_000
    chunk_records: int = 200
    org_worker_threads: int = 15
    per_record_ms: float = 0.0
    job_dequeue_delay_s: float = 0.0
    job_finalize_s: float = 0.0
    batch_time_limit_s: float = 300.0
    max_batch_retries: int = 20
    lock_wait_timeout_s: float = 10.0
    lock_contention_rate: float = 0.0  # extra, fault-injected share of rows failing UNABLE_TO_LOCK_ROW
    fail_job_after_records: int = 0  # fault: a Bulk ingest job fails once it has processed this many rows (0 = off)
    dc_request_latency_ms: float = 0.0
    dc_execution_s: float = 0.0
    dc_first_page_max_rows: int = 2_000
    dc_page_max_bytes: int = 2_000_000
    dc_status_long_poll_max_ms: int = 10_000
    dc_result_ttl_s: float = 24 * 3600.0
    session_lifetime_s: float = 7200.0

    def scaled(self, seconds: float) -> float:
        """A modelled duration in wall-clock seconds under this profile's time scale."""
        return seconds / self.time_scale if self.time_scale > 0 else seconds

    async def rest_delay(self) -> None:
        if self.rest_latency_ms:
            await asyncio.sleep(self.scaled(self.rest_latency_ms / 1000))

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(self.scaled(seconds))

    def as_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> Profile:
        known = {k: v for k, v in overrides.items() if k in self.__dataclass_fields__}
        return replace(self, **known)


INSTANT = Profile()

REALISTIC = Profile(
    name="realistic",
    rest_latency_ms=150,
    upload_mbps=10,
    download_mbps=20,
    per_record_ms=3.6,
    job_dequeue_delay_s=2.0,
    job_finalize_s=1.0,
    dc_request_latency_ms=150,
    dc_execution_s=1.0,
)

PROFILES = {"instant": INSTANT, "realistic": REALISTIC}


def get_profile(name: str, time_scale: float = 1.0) -> Profile:
    try:
        base = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
    return replace(base, time_scale=time_scale)

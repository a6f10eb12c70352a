"""How long a Bulk job still needs, judged from how its ``numberRecordsProcessed`` grew between polls."""

from __future__ import annotations


def seconds_per_record(first: tuple[float, int], now: float, processed: int) -> float | None:
    """The job's processing time per row since ``first`` (``(monotonic time, processed)`` at an earlier poll);
    ``None`` while no progress has been seen (a real org may only count whole batches)."""
    since, start = first
    if processed <= start or now <= since:
        return None
    return (now - since) / (processed - start)


def seconds_left(first: tuple[float, int], now: float, processed: int, records: int) -> float | None:
    """Seconds until ``records`` rows are processed at the rate seen since ``first`` (see
    :func:`seconds_per_record`); ``None`` while there is no rate."""
    per_record = seconds_per_record(first, now, processed) if records > 0 else None
    return None if per_record is None else max(0, records - processed) * per_record

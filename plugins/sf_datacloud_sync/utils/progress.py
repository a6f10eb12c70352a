"""How long a Bulk job still needs, judged from how its ``numberRecordsProcessed`` grew between polls."""

from __future__ import annotations


def seconds_left(first: tuple[float, int], now: float, processed: int, records: int) -> float | None:
    """Seconds until ``records`` rows are processed at the rate seen since ``first`` (``(monotonic time, processed)``
    at an earlier poll); ``None`` while no progress has been seen (a real org may only count whole batches)."""
    since, start = first
    if records <= 0 or processed <= start or now <= since:
        return None
    return max(0, records - processed) * (now - since) / (processed - start)

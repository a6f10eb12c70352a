"""The time a Bulk job still needs, from how its processed count grew between two polls."""

from __future__ import annotations

import pytest

from sf_datacloud_sync.utils.progress import seconds_left, seconds_per_record


def test_rate_between_two_polls_gives_the_time_left() -> None:
    # 200 rows at t=10, 1,200 at t=14: 250 rows/s, 8,800 rows to go.
    assert seconds_left((10.0, 200), 14.0, 1_200, 10_000) == pytest.approx(35.2)
    assert seconds_left((10.0, 200), 14.0, 10_000, 10_000) == 0.0
    assert seconds_per_record((10.0, 200), 14.0, 1_200) == pytest.approx(0.004)


@pytest.mark.parametrize(("first", "now", "processed"), [
    ((10.0, 200), 14.0, 200),  # no progress since the first look (a real org may count whole batches only)
    ((10.0, 200), 10.0, 400),  # no time passed
    ((10.0, 500), 14.0, 400),  # a count that went down is no rate
])
def test_no_rate_no_estimate(first: tuple[float, int], now: float, processed: int) -> None:
    assert seconds_left(first, now, processed, 10_000) is None
    assert seconds_per_record(first, now, processed) is None
    assert seconds_left((0.0, 0), 1.0, 5, 0) is None

"""The pool the partitions run in: created once, counting deferred tasks, never resized behind an operator's back."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def metadata_db() -> None:
    from airflow.utils import db

    db.resetdb()


def test_ensure_pool_creates_once_and_keeps_a_tuned_size(metadata_db: None) -> None:
    from airflow.models.pool import Pool

    from sf_datacloud_sync.setup import DEFAULT_POOL, ensure_pool

    assert ensure_pool(slots=7) == {"pool": DEFAULT_POOL, "slots": 7, "include_deferred": True, "created": True}
    assert ensure_pool(slots=3)["slots"] == 7  # an existing pool keeps its size ...
    assert ensure_pool(slots=3, resize=True)["slots"] == 3  # ... unless asked
    pool = Pool.get_pool(DEFAULT_POOL)
    assert pool is not None and pool.include_deferred


def test_ensure_pool_switches_on_include_deferred(metadata_db: None) -> None:
    from airflow.models.pool import Pool

    from sf_datacloud_sync.setup import ensure_pool

    Pool.create_or_update_pool("legacy_pool", 4, "made without --include-deferred", False)
    assert ensure_pool("legacy_pool") == {"pool": "legacy_pool", "slots": 4, "include_deferred": True,
                                          "created": False}
    with pytest.raises(ValueError):
        ensure_pool("other", slots=0)

"""One-time deployment setup: the ``salesforce_bulk`` pool the load partitions run in.

A task that names a pool which does not exist is **never scheduled** (Airflow only logs a warning), so the pool
must exist before the first run. Pools are metadata-database state, and tasks in Airflow 3 have no access to the
database or a pool API (the Execution API has none), so the DAG cannot create its own pool. Create it once per
deployment, either with the CLI::

    airflow pools set salesforce_bulk 16 "Concurrent Salesforce Bulk API 2.0 jobs" --include-deferred

or from Python on a machine with metadata-database access (``make demo`` and the tests use this)::

    PYTHONPATH=plugins python -m sf_datacloud_sync.setup --slots 16

``include_deferred`` matters: a partition spends most of its time *deferred* while Salesforce processes its jobs,
and without it deferred tasks free their slot, so the pool would not cap concurrent Bulk jobs at all.
Size the pool for the org: Salesforce processes a limited number of Bulk jobs concurrently, shared with every
other integration (Data Loader, ETL tools), and each partition keeps one job open at a time.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_POOL = "salesforce_bulk"
DEFAULT_SLOTS = 16
DEFAULT_DESCRIPTION = "Concurrent Salesforce Bulk API 2.0 jobs of the Data Cloud sync (deferred tasks count)"


def ensure_pool(name: str = DEFAULT_POOL, slots: int = DEFAULT_SLOTS, description: str = DEFAULT_DESCRIPTION,
                *, resize: bool = False, session: Any = None) -> dict[str, Any]:
    """Create the pool if it is missing; make sure it counts deferred tasks.

    An existing pool keeps its size (an operator may have tuned it) unless ``resize`` is true.
    Returns ``{"pool", "slots", "include_deferred", "created"}``.
    """
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session

    if slots < 1:
        raise ValueError("a pool needs at least one slot")

    def _apply(s: Any) -> dict[str, Any]:
        pool = Pool.get_pool(name, session=s)
        created = pool is None
        if created:
            pool = Pool.create_or_update_pool(name, slots, description, True, session=s)
            log.info("created pool %s with %d slots (deferred tasks count)", name, slots)
        elif resize or not pool.include_deferred:
            if not pool.include_deferred:
                log.warning("pool %s did not count deferred tasks; switching include_deferred on", name)
            pool = Pool.create_or_update_pool(name, slots if resize else pool.slots, pool.description or description,
                                              True, session=s)
        return {"pool": name, "slots": pool.slots, "include_deferred": pool.include_deferred, "created": created}

    if session is not None:
        return _apply(session)
    with create_session() as s:
        return _apply(s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Create the pool the Data Cloud sync's partitions run in.")
    parser.add_argument("--name", default=DEFAULT_POOL)
    parser.add_argument("--slots", type=int, default=DEFAULT_SLOTS)
    parser.add_argument("--description", default=DEFAULT_DESCRIPTION)
    parser.add_argument("--resize", action="store_true", help="also change the size of an existing pool")
    args = parser.parse_args(argv)
    print(ensure_pool(args.name, args.slots, args.description, resize=args.resize))


if __name__ == "__main__":
    main()

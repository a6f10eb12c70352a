"""Fixtures of the CeleryExecutor test: one distributed stack and one DAG run for the whole package.

``distributed`` starts PostgreSQL, Redis, the seeded emulator and Airflow's components as separate processes
(:class:`tests.distributed.stack.DistributedRun`); ``sync_run`` triggers ``datacloud_opportunity_sync`` once
through the REST API and records what it saw while the run lasted. Both stop everything afterwards, failure or
not, and dump the tail of every process log when anything failed. The timings and which worker ran which map
index are printed at the end of the session (and written to ``.distributed/figures.json``).

Settings: environment variables, see :mod:`tests.distributed.stack`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.distributed.stack import PARTITIONS, RUN_TIMEOUT, DistributedRun, SyncRun, default_root, settings

FIGURES = pytest.StashKey[dict]()


@pytest.fixture(scope="package")
def distributed(request: pytest.FixtureRequest) -> Iterator[DistributedRun]:
    run = DistributedRun(default_root(), **settings())
    figures = request.config.stash.setdefault(FIGURES, {})
    figures["timings"] = run.timings
    failed_before = request.session.testsfailed
    healthy = False
    try:
        run.start()
        yield run
        healthy = request.session.testsfailed == failed_before
    finally:
        try:
            if not healthy:
                run.dump_logs()
        finally:
            run.stop()
            run.root.mkdir(parents=True, exist_ok=True)
            (run.root / "figures.json").write_text(json.dumps(figures, indent=1, default=str))


@pytest.fixture(scope="package")
def sync_run(distributed: DistributedRun, request: pytest.FixtureRequest) -> SyncRun:
    stack = distributed.airflow
    assert stack is not None
    conf = {"partitions": PARTITIONS, "partition_key": "account", "partitions_per_task": 1}  # a task per partition
    t0 = time.monotonic()
    run_id = stack.trigger(conf, note="make test-distributed")
    distributed.say(f"triggered {run_id} with {conf}")
    run, seen = stack.watch_run(run_id, timeout=RUN_TIMEOUT, progress=distributed.say)
    wall = round(time.monotonic() - t0, 1)
    distributed.timings["dag_run_s"] = wall
    tis = stack.task_instances(run_id)
    verify = stack.xcom(run_id, "verify") if any(
        t["task_id"] == "verify" and t.get("state") == "success" for t in tis) else None
    result = SyncRun(run_id=run_id, state=run.get("state", ""), wall_s=wall, task_instances=tis, seen=seen,
                     executions=stack.executions(), verify=verify)
    distributed.say(f"run {result.state} after {wall}s")
    request.config.stash[FIGURES]["partitions"] = [
        {"map_index": t["map_index"], "label": t.get("rendered_map_index"), "state": t.get("state"),
         "try_number": t.get("try_number"), "hostname": t.get("hostname"),
         "workers": result.workers_of_index(t["map_index"]),
         "states_seen": seen.get(("load_partition", t["map_index"]), {}).get("states")}
        for t in result.loads]
    request.config.stash[FIGURES]["other_tasks"] = {
        task: [e["worker"] for e in result.executions if e["task_id"] == task] for task in ("discover", "verify")}
    return result


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, None)
    if not figures or not figures.get("timings"):
        return
    write = terminalreporter.write_line
    terminalreporter.section("distributed: CeleryExecutor figures")
    write("timings (s): " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in figures["timings"].items()))
    for task, workers in figures.get("other_tasks", {}).items():
        write(f"  {task}: workloads on {' -> '.join(workers) or '?'}")
    for p in figures.get("partitions", []):
        write(f"  load_partition[{p['map_index']}] {p['label']}: {p['state']} (try {p['try_number']}), workloads on "
              f"{' -> '.join(p['workers']) or '?'}, hostname {p['hostname']}, states {p['states_seen']}")

"""The REST side of ``make demo``: wait for the DAG to be parsed, unpause and trigger it, follow the run.

    python include/scripts/demo_run.py trigger --partitions 10 --partition-key account   # prints the run id
    python include/scripts/demo_run.py wait RUN_ID --timeout 1800                        # prints the final state

Connection settings come from ``.demo/demo.json`` (see :mod:`include.status`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from include.status import DAG_ID, api_from_env, collect, load_demo_settings, render  # noqa: E402


def trigger(partitions: int, partition_key: str, dag_id: str = DAG_ID, parse_timeout: float = 180) -> str:
    """Wait until the dag-processor has parsed the DAG (failing on import errors), unpause it, trigger one run."""
    api = api_from_env()
    deadline = time.monotonic() + parse_timeout
    while True:
        errors = (api.get("importErrors") or {}).get("import_errors") or []
        if errors:
            raise SystemExit("import errors:\n" + "\n".join(e.get("stack_trace", "") for e in errors))
        if api.get(f"dags/{dag_id}") is not None:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the DAG {dag_id} did not appear within {parse_timeout:.0f}s")
        time.sleep(2)
    api.http.patch(f"{api.base_url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30).raise_for_status()
    resp = api.http.post(f"{api.base_url}/api/v2/dags/{dag_id}/dagRuns", timeout=30,
                         json={"logical_date": None, "note": "make demo",
                               "conf": {"partitions": partitions, "partition_key": partition_key}})
    resp.raise_for_status()
    return resp.json()["dag_run_id"]


def wait(run_id: str, timeout: float, dag_id: str = DAG_ID, every: float = 20.0) -> str:
    """Poll the run until it ends, printing ``make status``'s table to stderr every ``every`` seconds."""
    api = api_from_env()
    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        state = (api.get(f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}") or {}).get("state")
        if state in ("success", "failed"):
            return state
        if time.monotonic() > deadline:
            return f"still {state} after {timeout:.0f}s"
        if time.monotonic() - last > every:
            print(render(collect(api, dag_id, run_id)) + "\n", file=sys.stderr, flush=True)
            last = time.monotonic()
        time.sleep(3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trigger")
    t.add_argument("--partitions", type=int, default=10)
    t.add_argument("--partition-key", default="account")
    w = sub.add_parser("wait")
    w.add_argument("run_id")
    w.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    load_demo_settings()
    if args.command == "trigger":
        print(trigger(args.partitions, args.partition_key))
    else:
        print(wait(args.run_id, args.timeout))


if __name__ == "__main__":
    main()

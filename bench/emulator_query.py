"""Emulator Data Cloud read throughput: ``SELECT * ... ORDER BY "ExternalId__c"`` through query-sql.

Starts an emulator (instant profile by default) over a DMO seeded with ``--rows`` rows, then times, with plain
``requests`` and ``json``, what a reader does:

* ``poll`` (what the official MCP client and the DAG's hook do): POST the query, long-poll the status until
  ``Finished``, then page ``/rows?offset=&rowLimit=&omitSchema=true`` to ``rowCount``;
* ``stream``: page ``/rows`` while the query still runs (rows are readable as soon as they exist), until the
  documented "out of range" answer.

Throughput is rows / wall time from the POST to the last page, execution included. Each run also reports the
emulator's and the client's CPU seconds and the load average, since wall time on a shared machine is noisy.
Prints a summary and writes ``bench/results/emulator_query.json``.

    .venv/bin/python -m bench.emulator_query --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emulator.harness import EmulatorProcess  # noqa: E402

SQL = 'SELECT * FROM "Opportunity_Sync__dlm" ORDER BY "ExternalId__c"'
API = "v63.0"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OrderCheck:
    """Keys must ascend with NULL keys last (PostgreSQL order), across pages."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.seen_null = False

    def feed(self, rows: list[list[Any]]) -> None:
        for row in rows:
            key = row[0]
            if key is None:
                self.seen_null = True
            elif self.seen_null or (self.last is not None and key < self.last):
                raise AssertionError(f"keys out of order at {key!r} (previous {self.last!r})")
            else:
                self.last = key


def run_once(session: requests.Session, base: str, mode: str, page_rows: int) -> dict[str, Any]:
    t0 = time.monotonic()
    c0 = time.process_time()
    resp = session.post(base, params={"dataspace": "default", "workloadName": "bench"},
                        json={"sql": SQL, "rowLimit": page_rows}, timeout=300)
    resp.raise_for_status()
    first = json.loads(resp.content)
    status = first["status"]
    qid = status["queryId"]
    offset = first["returnedRows"]
    order = OrderCheck()
    order.feed(first["data"])
    pages = 1
    nbytes = len(resp.content)
    executed_at = None
    if mode == "poll":
        while status["completionStatus"] not in ("Finished", "ResultsProduced"):
            r = session.get(f"{base}/{qid}", params={"waitTimeMs": 10000}, timeout=300)
            r.raise_for_status()
            status = json.loads(r.content)
        executed_at = time.monotonic() - t0
        total = status["rowCount"]
        while offset < total:
            r = session.get(f"{base}/{qid}/rows", params={"offset": offset, "rowLimit": page_rows,
                                                          "omitSchema": "true"}, timeout=300)
            r.raise_for_status()
            page = json.loads(r.content)
            if not page["returnedRows"]:
                raise AssertionError(f"no rows at offset {offset} of {total}")
            order.feed(page["data"])
            offset += page["returnedRows"]
            pages += 1
            nbytes += len(r.content)
    else:
        while True:
            r = session.get(f"{base}/{qid}/rows", params={"offset": offset, "rowLimit": page_rows,
                                                          "omitSchema": "true"}, timeout=300)
            if r.status_code == 400 and "out of range" in r.text.lower():
                break
            r.raise_for_status()
            page = json.loads(r.content)
            pages += 1
            nbytes += len(r.content)
            if not page["returnedRows"]:
                continue  # the query is still running and had nothing new within the long poll
            order.feed(page["data"])
            offset += page["returnedRows"]
        status = session.get(f"{base}/{qid}", timeout=300).json()
        if offset != status["rowCount"]:
            raise AssertionError(f"read {offset} rows, status says {status['rowCount']}")
    wall = time.monotonic() - t0
    session.delete(f"{base}/{qid}", timeout=60)  # free the result files between runs
    return {"mode": mode, "rows": offset, "pages": pages, "bytes": nbytes, "wall_s": round(wall, 3),
            "executed_s": round(executed_at, 3) if executed_at is not None else None,
            "rows_per_s": round(offset / wall), "client_cpu_s": round(time.process_time() - c0, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode")
    ap.add_argument("--modes", default="poll,stream")
    ap.add_argument("--page-rows", type=int, default=100_000, help="rowLimit per request (the MCP client's value)")
    ap.add_argument("--profile", default="instant")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--data-dir", default=None, help="default: a temporary directory, removed afterwards; an "
                                                     "existing directory seeded with --rows rows is reused")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "emulator_query.json"))
    args = ap.parse_args(argv)
    tmp = None
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp := tempfile.mkdtemp(prefix="emu-query-"))
    runs: list[dict[str, Any]] = []
    try:
        emu = EmulatorProcess(data_dir, profile=args.profile, time_scale=args.time_scale)
        manifest = data_dir / "seed_manifest.json"
        if not (manifest.exists() and json.loads(manifest.read_text()).get("records") == args.rows):
            t = time.monotonic()
            emu.seed(records=args.rows, bad_rows=min(100, args.rows // 1000), random_seed=42)
            print(f"seeded {args.rows:,} rows in {time.monotonic() - t:.1f} s", flush=True)
        with emu:
            session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the emulator's CA
            session.verify = emu.ca_bundle
            session.headers["Authorization"] = f"Bearer {emu.access_token()}"
            base = f"{emu.instance_url}/services/data/{API}/ssot/query-sql"
            pid = emu.proc.pid if emu.proc else os.getpid()
            for _ in range(args.repeat):
                for mode in args.modes.split(","):
                    e0 = cpu_seconds(pid)
                    result = run_once(session, base, mode, args.page_rows)
                    result["emulator_cpu_s"] = round(cpu_seconds(pid) - e0, 3)
                    result["load_average_1m"] = round(os.getloadavg()[0], 2)
                    runs.append(result)
                    print(f"{mode:>6}: {result['rows']:,} rows in {result['wall_s']} s = {result['rows_per_s']:,} "
                          f"rows/s ({result['pages']} pages, {result['bytes'] / 1e6:.0f} MB; executed after "
                          f"{result['executed_s']} s; emulator CPU {result['emulator_cpu_s']} s, client CPU "
                          f"{result['client_cpu_s']} s, load {result['load_average_1m']})", flush=True)
            stats = emu.stats()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    by_mode = {}
    for mode in args.modes.split(","):
        rates = [r["rows_per_s"] for r in runs if r["mode"] == mode]
        by_mode[mode] = {"median_rows_per_s": round(statistics.median(rates)), "best_rows_per_s": max(rates)}
    summary = {
        "benchmark": "emulator_query",
        "sql": SQL,
        "profile": args.profile,
        "rows": args.rows,
        "page_rows": args.page_rows,
        "result": by_mode,
        "runs": runs,
        "emulator_stats": {k: stats.get(k) for k in ("dc_queries", "dc_pages", "dc_rows_served")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for mode, r in by_mode.items():
        print(f"{mode}: median {r['median_rows_per_s']:,} rows/s, best {r['best_rows_per_s']:,} rows/s")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()

"""Emulator ingest throughput: Opportunity upserts on ``ExternalId__c`` with ``Account.ExternalId__c`` parents.

Starts an emulator (instant profile by default), loads Accounts, then runs ``--passes`` rounds of ``--jobs``
concurrent Bulk API 2.0 upsert jobs over plain ``requests`` (create, one PUT, close, poll every 250 ms). The first
pass inserts, later passes update the same keys (the nightly case). Throughput is records / wall time from the first
create to the last ``JobComplete``, uploads included. Prints a summary and writes ``bench/results/emulator_ingest.json``.

    .venv/bin/python -m bench.emulator_ingest --rows 500000 --jobs 8
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emulator.harness import EmulatorProcess  # noqa: E402

STAGES = ("Prospecting", "Qualification", "Needs Analysis", "Value Proposition", "Negotiation/Review", "Closed Won",
          "Closed Lost")
HEADER = ["ExternalId__c", "Name", "StageName", "CloseDate", "Amount", "Probability", "Type", "LeadSource",
          "Description", "Account.ExternalId__c"]


def make_jobs(rows: int, jobs: int, accounts: int, seed: int, pass_no: int) -> list[bytes]:
    """CSV bodies, one per job: rows sorted by Account and each Account's rows in one job (the product's layout)."""
    rng = random.Random(seed)
    account_of = sorted(rng.randrange(1, accounts + 1) for _ in range(rows))
    bodies = []
    per_job = -(-rows // jobs)
    start = 0
    for _ in range(jobs):
        end = min(rows, start + per_job)
        # Move the cut to an Account boundary so no Account spans two jobs.
        while 0 < end < rows and account_of[end] == account_of[end - 1]:
            end += 1
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(HEADER)
        for i in range(start, end):
            acc = account_of[i]
            w.writerow((f"OPP-{i:010d}", f"Deal {i} for account {acc} (pass {pass_no})", STAGES[(i + pass_no) % 7],
                        f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}", f"{(i * 37) % 1_000_000 / 100:.2f}",
                        str((i * 7 + pass_no) % 101), "New Customer", "Web",
                        "Renewal discussed, \"quoted\" notes" if i % 10 == 0 else "", f"ACC-{acc:07d}"))
        bodies.append(buf.getvalue().encode("utf-8"))
        start = end
        if start >= rows:
            break
    return bodies


def run_job(session: requests.Session, base: str, body: bytes, out: dict[str, Any]) -> None:
    r = session.post(f"{base}/jobs/ingest", json={"object": "Opportunity", "operation": "upsert",
                                                  "externalIdFieldName": "ExternalId__c", "lineEnding": "LF"})
    r.raise_for_status()
    job_id = r.json()["id"]
    r = session.put(f"{base}/jobs/ingest/{job_id}/batches", data=body, headers={"Content-Type": "text/csv"})
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
    out["uploaded_at"] = time.monotonic()
    session.patch(f"{base}/jobs/ingest/{job_id}", json={"state": "UploadComplete"}).raise_for_status()
    while True:
        info = session.get(f"{base}/jobs/ingest/{job_id}").json()
        if info["state"] in ("JobComplete", "Failed", "Aborted"):
            break
        time.sleep(0.25)
    out.update(job_id=job_id, state=info["state"], processed=info.get("numberRecordsProcessed", 0),
               failed=info.get("numberRecordsFailed", 0), done_at=time.monotonic())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), to tell emulator cost from machine load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_pass(emu: EmulatorProcess, token: str, bodies: list[bytes]) -> dict[str, Any]:
    base = f"{emu.instance_url}/services/data/v62.0"
    pid = emu.proc.pid if emu.proc else 0
    cpu0 = cpu_seconds(pid)
    results: list[dict[str, Any]] = [{} for _ in bodies]
    threads = []
    t0 = time.monotonic()
    for body, out in zip(bodies, results, strict=True):
        s = requests.Session()
        s.verify = emu.ca_bundle
        s.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise replace the emulator's CA
        s.headers["Authorization"] = f"Bearer {token}"
        t = threading.Thread(target=run_job, args=(s, base, body, out))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    records = sum(r.get("processed", 0) for r in results)
    return {
        "emulator_cpu_s": round(cpu, 3),
        "records_per_emulator_cpu_s": round(records / cpu, 1) if cpu > 0 else None,
        "load_average_1m": os.getloadavg()[0],
        "wall_s": round(wall, 3),
        "upload_s": round(max(r["uploaded_at"] for r in results) - t0, 3),
        "records": records,
        "failed": sum(r.get("failed", 0) for r in results),
        "states": sorted({r.get("state", "?") for r in results}),
        "records_per_s": round(records / wall, 1),
        "bytes": sum(len(b) for b in bodies),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--accounts", type=int, default=None, help="default: rows / 40")
    ap.add_argument("--passes", type=int, default=2, help="1 = inserts only; 2+ = then updates of the same keys")
    ap.add_argument("--profile", default="instant")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--data-dir", default=None, help="default: a temporary directory, removed afterwards")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "emulator_ingest.json"))
    args = ap.parse_args(argv)
    accounts = args.accounts or max(10, args.rows // 40)
    tmp = None
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp := tempfile.mkdtemp(prefix="emu-ingest-"))
    try:
        emu = EmulatorProcess(data_dir, profile=args.profile, time_scale=args.time_scale)
        emu.seed(records=0, accounts=accounts)
        with emu:
            token = emu.access_token()
            passes = []
            for p in range(args.passes):
                bodies = make_jobs(args.rows, args.jobs, accounts, seed=1, pass_no=p)
                result = run_pass(emu, token, bodies)
                result["kind"] = "insert" if p == 0 else "update"
                passes.append(result)
                print(f"pass {p + 1} ({result['kind']}): {result['records']:,} records in {result['wall_s']} s "
                      f"= {result['records_per_s']:,.0f} records/s; emulator CPU {result['emulator_cpu_s']} s "
                      f"= {result['records_per_emulator_cpu_s'] or 0:,.0f} records/CPU-s; load {result['load_average_1m']:.1f} "
                      f"(uploads done after {result['upload_s']} s, "
                      f"{result['failed']} failed, states {result['states']})", flush=True)
            stats = emu.stats()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "benchmark": "emulator_ingest",
        "profile": args.profile,
        "rows_per_pass": args.rows,
        "jobs_per_pass": args.jobs,
        "accounts": accounts,
        "passes": passes,
        "records_per_s_insert": passes[0]["records_per_s"],
        "records_per_s_update": passes[1]["records_per_s"] if len(passes) > 1 else None,
        "emulator_stats": {k: stats.get(k) for k in ("bulk_batches", "bulk_records", "bulk_records_failed",
                                                      "bulk_uploads", "bulk_upload_bytes", "duplicate_uploads")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()

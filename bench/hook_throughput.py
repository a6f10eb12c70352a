"""Throughput and memory of the hooks: Data Cloud → ``stream_rows_to_jobs`` → Bulk API 2.0 upsert, in one process.

For each ``--rows`` size this starts an emulator (``instant`` profile) in a fresh directory, seeds it, then — in
a fresh child process, so that every size reports its own peak RSS — reads the whole DMO in key order through
:class:`DataCloudHook`, streams it into upsert jobs, waits until every job is complete, checks the org's
Opportunity count, and reports records/s and the client's peak RSS. Results go to
``bench/results/hook_throughput.json``.

Run: ``python -m bench.hook_throughput`` (1,000,000 rows) or ``--rows 100000 --rows 1000000``.
The emulator runs in its own process: on a 2-core machine it competes with the client for CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "plugins"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

RESULTS = ROOT / "bench" / "results" / "hook_throughput.json"
MAPPING = {"ExternalId__c": "ExternalId__c", "AccountExternalId__c": "Account.ExternalId__c", "Name__c": "Name",
           "StageName__c": "StageName", "CloseDate__c": "CloseDate", "Amount__c": "Amount",
           "Probability__c": "Probability", "Type__c": "Type", "LeadSource__c": "LeadSource",
           "Description__c": "Description"}


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU of another process (Linux ``/proc``), e.g. the emulator's."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(info: dict[str, Any], rows: int, max_records_per_job: int, page_rows: int, profile: bool,
            order: str = "key", spool_mb: float | None = None) -> dict:
    """The timed part, in the child process: everything the sync's partition task does, for the whole range."""
    os.environ["AIRFLOW_CONN_SALESFORCE_DEFAULT"] = info["airflow_conn"]
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
    from sf_datacloud_sync.utils import transfer
    from sf_datacloud_sync.utils.transfer import stream_rows_to_jobs

    if os.environ.get("BENCH_NO_TRIM"):
        transfer.release_free_heap = lambda: False  # what the transfer did before it trimmed the heap per job

    bulk = SalesforceBulk2Hook()
    datacloud = DataCloudHook(salesforce_hook=bulk)
    bulk.limits()  # log in before the clock starts; the imports are done too
    baseline = current_rss_mb()
    columns = ", ".join(f'"{c}"' for c in MAPPING)
    # "account" groups each Account's Opportunities (Salesforce's advice against parent row-lock contention).
    order_by = '"AccountExternalId__c", "ExternalId__c"' if order == "account" else '"ExternalId__c"'
    sql = f'SELECT {columns} FROM "Opportunity_Sync__dlm" ORDER BY {order_by}'
    key_func = (lambda r: (r[1], r[0])) if order == "account" else (lambda r: r[0])

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    cpu_started = cpu_seconds()
    jobs = []
    rss_by_job: list[float] = []
    with datacloud.query(sql, page_rows=page_rows, convert=False) as result:
        first_row_s = None
        for job in stream_rows_to_jobs(bulk, result, object_name="Opportunity", external_id_field="ExternalId__c",
                                       header=list(MAPPING.values()), column_types=result.types,
                                       key_func=key_func, max_records_per_job=max_records_per_job,
                                       **({} if spool_mb is None else
                                          {"spool_threshold": int(spool_mb * 2**20) if spool_mb > 0 else None})):
            first_row_s = first_row_s or time.perf_counter() - started
            jobs.append(job)
            rss_by_job.append(round(current_rss_mb(), 1))
    streamed_s = time.perf_counter() - started
    waits = [bulk.wait_for_job(j.job_id, timeout=3600, poll_interval=0.2, max_poll_interval=2.0) for j in jobs]
    total_s = time.perf_counter() - started
    cpu_s = cpu_seconds() - cpu_started
    if profiler is not None:
        import pstats

        profiler.disable()
        profiler.dump_stats(Path(tempfile.gettempdir()) / f"hook_throughput_{rows}.pstats")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)

    sent = sum(j.records for j in jobs)
    processed = sum(w.records_processed for w in waits)
    failed = sum(w.records_failed for w in waits)
    in_org = bulk.query_count("SELECT COUNT() FROM Opportunity")
    return {
        "rows": rows,
        "order": order,
        "jobs": len(jobs),
        "records_sent": sent,
        "records_processed": processed,
        "records_failed": failed,
        "opportunities_in_org": in_org,
        "all_jobs_complete": all(w.succeeded for w in waits),
        "count_ok": sent == rows and processed == rows and in_org == rows - failed,
        "upload_bytes": sum(j.nbytes for j in jobs),
        "seconds_to_first_job": round(first_row_s or 0.0, 2),
        "seconds_streaming": round(streamed_s, 2),
        "seconds_total": round(total_s, 2),
        "records_per_s": round(rows / total_s),
        "records_per_s_streaming": round(rows / streamed_s),
        "client_cpu_seconds": round(cpu_s, 2),
        "client_cpu_us_per_record": round(cpu_s / rows * 1e6, 1),
        "rss_after_imports_mb": round(baseline, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_mb_after_each_job": rss_by_job,
    }


def run_size(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Emulator + seed in the parent; the measured client in a child process of its own."""
    from emulator.harness import EmulatorProcess

    data_dir = Path(tempfile.mkdtemp(prefix=f"hook-bench-{rows}-", dir=args.work_dir))
    emulator = EmulatorProcess(data_dir, profile="instant")
    t0 = time.perf_counter()
    emulator.seed(records=rows, random_seed=42)
    seed_s = time.perf_counter() - t0
    child_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}"}
    if args.no_trim:
        child_env["BENCH_NO_TRIM"] = "1"
    if args.malloc_mmap_threshold:
        # glibc raises its mmap threshold after freeing a large block, then keeps later multi-MB page buffers
        # in per-thread heaps: a fixed threshold returns them to the OS (a worker-level setting, not code).
        child_env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    with emulator:
        load_before = os.getloadavg()[0]
        emulator_cpu = process_cpu_seconds(emulator.proc.pid)
        child = subprocess.run(
            [sys.executable, "-m", "bench.hook_throughput", "--child", json.dumps(emulator.info), "--rows", str(rows),
             "--max-records-per-job", str(args.max_records_per_job), "--page-rows", str(args.page_rows),
             "--order", args.order] + (["--spool-mb", str(args.spool_mb)] if args.spool_mb is not None else [])
            + (["--profile"] if args.profile else []),
            cwd=ROOT, capture_output=True, text=True, env=child_env)
        if child.returncode != 0:
            sys.stderr.write(child.stdout[-5000:] + child.stderr[-5000:])
            raise SystemExit(f"benchmark child failed for {rows} rows")
        if args.profile:
            print(child.stdout[:child.stdout.rfind("{")])
        result = json.loads(child.stdout[child.stdout.rfind("\n{") + 1:])
        result["seed_seconds"] = round(seed_s, 1)
        # The emulator's CPU while the client ran (login, query, paging, uploads, job processing, polls).
        emulator_cpu = process_cpu_seconds(emulator.proc.pid) - emulator_cpu
        result["emulator_cpu_seconds"] = round(emulator_cpu, 2)
        result["emulator_cpu_us_per_record"] = round(emulator_cpu / rows * 1e6, 1)
        # Other work on the machine competes for the same cores: keep the 1-minute load next to the figures.
        result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        stats = emulator.stats()
        result["emulator"] = {k: stats.get(k) for k in ("requests_total", "dc_pages", "dc_rows_served",
                                                         "bulk_uploads", "bulk_upload_bytes", "duplicate_uploads")}
    if not args.keep:
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hook_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="rows to seed and move (repeatable)")
    parser.add_argument("--max-records-per-job", type=int, default=50_000)
    parser.add_argument("--page-rows", type=int, default=100_000, help="Data Cloud rowLimit per request")
    parser.add_argument("--order", choices=["key", "account"], default="key",
                        help="row order: by external id, or grouped by Account (fewer parent-lock conflicts)")
    parser.add_argument("--spool-mb", type=float, default=None,
                        help="job CSVs move to a temp file above this size (default: transfer's 1 MiB; 0 = memory)")
    parser.add_argument("--no-trim", action="store_true",
                        help="no malloc_trim after each job (to show what utils.memory.release_free_heap changes)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the client with glibc's MALLOC_MMAP_THRESHOLD_ fixed (e.g. 131072)")
    parser.add_argument("--work-dir", default=None, help="where emulator data directories go (default: tmp)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--keep", action="store_true", help="keep the emulator data directories")
    parser.add_argument("--profile", action="store_true", help="cProfile the client and print the top functions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = args.rows or [1_000_000]

    if args.child:
        result = measure(json.loads(args.child), sizes[0], args.max_records_per_job, args.page_rows, args.profile,
                         args.order, args.spool_mb)
        print("\n" + json.dumps(result))
        return

    results = []
    for rows in sizes:
        print(f"-- {rows:,} rows", flush=True)
        result = run_size(rows, args)
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "hook_throughput",
        "description": "Data Cloud (the connection's query API, v3 by default) -> stream_rows_to_jobs -> Bulk API 2.0 upsert jobs, one client "
                       "process, emulator instant profile; seconds_total runs from query submission until every "
                       "job is JobComplete",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"max_records_per_job": args.max_records_per_job, "page_rows": args.page_rows,
                     "order": args.order, "spool_mb": args.spool_mb,
                     "malloc_mmap_threshold": args.malloc_mmap_threshold,
                     "heap_trimmed_per_job": not args.no_trim},
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The emulator's own cost under the DAG's workload, without Airflow: CPU-seconds, µs per row and peak RSS.

What one run does, in the same order as the real DAG (``dags/datacloud_opportunity_sync.py``):

1. starts an emulator (``instant`` profile) in a temp directory and seeds ``--rows`` rows (not measured);
2. *discover*: the plugin's one-pass boundary query over ``AccountExternalId__c`` (:mod:`sf_datacloud_sync.discover`)
   plans ``--partitions`` account ranges;
3. *load*: ``--partitions`` client processes at once, each doing what ``load_partition`` does for its range —
   ``DataCloudHook.query`` of the partition's ``range_query`` (``/rows`` pages), ``stream_rows_to_jobs`` into
   Bulk API 2.0 upsert jobs of ``--max-records-per-job`` rows with ``Account.ExternalId__c`` lookups, then polling
   every job until it is final (``poll_interval_s`` growing 1.5x, as the trigger does);
4. reports the emulator's CPU-seconds during the load (``/proc/<pid>/stat``; per thread from ``/proc/<pid>/task``,
   named with ``py-spy dump`` when py-spy is installed), µs per row, bytes it read and wrote, its peak RSS
   (``VmHWM``; anonymous and file-backed peaks sampled every 0.2 s, largest mappings at the end), and the load
   average around the run: other work on the machine shares the cores and inflates CPU-seconds, so compare runs
   back to back.

Run: ``python -m bench.emulator_dag_workload --rows 200000`` (add ``--py-spy profile.svg`` to record the emulator,
``--out result.json`` to keep the figures). Nothing here changes the emulator: it is a client like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "plugins"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DMO = "Opportunity_Sync__dlm"
MAPPING = {"ExternalId__c": "ExternalId__c", "AccountExternalId__c": "Account.ExternalId__c", "Name__c": "Name",
           "StageName__c": "StageName", "CloseDate__c": "CloseDate", "Amount__c": "Amount",
           "Probability__c": "Probability", "Type__c": "Type", "LeadSource__c": "LeadSource",
           "Description__c": "Description"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_of_stat(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_cpu(pid: int) -> float:
    return _cpu_of_stat(f"/proc/{pid}/stat")


def process_sys_cpu(pid: int) -> float:
    """The kernel's share of the CPU time (file writes, page faults, TLS sockets)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[12]) / CLK_TCK


def process_io(pid: int) -> dict[str, int]:
    """``/proc/<pid>/io``: bytes read/written through system calls (``rchar``/``wchar``)."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU-seconds by thread id (``/proc/<pid>/task``)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = _cpu_of_stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue  # the thread ended in between
    return out


def thread_names(pid: int) -> dict[str, str]:
    """Python thread names by thread id, from ``py-spy dump`` (Python does not name its OS threads)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return {}
    out = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    names = {}
    for line in out.splitlines():
        if line.startswith("Thread "):
            tid = line.split()[1]
            name = line.split('"')[1] if '"' in line else tid
            # Pool threads share a name prefix: "dc-query_0" -> "dc-query", "AnyIO worker thread" stays.
            names[tid] = name.rstrip("0123456789").rstrip("-_") or name
    return names


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Peaks of the emulator's anonymous and file-backed resident memory (``/proc/<pid>/status``), every 0.2 s.

    ``VmHWM`` only has the total; file-backed pages (SQLite's memory maps of the databases) are page cache that
    every mapping counts again, anonymous ones are the process's own heap."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: Counter[str] = Counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                for key in ("RssAnon", "RssFile", "VmRSS"):
                    self.peaks[key] = max(self.peaks[key], status_kib(self.pid, key))
            except OSError:
                return


def largest_mappings(pid: int, n: int = 6) -> list[str]:
    """The ``n`` mappings with the most resident memory (``/proc/<pid>/smaps``): heap arenas, database maps..."""
    maps: list[tuple[int, str]] = []
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:":
                maps.append((int(head[1]), name))
    merged: Counter[str] = Counter()
    for kib, where in maps:
        merged[where] += kib
    out = [f"{kib / 1024:.0f} MB {where}" for where, kib in merged.most_common(n)]
    anon = sorted((kib for kib, where in maps if where == "[anon]"), reverse=True)
    return out + [f"[anon] mappings: {len(anon)}, largest (MB): {[round(k / 1024) for k in anon[:12]]}"]


def discover(info: dict[str, Any], partitions: int) -> list[dict[str, Any]]:
    """The DAG's discover step: balanced account ranges from the plugin's boundary query."""
    os.environ["AIRFLOW_CONN_SALESFORCE_DEFAULT"] = info["airflow_conn"]
    from sf_datacloud_sync.discover import boundary_query, distribution_from_rows, plan_partitions
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook

    sql, params = boundary_query(dmo=DMO, partition_column="AccountExternalId__c", key_column="ExternalId__c",
                                 partitions=partitions)
    with DataCloudHook().query(sql, params) as result:
        dist = distribution_from_rows(list(result))
    return [p.to_dict() for p in plan_partitions(dist, "account")]


def load_partition(info: dict[str, Any], part: dict[str, Any], max_records_per_job: int, poll_interval: float,
                   max_poll_interval: float) -> dict[str, Any]:
    """One partition, as ``load_partition`` streams and waits (child process)."""
    os.environ["AIRFLOW_CONN_SALESFORCE_DEFAULT"] = info["airflow_conn"]
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook
    from sf_datacloud_sync.utils.partitions import Partition, range_query
    from sf_datacloud_sync.utils.transfer import stream_rows_to_jobs

    partition = Partition.from_dict(part)
    bulk = SalesforceBulk2Hook()
    datacloud = DataCloudHook(salesforce_hook=bulk)
    sql, params = range_query(partition, dmo=DMO, columns=list(MAPPING), key_column="ExternalId__c",
                              account_column="AccountExternalId__c")
    started = time.perf_counter()
    jobs = []
    with datacloud.query(sql, params) as result:
        for job in stream_rows_to_jobs(bulk, result, object_name="Opportunity", external_id_field="ExternalId__c",
                                       header=list(MAPPING.values()), column_types=result.types,
                                       key_func=lambda r: (r[1], r[0]), max_records_per_job=max_records_per_job):
            jobs.append(job)
    streamed = time.perf_counter() - started
    waits = [bulk.wait_for_job(j.job_id, timeout=3600, poll_interval=poll_interval,
                               max_poll_interval=max_poll_interval) for j in jobs]
    return {"index": partition.index, "rows": sum(j.records for j in jobs), "jobs": len(jobs),
            "processed": sum(w.records_processed for w in waits), "failed": sum(w.records_failed for w in waits),
            "complete": all(w.succeeded for w in waits), "seconds_streaming": round(streamed, 2),
            "seconds_total": round(time.perf_counter() - started, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from emulator.harness import EmulatorProcess

    data_dir = Path(tempfile.mkdtemp(prefix=f"emu-dag-{args.rows}-", dir=args.work_dir))
    emulator = EmulatorProcess(data_dir, profile="instant")
    t0 = time.perf_counter()
    emulator.seed(records=args.rows, random_seed=42)
    seed_s = time.perf_counter() - t0
    spy = None
    try:
        with emulator:
            pid = emulator.proc.pid
            info = emulator.info
            load = [os.getloadavg()]
            cpu0 = process_cpu(pid)
            parts = discover(info, args.partitions)
            cpu_discover = process_cpu(pid) - cpu0
            if args.py_spy:
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-o", args.py_spy,
                                        "--pid", str(pid), "-r", "50", "-f", args.py_spy_format, "--threads",
                                        *(["--native"] if args.py_spy_native else [])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                time.sleep(1.0)
            cpu1, sys1, io1, threads0 = process_cpu(pid), process_sys_cpu(pid), process_io(pid), threads_cpu(pid)
            sampler = RssSampler(pid)
            sampler.start()
            started = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}"}
            children = [subprocess.Popen(
                [sys.executable, "-m", "bench.emulator_dag_workload", "--child",
                 json.dumps({"info": info, "part": p, "max_records_per_job": args.max_records_per_job,
                             "poll_interval": args.poll_interval, "max_poll_interval": args.max_poll_interval})],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in parts]
            results = []
            for child in children:
                out, err = child.communicate()
                if child.returncode != 0:
                    sys.stderr.write(err[-5000:])
                    raise SystemExit("a partition client failed")
                results.append(json.loads(out.strip().splitlines()[-1]))
            wall = time.perf_counter() - started
            cpu_load = process_cpu(pid) - cpu1
            sys_load = process_sys_cpu(pid) - sys1
            io2 = process_io(pid)
            names = thread_names(pid)
            threads: Counter[str] = Counter()
            for tid, cpu in threads_cpu(pid).items():
                threads[names.get(tid, "(unnamed)")] += cpu - threads0.get(tid, 0.0)
            threads["(threads that ended)"] = cpu_load - sum(threads.values())
            load.append(os.getloadavg())
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
                spy.wait(timeout=60)
            sampler.stopped.set()
            hwm_mb = status_kib(pid, "VmHWM") / 1024
            rss_mb = status_kib(pid, "VmRSS") / 1024
            mappings = largest_mappings(pid)
            stats = emulator.stats()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    rows = sum(r["rows"] for r in results)
    return {
        "rows_seeded": args.rows,
        "rows_sent": rows,
        "partitions": len(parts),
        "jobs": sum(r["jobs"] for r in results),
        "all_complete": all(r["complete"] for r in results),
        "records_processed": sum(r["processed"] for r in results),
        "records_failed": sum(r["failed"] for r in results),
        "seed_seconds": round(seed_s, 1),
        "wall_seconds": round(wall, 1),
        "emulator_cpu_seconds_discover": round(cpu_discover, 2),
        "emulator_cpu_seconds": round(cpu_load, 2),
        "emulator_cpu_us_per_row": round(cpu_load / max(rows, 1) * 1e6, 1),
        "emulator_system_cpu_seconds": round(sys_load, 2),
        "emulator_mb_written": round((io2["wchar"] - io1["wchar"]) / 1e6, 1),
        "emulator_mb_read": round((io2["rchar"] - io1["rchar"]) / 1e6, 1),
        "emulator_cpu_by_thread": {k: round(v, 2) for k, v in threads.most_common() if v > 0.05},
        "emulator_peak_rss_mb": round(hwm_mb, 1),
        "emulator_rss_end_mb": round(rss_mb, 1),
        "emulator_peak_rss_sampled_mb": {k: round(v / 1024, 1) for k, v in sampler.peaks.items()},
        "emulator_largest_mappings_end": mappings,
        "load_average_1m_before_after": [round(load[0][0], 2), round(load[1][0], 2)],
        "requests": stats.get("requests_total"),
        "requests_by_endpoint": dict(Counter(stats.get("requests") or {}).most_common(8)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator_dag_workload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument("--max-records-per-job", type=int, default=50_000)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--max-poll-interval", type=float, default=10.0)
    parser.add_argument("--py-spy", metavar="FILE", help="record the emulator during the load with py-spy")
    parser.add_argument("--py-spy-format", default="flamegraph", help="flamegraph | raw | speedscope")
    parser.add_argument("--py-spy-native", action="store_true", help="include native frames (SQLite, OpenSSL)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the emulator's data directory")
    parser.add_argument("--out", help="also write the result here (JSON)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(load_partition(spec["info"], spec["part"], spec["max_records_per_job"],
                                        spec["poll_interval"], spec["max_poll_interval"])))
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

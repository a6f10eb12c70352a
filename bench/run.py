"""``make bench``: this package's DAG vs. the design it replaces vs. the plain-library way, same data, same org.

    python -m bench.run [--rows N] [--profile instant realistic] [--time-scale X] [--dequeue-delay S ...]
                        [--contenders dag replaced plain] [--lock-contention R] [--smoke] [--output PATH]

One fresh emulator is seeded with ``--rows`` Data Cloud rows (no bad rows, every row has an external id), then
every *scenario* (a profile; for ``realistic`` one per ``--dequeue-delay``) runs each contender one after the
other. Before each contender the org is reset (``POST /__emulator/reset``: no Opportunities, no jobs, zeroed
counters) and the scenario's profile and faults are applied again. The contenders:

* ``dag``: the real DAG under ``airflow standalone`` (LocalExecutor, parallel partition tasks, deferral in the
  triggerer), default params (``bench.airflow_runner``). With ``--lock-contention`` it runs twice,
  ``partition_key=account`` and ``partition_key=external_id``.
* ``replaced``: the ten-stream, 2,000-rows-per-job design this package replaces (``bench.replaced_design``).
* ``plain``: DMO exported to CSV, then simple-salesforce's ``bulk2.Opportunity.upsert`` (``bench.plain_library``).

All DAG runs happen while Airflow is up; Airflow is stopped before the other contenders run, so that its idle
components do not compete with them for this machine's CPUs.

After each contender, *before* anything else talks to the org, the emulator's counters are read (requests, Bulk
jobs and internal batches, failures by code); then Salesforce's count of Opportunities with an external id is
compared with the DMO's rows (``verified``). With lock contention the failed results of every job are read to count
the rows whose *first* attempt failed on a lock.

Client-side waits (poll intervals, retry backoff) are divided by ``--time-scale`` in the realistic profile, as
the emulator divides its modelled durations, so that ratios hold; the instant profile uses each contender's
shipped defaults. Airflow's own latencies (scheduling, process start) cannot be scaled: at a large time scale they
weigh more than they would at 1:1, which counts *against* the DAG.

Results: ``bench/results/<date>.json`` (appended per run) and the table between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in README.md. ``--smoke`` (20,000 rows, instant, four partitions) writes only to ``--output``
(default: its work directory) and never touches README.md or ``bench/results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "plugins"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench import airflow_runner  # noqa: E402
from bench.common import (  # noqa: E402
    SYNC_CONFIG,
    access_token,
    count_opportunities,
    dmo_counts,
    iter_ingest_jobs,
    lock_failed_keys,
    make_session,
)
from bench.metrics import (  # noqa: E402
    DAILY_BATCH_ALLOCATION,
    floor_seconds,
    load_average,
    process_cpu_s,
    run_child,
    stats_summary,
)
from emulator.harness import EmulatorProcess  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
CONTENDERS = ("dag", "replaced", "plain")
TITLES = {"dag": "this package (DAG, Airflow LocalExecutor)", "dag_external_id": "this package, partition_key=external_id",
          "replaced": "replaced design (10 streams × 2,000-row jobs)", "plain": "simple-salesforce bulk2 upsert of a CSV export"}
REPLACED_POLL_S = 2.0
PLAIN_WAIT_S = 5.0


@dataclass
class Scenario:
    profile: str
    time_scale: float = 1.0
    dequeue_delay_s: float | None = None
    lock_contention: float = 0.0

    @property
    def name(self) -> str:
        if self.profile == "instant":
            out = "instant"
        else:
            out = f"realistic ×{self.time_scale:g}, dequeue {self.dequeue_delay_s:g} s"
        return out + (f", lock contention {self.lock_contention:g}" if self.lock_contention else "")

    @property
    def client_scale(self) -> float:
        """Divisor for client-side waits (poll intervals, backoff): the emulator's, in the realistic profile."""
        return self.time_scale if self.profile == "realistic" else 1.0

    def profile_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.profile, "time_scale": self.time_scale if self.profile == "realistic"
                                else 1.0}
        if self.dequeue_delay_s is not None:
            body["job_dequeue_delay_s"] = self.dequeue_delay_s
        return body


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    emulator: EmulatorProcess | None = None
    conn: dict[str, Any] = field(default_factory=dict)
    dmo: dict[str, int] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""

    # -- org -----------------------------------------------------------------------------------------------------
    def prepare_org(self, scenario: Scenario) -> dict[str, Any]:
        """Empty org, zeroed counters, the scenario's profile and faults; returns the profile in force."""
        emu = self.emulator
        assert emu is not None
        emu.reset()
        profile = emu.control("PUT", "profile", scenario.profile_body())
        if scenario.lock_contention:
            emu.set_faults(lock_contention_rate=scenario.lock_contention)
        else:
            emu.clear_faults()
        emu.control("POST", "stats/reset")
        return profile

    def account_sizes(self) -> dict[str, int]:
        """Opportunities per Account for the largest Accounts (the seed manifest lists them)."""
        manifest = self.workdir / "emulator" / "seed_manifest.json"
        try:
            largest = json.loads(manifest.read_text()).get("largest_accounts") or []
        except (OSError, ValueError):
            return {}
        return {a["external_id"]: int(a["opportunities"]) for a in largest}

    def check_org(self, scenario: Scenario, started_epoch: float) -> dict[str, Any]:
        """Counters first (nothing else has talked to the org since the contender ended), then the checks."""
        assert self.emulator is not None
        stats = stats_summary(self.emulator.stats())
        session = make_session(self.conn)
        token = access_token(session, self.conn)
        in_org = count_opportunities(session, self.conn, token)
        out: dict[str, Any] = {"stats": stats, "opportunities_in_org": in_org,
                               "expected": self.dmo["keyed_rows"], "missing_rows": self.dmo["keyed_rows"] - in_org,
                               "verified": in_org == self.dmo["keyed_rows"]}
        out["org_jobs"] = jobs_timeline(session, self.conn, token, started_epoch)
        if scenario.lock_contention or stats["lock_failures"]:
            accounts: dict[str, int] = {}
            keys, total = lock_failed_keys(session, self.conn, token, by_account=accounts)
            out["lock_failures_first_attempt"] = len(keys)
            out["lock_failures_total"] = total
            top = sorted(accounts.items(), key=lambda kv: -kv[1])
            sizes = self.account_sizes()
            out["lock_failed_accounts"] = {
                "distinct": len(accounts),
                "top": [{"account": a, "failed_rows": n, "opportunities": sizes.get(a)} for a, n in top[:10]],
                # Accounts with more Opportunities than one 10,000-record internal batch span two batches of
                # the same job, which the org runs in parallel: no partitioning can keep them apart.
                "on_accounts_over_10000": sum(n for a, n in top if (sizes.get(a) or 0) > 10_000),
            }
        session.close()
        return out

    # -- contenders --------------------------------------------------------------------------------------------
    def run_children(self, scenario: Scenario, which: list[str]) -> None:
        for name in which:
            profile = self.prepare_org(scenario)
            log = self.workdir / f"{name}-{len(self.results)}.log"
            if name == "replaced":
                module, options = "bench.replaced_design", {"poll_interval": REPLACED_POLL_S / scenario.client_scale}
            else:
                module, options = "bench.plain_library", {"workdir": str(self.workdir),
                                                          "wait": PLAIN_WAIT_S / scenario.client_scale}
            print(f"[bench] {scenario.name}: {name} ...", flush=True)
            before = self._emulator_cpu()
            load0 = load_average()
            started_epoch = time.time()
            child = run_child(module, {"conn": self.conn, "options": options}, log_path=log,
                              timeout=self.args.timeout, cwd=ROOT, nice=self.args.client_nice)
            if child.returncode != 0 or not child.result:
                raise RuntimeError(f"{name} failed (exit {child.returncode}); see {log}")
            check = self.check_org(scenario, started_epoch)
            self.record(scenario, name, profile, {
                **child.result, "client_cpu_s": child.cpu_s, "client_peak_rss_mb": child.peak_rss_mb,
                "cpu_note": "the contender's own process (os.wait4 rusage)", "emulator_cpu_s": self._cpu_delta(before),
                "load_average_1m": [load0, load_average()],
            }, check)

    def run_dags(self, scenarios: list[Scenario]) -> None:
        home = self.workdir / "airflow"
        config_path = self.workdir / "sync_config.yaml"
        shipped = yaml.safe_load(SYNC_CONFIG.read_text())
        config_path.write_text(yaml.safe_dump(shipped))
        stack = airflow_runner.AirflowStack(home=home, conn=self.conn, sync_config=config_path,
                                            nice=self.args.client_nice)
        print("[bench] starting airflow standalone ...", flush=True)
        t0 = time.monotonic()
        try:
            stack.start()
            stack.ensure_pool()
            stack.wait_for_dag()
            print(f"[bench] Airflow up in {time.monotonic() - t0:.0f}s ({stack.api})", flush=True)
            for scenario in scenarios:
                settings = json.loads(json.dumps(shipped))
                scale = scenario.client_scale
                for knob in ("poll_interval_s", "poll_max_interval_s", "transient_backoff_s"):
                    settings["load"][knob] = float(shipped["load"][knob]) / scale
                config_path.write_text(yaml.safe_dump(settings))  # read by each task when it runs
                keys = ["account", "external_id"] if scenario.lock_contention else ["account"]
                for key in keys:
                    conf: dict[str, Any] = dict(self.args.dag_conf)
                    if key != "account":
                        conf["partition_key"] = key
                    name = "dag" if key == "account" else "dag_external_id"
                    profile = self.prepare_org(scenario)
                    print(f"[bench] {scenario.name}: {name} (conf {conf or 'defaults'}) ...", flush=True)
                    before = self._emulator_cpu()
                    load0 = load_average()
                    started_epoch = time.time()
                    result = airflow_runner.run_dag(stack, conf, timeout=self.args.timeout, label=name)
                    check = self.check_org(scenario, started_epoch)
                    result.update({
                        "client_cpu_s": result["partition_task_cpu_s"],
                        "client_peak_rss_mb": result["partition_task_peak_rss_mb"],
                        "cpu_note": "load_partition task processes (psutil over the standalone tree); "
                                    "airflow_cpu_s = every Airflow process during the run",
                        "emulator_cpu_s": self._cpu_delta(before), "load_average_1m": [load0, load_average()],
                        "client_settings": {k: settings["load"][k] for k in ("poll_interval_s", "poll_max_interval_s",
                                                                            "transient_backoff_s")},
                    })
                    self.record(scenario, name, profile, result, check)
                    if result["state"] != "success":
                        print(f"[bench] WARNING: DAG run ended {result['state']}; see {home}/logs", flush=True)
        finally:
            print("[bench] stopping Airflow ...", flush=True)
            t0 = time.monotonic()
            stack.stop()
            print(f"[bench] Airflow stopped in {time.monotonic() - t0:.0f}s", flush=True)

    def _emulator_cpu(self) -> float | None:
        assert self.emulator is not None and self.emulator.proc is not None
        return process_cpu_s(self.emulator.proc.pid)

    def _cpu_delta(self, before: float | None) -> float | None:
        after = self._emulator_cpu()
        return None if before is None or after is None else round(after - before, 2)

    # -- results -------------------------------------------------------------------------------------------------
    def record(self, scenario: Scenario, name: str, profile: dict[str, Any], result: dict[str, Any],
               check: dict[str, Any]) -> None:
        rows = self.dmo["keyed_rows"]
        stats = check["stats"]
        wall = float(result["wall_s"])
        floor = floor_seconds(rows, threads=int(profile.get("org_worker_threads") or 15))
        entry = {
            "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command,
            "scenario": scenario.name,
            "profile": scenario.profile,
            "time_scale": scenario.time_scale if scenario.profile == "realistic" else None,
            "dequeue_delay_s": scenario.dequeue_delay_s,
            "lock_contention": scenario.lock_contention,
            "contender": name,
            "title": TITLES[name],
            "rows": rows,
            "wall_s": wall,
            "records_per_s": round(rows / wall, 1) if wall else None,
            "api_requests": stats["requests_total"],
            "api_requests_per_million_rows": round(stats["requests_total"] * 1_000_000 / rows, 1),
            "bulk_jobs": stats["bulk_jobs"],
            "bulk_batches": stats["bulk_batches"],
            "bulk_batches_vs_minimum": round(stats["bulk_batches"] / math.ceil(rows / 10_000), 3),
            "bulk_batches_share_of_daily_allocation": round(stats["bulk_batches"] / DAILY_BATCH_ALLOCATION, 4),
            "bulk_batch_retries": stats["bulk_batch_retries"],
            "lock_failures": stats["lock_failures"],
            "lock_failures_first_attempt": check.get("lock_failures_first_attempt"),
            "lock_failed_accounts": check.get("lock_failed_accounts"),
            "retried_rows": result.get("retried_rows", 0),
            "task_retries": result.get("task_retries"),
            "wall_s_without_retry_wait": result.get("wall_s_without_retry_wait"),
            "failed_rows_reported": result.get("failed_rows"),
            "missing_rows": check["missing_rows"],
            "verified": check["verified"],
            "opportunities_in_org": check["opportunities_in_org"],
            "client_cpu_s": result.get("client_cpu_s"),
            "client_peak_rss_mb": result.get("client_peak_rss_mb"),
            "airflow_cpu_s": result.get("airflow_cpu_s"),
            "emulator_cpu_s": result.get("emulator_cpu_s"),
            "load_average_1m": result.get("load_average_1m"),
            # When the org had finished the last job, seconds after the contender started (job systemModstamp,
            # whole seconds): wall_s minus this is the time spent noticing it and wrapping up.
            "org_done_at_s": check["org_jobs"].get("last_done_at_s"),
        }
        if scenario.profile == "realistic":
            floor_wall = floor["waves_s"] / scenario.time_scale
            entry.update({"floor": floor, "floor_wall_s": round(floor_wall, 2),
                          "ratio_to_floor": round(wall / floor_wall, 2),
                          "modelled_s": round(wall * scenario.time_scale, 1)})
        entry["details"] = {"result": result, "stats": stats, "profile": profile}
        self.results.append(entry)
        ok = "verified" if entry["verified"] else f"NOT VERIFIED: {entry['missing_rows']} rows missing"
        print(f"[bench]   {name}: {wall:.1f}s, {entry['records_per_s']} rec/s, {entry['api_requests']} requests, "
              f"{entry['bulk_batches']} batches, {entry['bulk_jobs']} jobs, locks {entry['lock_failures']}, "
              f"cpu {entry['client_cpu_s']}s, rss {entry['client_peak_rss_mb']} MB -- {ok}", flush=True)


def jobs_timeline(session: Any, conn: dict[str, Any], token: str, started_epoch: float) -> dict[str, Any]:
    """States of the org's ingest jobs and when the first was created / the last one changed (finished)."""
    states: dict[str, int] = {}
    first = last = None
    for job in iter_ingest_jobs(session, conn, token):
        states[job.get("state", "?")] = states.get(job.get("state", "?"), 0) + 1
        created = _sf_epoch(job.get("createdDate"))
        modified = _sf_epoch(job.get("systemModstamp"))
        first = created if first is None or (created is not None and created < first) else first
        last = modified if last is None or (modified is not None and modified > last) else last
    return {"jobs": sum(states.values()), "states": states,
            "first_created_at_s": None if first is None else round(first - started_epoch, 1),
            "last_done_at_s": None if last is None else round(last - started_epoch, 1)}


def _sf_epoch(text: str | None) -> float | None:
    """``2026-11-28T20:43:29.000+0000`` -> epoch seconds."""
    if not text:
        return None
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def scenarios_from(args: argparse.Namespace) -> list[Scenario]:
    out = []
    for profile in args.profile:
        if profile == "instant":
            out.append(Scenario("instant", 1.0, None, args.lock_contention))
        else:
            for delay in args.dequeue_delay:
                out.append(Scenario("realistic", args.time_scale, delay, args.lock_contention))
    return out


def seed_emulator(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Seed ``data_dir``; with ``--reuse-seed`` copy a cached seed of the same size (seeding 2M rows takes ~40 s)."""
    emu = EmulatorProcess(data_dir)
    started = time.monotonic()
    cache = ROOT / ".bench" / "cache" / f"seed-{args.rows}-{args.random_seed}"
    if args.reuse_seed and (cache / "seed_manifest.json").exists():
        shutil.copytree(cache, data_dir, dirs_exist_ok=True)
        how = f"copied from {cache}"
    else:
        emu.seed(args.rows, random_seed=args.random_seed, bad_rows=0)
        how = "seeded"
        if args.reuse_seed:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(data_dir, cache)
    return {"how": how, "seconds": round(time.monotonic() - started, 1)}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


CODE_DIRS = ("dags", "plugins", "include", "emulator", "bench")


def code_version() -> dict[str, Any]:
    """Which code a run measured: the git commit where there is one (``dirty`` if the tree differs from it), and a
    digest of the Python and YAML sources under :data:`CODE_DIRS`, which also tells runs from a copied tree apart."""
    digest = hashlib.sha256()
    for path in sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*")
                       if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts and p.is_file()):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    out: dict[str, Any] = {"sources_sha256": digest.hexdigest()[:16], "commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.strip()
        out["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", *CODE_DIRS], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout (a copied tree): the digest still identifies the code
    return out


# -- output --------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(entries: list[dict[str, Any]], source: str) -> str:
    """One table per (rows, scenario), contenders in the order measured; raw figures are in ``source``."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in entries:
        groups.setdefault((r["rows"], r["scenario"]), []).append(r)
    lines: list[str] = []
    for (n, scenario), rows in groups.items():
        ours = next((r for r in rows if r["contender"] == "dag"), None)
        floor = rows[0].get("floor")
        lines.append(f"**{n:,} rows, {scenario}**" + (
            f" — floor: {floor['batches']} batches / {floor['threads']} threads × 36 s = {floor['waves_s']:,.0f} s "
            f"modelled = {rows[0]['floor_wall_s']:,.1f} s wall" if floor else ""))
        lines.append("")
        head = ["contender", "wall s", "rows/s", "vs DAG"]
        if floor:
            head += ["× floor"]
        head += ["API requests (per 1M rows)", "Bulk batches", "jobs", "lock failures: first attempt / all",
                 "rows re-sent", "rows not in org", "client CPU s", "peak RSS MB", "emulator CPU s", "load avg"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            vs = f"{r['wall_s'] / ours['wall_s']:.2f}×" if ours and ours["wall_s"] else "–"
            wall = _fmt(r["wall_s"])
            if r.get("task_retries"):
                wall += f" ({_fmt(r['wall_s_without_retry_wait'])} without the retry wait†)"
            cells = [r["title"], wall, _fmt(r["records_per_s"], 0), vs]
            if floor:
                cells.append(f"{r['ratio_to_floor']:.2f}")
            locks = (f"{_fmt(r['lock_failures_first_attempt'])} / {_fmt(r['lock_failures'])}"
                     if r.get("lock_failures_first_attempt") is not None else _fmt(r["lock_failures"]))
            missing = "0 ✓" if r["verified"] else f"**{_fmt(r['missing_rows'])}**"
            cells += [f"{_fmt(r['api_requests'])} ({_fmt(r['api_requests_per_million_rows'], 0)})",
                      _fmt(r["bulk_batches"]), _fmt(r["bulk_jobs"]), locks,
                      _fmt(r["retried_rows"]) + (f" (+{r['task_retries']} task retries)" if r.get("task_retries")
                                                 else ""), missing,
                      _fmt(r["client_cpu_s"]), _fmt(r["client_peak_rss_mb"], 0), _fmt(r.get("emulator_cpu_s")),
                      "→".join(f"{x:.1f}" for x in r["load_average_1m"] or [])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        when = sorted({(r.get("measured_at") or "?")[:16] for r in rows})
        lines.append(f"<sub>measured {', '.join(when)} UTC; `{rows[-1].get('command') or ''}`</sub>")
        lines.append("")
    if any(r.get("task_retries") for r in entries):
        lines.append("† An Airflow task retry (try > 1) and its `retry_delay` wait are in the measured time. On "
                     "Airflow 3.3.2 the LocalExecutor can fail a deferred task that resumes before the scheduler has "
                     "processed its defer-exit event (apache/airflow#72716, fix pending); the partition's ledger "
                     "makes the retry re-send nothing. The figure in brackets subtracts the longest retry wait.")
        lines.append("")
    lines.append("Machine: 2 CPUs shared with other work (load average before → after each run in the last column). "
                 "Client CPU/RSS: the DAG's `load_partition` task processes (sum of CPU, largest peak RSS); the "
                 "others: their own process. Requests, batches, jobs and lock failures are the emulator's counters; "
                 "\"rows not in org\" compares Salesforce's count of Opportunities with an external id with the "
                 "DMO's rows after each run. Realistic times are wall-clock at the stated time scale (modelled "
                 "time = wall × scale); client poll intervals are scaled the same way. Raw figures: "
                 f"`{source}`; method: `bench/README.md`.")
    return "\n".join(lines)


def collect_entries(output: Path) -> list[dict[str, Any]]:
    """The newest measurement of each (rows, scenario, contender) in a results file (smoke runs excluded)."""
    runs = json.loads(output.read_text()).get("runs", [])
    latest: dict[tuple[int, str, str], dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: r.get("measured_at") or ""):
        if run.get("smoke"):
            continue
        for r in run.get("results") or []:
            r.setdefault("measured_at", run.get("measured_at"))
            r.setdefault("command", "python -m bench.run " + " ".join(run.get("argv") or []))
            latest.pop((r["rows"], r["scenario"], r["contender"]), None)
            latest[(r["rows"], r["scenario"], r["contender"])] = r
    order = {"dag": 0, "dag_external_id": 1, "replaced": 2, "plain": 3}
    return sorted(latest.values(), key=lambda r: (r["profile"] != "instant", r["rows"], r["scenario"],
                                                  order.get(r["contender"], 9)))


def write_readme(entries: list[dict[str, Any]], source: str) -> None:
    """Replace the text between the bench markers; add a ``## Benchmarks`` section with them if missing."""
    body = render_markdown(entries, source)
    block = f"{START}\n{body}\n{END}"
    text = README.read_text() if README.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Benchmarks\n\n" + block + "\n"
    README.write_text(text)


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save(run: dict[str, Any], output: Path) -> None:
    """Append this run to ``output`` (a JSON file holding ``{"runs": [...]}``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    data = {"runs": []}
    if output.exists():
        try:
            data = json.loads(output.read_text())
        except ValueError:
            pass
    data.setdefault("runs", []).append(run)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(output)


# -- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="rows to seed (default 2,000,000; smoke 20,000)")
    p.add_argument("--profile", nargs="+", choices=["instant", "realistic"], default=None,
                   help="profiles to run (default: instant)")
    p.add_argument("--time-scale", type=float, default=20.0, help="realistic profile: divide every modelled "
                   "duration (and the clients' waits) by this (default 20)")
    p.add_argument("--dequeue-delay", type=float, nargs="+", default=[2.0],
                   help="realistic profile: job_dequeue_delay_s values, one scenario each (default 2)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--lock-contention", type=float, default=0.0,
                   help="set_faults(lock_contention_rate=R); the DAG then also runs with partition_key=external_id")
    p.add_argument("--partitions", type=int, default=None, help="DAG param 'partitions' (default: the DAG's)")
    p.add_argument("--partitions-per-task", type=int, default=None,
                   help="DAG param 'partitions_per_task' (default: the DAG's)")
    p.add_argument("--smoke", action="store_true", help="20,000 rows, instant, 4 partitions; writes only --output")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default bench/results/<date>.json)")
    p.add_argument("--no-readme", action="store_true", help="do not update README.md")
    p.add_argument("--render-readme", action="store_true",
                   help="only rewrite README.md's bench block from --output (default: today's results file)")
    p.add_argument("--workdir", type=Path, default=None, help="default: .bench/<timestamp>")
    p.add_argument("--keep", action="store_true", help="keep the work directory (emulator data, Airflow home)")
    p.add_argument("--reuse-seed", action="store_true", help="copy a cached seed of the same size if there is one")
    p.add_argument("--random-seed", type=int, default=42)
    p.add_argument("--client-nice", type=int, default=10,
                   help="run every contender (Airflow included) at this nice level, so that the emulator -- the "
                        "org, which in production has its own machines -- is not starved by the client (default 10; "
                        "0 = same priority)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per contender run")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows = args.rows or 20_000
        args.profile = args.profile or ["instant"]
        args.partitions = args.partitions or 4
        args.no_readme = True
    args.rows = args.rows or 2_000_000
    args.profile = args.profile or ["instant"]
    args.dag_conf = {"partitions": args.partitions} if args.partitions else {}
    if args.partitions_per_task:
        args.dag_conf["partitions_per_task"] = args.partitions_per_task
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds the stack: the finally blocks stop Airflow and the emulator and save what was measured.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    if args.render_readme:
        source = args.output or RESULTS_DIR / f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d')}.json"
        write_readme(collect_entries(source), _rel(source))
        print(f"[bench] README.md bench block rendered from {source}")
        return 0
    argv_text = list(sys.argv[1:] if argv is None else argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = (args.workdir or (ROOT / ".bench" / stamp)).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    output = args.output or (workdir / "smoke.json" if args.smoke else
                             RESULTS_DIR / f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d')}.json")
    bench = Bench(args=args, workdir=workdir, command="python -m bench.run " + " ".join(argv_text))
    started = time.monotonic()
    run: dict[str, Any] = {"measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "argv": argv_text,
                           "machine": machine(), "code": code_version(), "rows": args.rows, "smoke": args.smoke}
    ok = False
    try:
        print(f"[bench] work directory {workdir}; seeding {args.rows:,} rows ...", flush=True)
        run["seed"] = seed_emulator(args, workdir / "emulator")
        bench.emulator = EmulatorProcess(workdir / "emulator").start()
        bench.conn = dict(bench.emulator.info)
        session = make_session(bench.conn)
        bench.dmo = dmo_counts(session, bench.conn, access_token(session, bench.conn))
        session.close()
        if bench.dmo["keyed_rows"] != args.rows:
            raise RuntimeError(f"the DMO holds {bench.dmo} rows, expected {args.rows} with external ids")
        scenarios = scenarios_from(args)
        run["scenarios"] = [s.name for s in scenarios]
        if "dag" in args.contenders:
            bench.run_dags(scenarios)
        others = [c for c in ("replaced", "plain") if c in args.contenders]
        for scenario in scenarios:
            bench.run_children(scenario, others)
        ok = True
    except BaseException:
        run["error"] = traceback.format_exc()
        raise
    finally:
        if bench.emulator is not None:
            bench.emulator.stop()
        run["results"] = bench.results
        run["total_s"] = round(time.monotonic() - started, 1)
        run["results_file"] = _rel(output)
        if bench.results:
            save(run, output)
            print(f"[bench] results: {output}", flush=True)
            if ok and not args.no_readme:
                write_readme(collect_entries(output), run["results_file"])
                print("[bench] README.md updated between the bench markers", flush=True)
            print("\n" + render_markdown(bench.results, run["results_file"]), flush=True)
        if ok and not args.keep:
            shutil.rmtree(workdir / "emulator", ignore_errors=True)
            shutil.rmtree(workdir / "airflow", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

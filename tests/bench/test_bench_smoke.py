"""``python -m bench.run --smoke``: all three contenders on 20,000 rows end fully upserted, with every metric.

Runs the real thing -- a seeded emulator, ``airflow standalone`` with the DAG, the replaced design and the plain
library -- in a temporary directory, as a subprocess (Airflow must not share this test process's configuration).
The results go to a temporary file: the smoke never writes README.md or ``bench/results``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CONTENDERS = {"dag", "replaced", "plain"}
METRICS = ("wall_s", "records_per_s", "api_requests", "api_requests_per_million_rows", "bulk_jobs", "bulk_batches",
           "lock_failures", "retried_rows", "missing_rows", "verified", "client_cpu_s", "client_peak_rss_mb",
           "emulator_cpu_s", "load_average_1m")


def test_smoke_all_contenders_fully_upserted(tmp_path: Path) -> None:
    output = tmp_path / "smoke.json"
    readme = ROOT / "README.md"
    readme_before = readme.read_text() if readme.exists() else None
    results_before = sorted(p.name for p in (ROOT / "bench" / "results").glob("*"))
    # A clean environment for Airflow: the test session's own AIRFLOW_* settings must not leak into it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--output", str(output),
                           "--workdir", str(tmp_path / "work"), "--timeout", "600"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    runs = json.loads(output.read_text())["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["smoke"] is True and run["rows"] == 20_000 and "error" not in run
    assert len(run["code"]["sources_sha256"]) == 16 and len(run["code"]["commit"] or "") in (0, 40)
    results = run["results"]
    assert {r["contender"] for r in results} == CONTENDERS
    for r in results:
        missing = [m for m in METRICS if r.get(m) is None]
        assert not missing, f"{r['contender']} lacks {missing}"
        assert r["verified"], f"{r['contender']}: {r['missing_rows']} rows not in the org"
        assert r["opportunities_in_org"] == 20_000 and r["missing_rows"] == 0
        assert r["wall_s"] > 0 and r["api_requests"] > 0 and r["bulk_jobs"] > 0 and r["bulk_batches"] >= 2
        assert r["client_cpu_s"] > 0 and r["client_peak_rss_mb"] > 0
    dag = next(r for r in results if r["contender"] == "dag")
    assert dag["details"]["result"]["state"] == "success"
    assert dag["details"]["result"]["partitions"] == 1  # 4 partitions in one task (partitions_per_task 5)
    assert dag["details"]["result"]["upserted"] == 20_000
    replaced = next(r for r in results if r["contender"] == "replaced")
    assert replaced["bulk_jobs"] == 10  # 20,000 rows in 2,000-row jobs

    # The smoke never writes the README or the results directory.
    assert (readme.read_text() if readme.exists() else None) == readme_before
    assert sorted(p.name for p in (ROOT / "bench" / "results").glob("*")) == results_before

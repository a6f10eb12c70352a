"""The obvious alternative: export the DMO to one CSV, then ``sf.bulk2.Opportunity.upsert(csv_file=...)``.

What a user following simple-salesforce's documentation writes:

1. **Export.** ``SELECT <mapped columns> FROM "Opportunity_Sync__dlm"`` through the Data Cloud Query Connect API
   (``/ssot/query-sql``: submit, wait until ``Finished``, page ``/rows``) into a CSV file whose header is the
   Salesforce field names. Counted in the wall time.
2. **Load.** ``Salesforce(instance_url=..., session_id=..., session=<requests.Session trusting the org's CA>)``,
   then ``sf.bulk2.Opportunity.upsert(csv_file=path, external_id_field="ExternalId__c", line_ending=CRLF)``. The
   library splits the file at ~99 MiB into jobs and runs them one after the other (create, upload, close, poll
   every ``wait`` s). ``line_ending=CRLF`` is the one departure from the documented call: the library re-writes
   each chunk with Python's csv writer, which with its default LF leaves values holding a bare CR unquoted, and
   the org splits those rows (the seed has some: 16 of 20,000 rows were lost that way in a trial run). And for
   exports over ~100 MB, ``batch_size`` (see :func:`run`): the library's own byte estimate lets chunks grow past
   the 100 MB upload limit.

Nothing is retried. If a job ends ``Failed`` the library raises and the rest of the file is never sent; those
rows are counted as failed (the orchestrator checks Salesforce's count either way).

Run by :mod:`bench.run` in a child process (``--child``) so that its CPU and peak memory are its own.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import QuerySql, access_token, child_main, make_session, quote_ident, sync_settings, write_csv

DEFAULT_WAIT_S = 5.0  # simple-salesforce's default poll interval
JOB_BYTES = 90_000_000


def export_csv(conn: dict[str, Any], token: str, path: Path) -> int:
    cfg = sync_settings()
    columns = list(cfg["mapping"])
    header = [cfg["mapping"][c] for c in columns]
    session = make_session(conn)
    q = QuerySql(session, conn, token, workload="plain-export")
    sql = f"SELECT {', '.join(quote_ident(c) for c in columns)} FROM {quote_ident(cfg['source']['dmo'])}"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        n = write_csv(q.rows(sql), header, fh)
    session.close()
    return n


def run(conn: dict[str, Any], *, workdir: str, wait: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    from simple_salesforce import Salesforce
    from simple_salesforce.bulk2 import LineEnding

    cfg = sync_settings()
    started = time.monotonic()
    session = make_session(conn)
    token = access_token(session, conn)
    path = Path(workdir) / "dmo_export.csv"
    rows = export_csv(conn, token, path)
    exported = time.monotonic() - started
    size = path.stat().st_size
    # simple-salesforce splits at "100 MiB - 1 MiB" but counts a row's bytes without quotes and line endings, so
    # its chunks of a large export come out above 100 MiB once re-written and it refuses to upload them
    # ("Data size 104960796 exceeds the max file size accepted by Bulk V2 (100 MB)" at 2M rows). The fix a user
    # finds: ``batch_size`` -- rows per job such that each job holds at most ~90 MB.
    jobs_needed = max(1, math.ceil(size / JOB_BYTES))
    batch_size = math.ceil(rows / jobs_needed) if jobs_needed > 1 else None
    sf = Salesforce(instance_url=conn["instance_url"], session_id=token, session=session,
                    version=str(conn["api_version"]))
    error = None
    jobs: list[dict[str, Any]] = []
    try:
        jobs = sf.bulk2.Opportunity.upsert(csv_file=str(path), external_id_field=cfg["target"]["external_id_field"],
                                           line_ending=LineEnding.CRLF, batch_size=batch_size, wait=wait)
    except Exception as exc:  # a Failed job or a refused upload: the library gives up on the rest of the file
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
    wall = time.monotonic() - started
    processed = sum(int(j.get("numberRecordsProcessed") or 0) for j in jobs)
    failed = sum(int(j.get("numberRecordsFailed") or 0) for j in jobs)
    path.unlink(missing_ok=True)
    return {
        "contender": "plain_library",
        "wall_s": round(wall, 2),
        "export_s": round(exported, 2),
        "load_s": round(wall - exported, 2),
        "rows_read": rows,
        "csv_bytes": size,
        "jobs": len(jobs),
        "job_results": jobs,
        "processed": processed,
        "upserted": processed - failed,
        "failed_rows": rows - (processed - failed),
        "error": error,
        "settings": {"wait_s": wait, "batch_size": batch_size},
    }


def main(argv: list[str]) -> None:
    """``python -m bench.plain_library --child OUT.json`` with ``{"conn": ..., "options": ...}`` on stdin."""
    child_main("bench.plain_library", run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

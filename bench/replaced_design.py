"""The design this package replaces, reproduced in Python: ten self-chaining streams of 2,000-row Bulk jobs.

The original (Apex, ``DynamicPartitionProcessor`` + ``start_dynamic_partitioning.apex``) ran every night:

1. **Discovery.** ``MIN``/``MAX`` of the external id from Data Cloud, then nine keys sampled at 10 %, 20 %, ...
   90 % of the rows (``ORDER BY key LIMIT 1 OFFSET i·N/10``): boundaries = min, nine samples, max -> ten ranges.
2. **Ten streams in parallel** (one Apex batch chain each). Each step reads the next 2,000 rows of its range from
   Data Cloud (``WHERE key >= lo AND key < hi ORDER BY key LIMIT 2000 OFFSET n`` -- one query per step), writes
   them as CSV, creates a Bulk API 2.0 upsert job, uploads, closes it, waits until the job is complete, and only
   then starts the next step. A stream ends when its query returns no rows.

Reproduced faithfully except: ranges are half-open (the Apex ``<=`` sent each boundary row twice), every column of
the package's mapping is sent (same data as the other contenders), the CSV goes out with CRLF line endings so that
values holding a bare CR are quoted (the Apex escaper quoted only ``,`` ``"`` and LF, and the org would split such
a row -- the seed has some; fixed so that the comparison is about speed), and the wait for completion polls every
``poll_interval`` seconds (the Apex chain's next step started after a scheduling delay instead). Nothing is retried:
rows that fail stay failed, and are counted.

Run by :mod:`bench.run` in a child process (``--child``) so that its CPU and peak memory are its own.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import (
    QuerySql,
    access_token,
    child_main,
    data_url,
    make_session,
    quote_ident,
    sql_literal,
    sync_settings,
    write_csv,
)

STREAMS = 10
RECORDS_PER_JOB = 2_000
POLL_INTERVAL_S = 2.0  # ≈ 1 s average lag detecting completion, as in timing_model.md §4 (B)
TERMINAL = ("JobComplete", "Failed", "Aborted")


@dataclass
class StreamResult:
    index: int
    lower: str
    upper: str | None
    rows: int = 0
    jobs: int = 0
    processed: int = 0
    upserted: int = 0
    failed: int = 0
    failed_jobs: list[str] = field(default_factory=list)
    seconds: float = 0.0


def boundaries(q: QuerySql, dmo: str, key: str, streams: int) -> tuple[list[str], int]:
    """min, the keys at 1/streams ... (streams-1)/streams of the rows, max (deduplicated, in order)."""
    k = quote_ident(key)
    n, lo, hi = q.scalar_row(f"SELECT COUNT({k}), MIN({k}), MAX({k}) FROM {quote_ident(dmo)}")
    n = int(n)
    points = [lo]
    for i in range(1, streams):
        (sample,) = q.scalar_row(f"SELECT {k} FROM {quote_ident(dmo)} WHERE {k} IS NOT NULL ORDER BY {k} "
                                 f"LIMIT 1 OFFSET {i * n // streams}")
        points.append(sample)
    points.append(hi)
    out: list[str] = []
    for p in points:
        if p is not None and (not out or p > out[-1]):
            out.append(p)
    return out, n


def run_stream(conn: dict[str, Any], token: str, s: StreamResult, *, dmo: str, key: str, columns: list[str],
               header: list[str], ext_field: str, records_per_job: int, poll_interval: float,
               stop: threading.Event) -> StreamResult:
    """One Apex chain: query 2,000 rows, one job for them, wait until it is complete, repeat."""
    started = time.monotonic()
    session = make_session(conn)
    q = QuerySql(session, conn, token, workload="replaced-design")
    auth = {"Authorization": f"Bearer {token}"}
    base = f"{data_url(conn)}/jobs/ingest"
    k = quote_ident(key)
    where = f"{k} >= {sql_literal(s.lower)}" + (f" AND {k} < {sql_literal(s.upper)}" if s.upper is not None else "")
    select = ", ".join(quote_ident(c) for c in columns)
    offset = 0
    while not stop.is_set():
        rows = list(q.rows(f"SELECT {select} FROM {quote_ident(dmo)} WHERE {where} ORDER BY {k} "
                           f"LIMIT {records_per_job} OFFSET {offset}"))
        if not rows:
            break
        buf = io.StringIO()
        write_csv(rows, header, buf)
        resp = session.post(base, json={"object": "Opportunity", "externalIdFieldName": ext_field,
                                        "contentType": "CSV", "operation": "upsert", "lineEnding": "CRLF"},
                            headers=auth, timeout=120)
        resp.raise_for_status()
        job_id = resp.json()["id"]
        resp = session.put(f"{base}/{job_id}/batches", data=buf.getvalue().encode("utf-8"),
                           headers={**auth, "Content-Type": "text/csv"}, timeout=120)
        resp.raise_for_status()
        resp = session.patch(f"{base}/{job_id}", json={"state": "UploadComplete"}, headers=auth, timeout=120)
        resp.raise_for_status()
        s.jobs += 1
        while True:
            time.sleep(poll_interval)
            resp = session.get(f"{base}/{job_id}", headers=auth, timeout=120)
            resp.raise_for_status()
            info = resp.json()
            if info.get("state") in TERMINAL:
                break
        processed = int(info.get("numberRecordsProcessed") or 0)
        failed = int(info.get("numberRecordsFailed") or 0)
        s.processed += processed
        s.upserted += processed - failed
        s.failed += failed + (len(rows) - processed)  # rows a Failed/Aborted job never processed failed too
        if info.get("state") != "JobComplete":
            s.failed_jobs.append(f"{job_id}: {info.get('state')} {info.get('errorMessage') or ''}".strip())
        s.rows += len(rows)
        offset += len(rows)
    session.close()
    s.seconds = round(time.monotonic() - started, 2)
    return s


def run(conn: dict[str, Any], *, streams: int = STREAMS, records_per_job: int = RECORDS_PER_JOB,
        poll_interval: float = POLL_INTERVAL_S) -> dict[str, Any]:
    """The whole nightly run; returns rows read, jobs, processed/failed counts and per-stream figures."""
    cfg = sync_settings()
    dmo, key = cfg["source"]["dmo"], cfg["source"]["key_column"]
    columns = list(cfg["mapping"])
    header = [cfg["mapping"][c] for c in columns]
    ext_field = cfg["target"]["external_id_field"]
    started = time.monotonic()
    session = make_session(conn)
    token = access_token(session, conn)
    points, keyed = boundaries(QuerySql(session, conn, token, workload="replaced-design"), dmo, key, streams)
    discovered = time.monotonic() - started
    # Ranges [b0, b1), [b1, b2), ... and the last one open-ended (>= its lower bound, i.e. up to and with max).
    ranges = [StreamResult(i, points[i], points[i + 1] if i + 2 < len(points) else None)
              for i in range(max(1, len(points) - 1))]
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="stream") as pool:
        futures = [pool.submit(run_stream, conn, token, s, dmo=dmo, key=key, columns=columns, header=header,
                               ext_field=ext_field, records_per_job=records_per_job, poll_interval=poll_interval,
                               stop=stop) for s in ranges]
        try:
            results = [f.result() for f in futures]
        except BaseException:
            stop.set()
            raise
    wall = time.monotonic() - started
    rows = sum(s.rows for s in results)
    return {
        "contender": "replaced_design",
        "wall_s": round(wall, 2),
        "discover_s": round(discovered, 2),
        "rows_read": rows,
        "dmo_keyed_rows": keyed,
        "jobs": sum(s.jobs for s in results),
        "processed": sum(s.processed for s in results),
        "failed_rows": sum(s.failed for s in results),
        "upserted": sum(s.upserted for s in results),
        "failed_jobs": [j for s in results for j in s.failed_jobs][:20],
        "streams": [asdict(s) for s in results],
        "boundaries": points,
        "settings": {"streams": streams, "records_per_job": records_per_job, "poll_interval_s": poll_interval},
    }


def main(argv: list[str]) -> None:
    """``python -m bench.replaced_design --child OUT.json`` with ``{"conn": ..., "options": ...}`` on stdin."""
    child_main("bench.replaced_design", run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

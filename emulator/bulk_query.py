"""Bulk API 2.0 query jobs: ``/services/data/vXX.X/jobs/query`` (``salesforce_api.md`` §5).

A job is created ``UploadComplete``, runs after ``job_dequeue_delay_s`` on a small query pool, and writes its whole
result once to ``jobs/<id>/result.csv`` with a row-offset index, so that every ``GET .../results`` page is a byte
range of that file: header row on every page, ``Sforce-NumberOfRecords`` and ``Sforce-Locator`` (base64 of the
next row offset, as Salesforce's ``MTAwMDA`` = "10000"; the literal ``null`` on the last page). SOQL is compiled
by :mod:`emulator.soql`, shared with the REST query endpoint.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from . import soql
from .auth import Session, org_of, require_session
from .bulk_engine import iter_segments, sf_time
from .bulk_ingest import (
    add_route,
    api_error,
    api_version,
    download_throttle,
    engine_of,
    insert_job,
    job_info,
    job_word,
    list_jobs,
    parse_json,
)
from .bulk_validation import DELIMITERS, LINE_ENDINGS
from .errors import SalesforceError, json_response
from .state import Org

router = APIRouter()
log = logging.getLogger("emulator.bulk")

BASE = "/services/data/v{version}/jobs/query"
MIN_QUERY_VERSION = 47.0
FETCH_ROWS = 5_000
_executors: dict[int, ThreadPoolExecutor] = {}
_generation = {"value": 0}


def _unsupported(what: str) -> SalesforceError:
    return SalesforceError(400, "API_ERROR", f"FUNCTIONALITY_NOT_ENABLED: {what} is not supported by Bulk API 2.0 "
                           "query")


def compile_bulk_query(text: str, operation: str) -> soql.Plan:
    """Compile, refusing what Bulk API 2.0 cannot run (aggregates, GROUP BY, OFFSET)."""
    try:
        plan = soql.compile_query(text, include_deleted=operation == "queryAll")
    except soql.SoqlError as exc:
        raise SalesforceError(exc.status, exc.error_code, exc.message) from None
    if plan.kind != "records":
        raise _unsupported("Aggregate query")
    if plan.group_sql:
        raise _unsupported("GROUP BY")
    if plan.offset:
        raise _unsupported("OFFSET")
    return plan


def query_row(org: Org, job_id: str) -> Any:
    row = engine_of(org).job_row(job_id)
    if row is None or row["kind"] != "query":
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    return row


# -- execution --------------------------------------------------------------------------------------------------------
def _csv_value(kind: str, value: Any) -> str:
    if value is None:
        return ""
    if kind == "boolean":
        text = "true" if soql.to_json_value("boolean", value) else "false"
    elif kind == "datetime":
        text = str(soql.canonical_datetime(value))
    elif kind == "int":
        text = str(int(value))
    elif kind in ("currency", "percent", "double"):
        text = repr(float(value))
    else:
        text = str(value)
    return '"' + text.replace('"', '""') + '"'


def _execute(org: Org, job_id: str, gen: int) -> None:
    """Run the query into ``result.csv`` + ``result.idx``, then mark the job complete."""
    engine = engine_of(org)
    row = engine.job_row(job_id)
    if row is None or row["state"] != "UploadComplete" or gen != _generation["value"]:
        return
    started = time.time()
    engine.write("UPDATE bulk_jobs SET state='InProgress', started_at=?, system_modstamp=? WHERE id=? AND "
                 "state='UploadComplete'", (started, sf_time(started), job_id))
    job_dir = org.jobs_dir / job_id
    try:
        plan = compile_bulk_query(row["query"], row["operation"])
        d = DELIMITERS[row["column_delimiter"]]
        le = LINE_ENDINGS[row["line_ending"]]
        outputs = plan.outputs
        header = d.join('"' + ".".join(o.key_path) + '"' for o in outputs)
        conn = engine.conn()
        rowids = plan.rowids(conn)
        offsets = array("q", [0])
        pos = 0
        job_dir.mkdir(parents=True, exist_ok=True)
        with open(job_dir / "result.csv", "wb") as f:
            for i in range(0, len(rowids), FETCH_ROWS):
                if gen != _generation["value"] or engine.stopping:
                    return
                state = engine.conn().execute("SELECT state FROM bulk_jobs WHERE id=?", (job_id,)).fetchone()
                if state is None or state[0] != "InProgress":
                    return  # aborted or deleted meanwhile
                lines = []
                for r in plan.rows_by_rowid(conn, rowids[i:i + FETCH_ROWS].tolist()):
                    line = (d.join(_csv_value(o.kind, r[o.index]) for o in outputs) + le).encode("utf-8")
                    lines.append(line)
                    pos += len(line)
                    offsets.append(pos)
                f.write(b"".join(lines))
        with open(job_dir / "result.idx", "wb") as f:
            offsets.tofile(f)
        n = len(offsets) - 1
    except SalesforceError as exc:
        engine.write("UPDATE bulk_jobs SET state='Failed', error_message=?, system_modstamp=? WHERE id=? AND "
                     "state='InProgress'", (f"InvalidBatch : {exc.message}", sf_time(), job_id))
        return
    except Exception as exc:
        log.exception("query job %s failed", job_id)
        engine.write("UPDATE bulk_jobs SET state='Failed', error_message=?, system_modstamp=? WHERE id=? AND "
                     "state='InProgress'", (f"Unknown : {exc}", sf_time(), job_id))
        return
    engine.write("UPDATE bulk_jobs SET header_text=?, result_rows=?, records_processed=? WHERE id=?",
                 (header, n, n, job_id))
    org.stats.add("bulk_query_records", n)

    def complete() -> None:
        now = time.time()
        total = int((now - started) * 1000 * org.profile.time_scale)
        engine.write("UPDATE bulk_jobs SET state='JobComplete', finished_at=?, total_ms=?, system_modstamp=? "
                     "WHERE id=? AND state='InProgress'", (now, total, sf_time(now), job_id))
    engine.later(org.profile.job_finalize_s, complete)


def _schedule(org: Org, job_id: str) -> None:
    executor = _executors.get(id(org))
    if executor is None:
        return
    gen = _generation["value"]
    engine_of(org).later(org.profile.job_dequeue_delay_s, lambda: executor.submit(_execute, org, job_id, gen))


# -- create ----------------------------------------------------------------------------------------------------------
def _create(org: Org, session: Session, version: float, spec: dict[str, Any]) -> Response:
    operation = spec.get("operation")
    if operation not in ("query", "queryAll"):
        raise api_error("operation", operation)
    query = spec.get("query")
    if not isinstance(query, str) or not query.strip():
        raise api_error("query", query)
    content_type = spec.get("contentType", "CSV")
    if content_type != "CSV":
        raise api_error("contentType", content_type)
    delimiter = spec.get("columnDelimiter", "COMMA")
    if delimiter not in DELIMITERS:
        raise api_error("columnDelimiter", delimiter)
    line_ending = spec.get("lineEnding", "LF")
    if line_ending not in LINE_ENDINGS:
        raise api_error("lineEnding", line_ending)
    plan = compile_bulk_query(query, operation)
    row = insert_job(org, session, "query", {
        "operation": operation, "object": plan.sobject.name, "column_delimiter": delimiter,
        "line_ending": line_ending, "api_version": version, "state": "UploadComplete", "query": query,
    })
    org.stats.add("bulk_query_jobs_created", 1)
    _schedule(org, row["id"])
    return json_response(job_info(row, "create"))


@router.post(BASE, include_in_schema=False)
@router.post(BASE + "/", include_in_schema=False)
async def create_query_job(version: str, request: Request) -> Response:
    org = org_of(request)
    session = require_session(request)
    await org.profile.rest_delay()
    v = api_version(version, MIN_QUERY_VERSION)
    spec = parse_json(await request.body())
    return await run_in_threadpool(_create, org, session, v, spec)


# -- info, abort, delete, list ----------------------------------------------------------------------------------------
@router.get(BASE + "/{job_id}", include_in_schema=False)
@router.get(BASE + "/{job_id}/", include_in_schema=False)
async def get_query_job(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_QUERY_VERSION)
    row = await run_in_threadpool(query_row, org, job_id)
    return json_response(job_info(row, "info"))


def _patch(org: Org, job_id: str, body: dict[str, Any]) -> Response:
    engine = engine_of(org)
    row = query_row(org, job_id)
    state = body.get("state")
    if state != "Aborted":
        if state in ("UploadComplete", "InProgress", "JobComplete", "Failed", "Open"):
            raise SalesforceError(400, "INVALIDJOBSTATE", f"Invalid state transition from {row['state']} to {state}")
        raise api_error("state", state)
    if row["state"] in ("JobComplete", "Failed", "Aborted"):
        raise SalesforceError(400, "INVALIDJOBSTATE", f"Aborting already {job_word(row['state'])} Job not allowed")
    engine.write("UPDATE bulk_jobs SET state='Aborted', system_modstamp=? WHERE id=?", (sf_time(), row["id"]))
    return json_response(job_info(engine.job_row(row["id"]), "create"))


@router.patch(BASE + "/{job_id}", include_in_schema=False)
@router.patch(BASE + "/{job_id}/", include_in_schema=False)
async def patch_query_job(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_QUERY_VERSION)
    body = parse_json(await request.body())
    return await run_in_threadpool(_patch, org, job_id, body)


def _delete(org: Org, job_id: str) -> Response:
    row = query_row(org, job_id)
    if row["state"] == "InProgress":
        raise SalesforceError(400, "INVALIDJOBSTATE", "Deleting a job in state InProgress is not allowed; abort it "
                              "first")
    engine_of(org).delete(row["id"])
    return Response(status_code=204)


@router.delete(BASE + "/{job_id}", include_in_schema=False)
@router.delete(BASE + "/{job_id}/", include_in_schema=False)
async def delete_query_job(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_QUERY_VERSION)
    return await run_in_threadpool(_delete, org, job_id)


@router.get(BASE, include_in_schema=False)
@router.get(BASE + "/", include_in_schema=False)
async def get_all_query_jobs(version: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    v = api_version(version, MIN_QUERY_VERSION)
    body = await run_in_threadpool(list_jobs, org, "query", v, "query", dict(request.query_params))
    return json_response(body)


# -- results ----------------------------------------------------------------------------------------------------------
def encode_locator(offset: int) -> str:
    return base64.b64encode(str(offset).encode()).decode().rstrip("=")


def decode_locator(locator: str) -> int:
    try:
        text = base64.b64decode(locator + "=" * (-len(locator) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not re.fullmatch(r"\d+", text):
        raise SalesforceError(400, "INVALID_LOCATOR", f"Invalid locator: {locator}")
    return int(text)


def _page(org: Org, job_id: str, version: float, params: dict[str, str]) -> tuple[Any, dict[str, str], bytes,
                                                                                  list[tuple[Path, int, int]]]:
    row = query_row(org, job_id)
    if row["state"] != "JobComplete":
        raise SalesforceError(400, "INVALIDJOBSTATE", f"Results are available once the job is JobComplete; the job "
                              f"is {row['state']}")
    if abs(row["api_version"] - version) > 1e-9:
        raise SalesforceError(409, "INVALIDJOB", f"The job was created with API version {row['api_version']:.1f}; "
                              f"get its results with the same version")
    total = row["result_rows"] or 0
    start = decode_locator(params["locator"]) if params.get("locator") else 0
    if start > total:
        raise SalesforceError(400, "INVALID_LOCATOR", f"Invalid locator: {params['locator']}")
    limit = total - start
    if params.get("maxRecords"):
        raw = params["maxRecords"]
        if not re.fullmatch(r"\d+", raw) or int(raw) < 1:
            raise api_error("maxRecords", raw)
        limit = min(limit, int(raw))
    end = start + limit
    job_dir = org.jobs_dir / row["id"]
    idx = array("q")
    with open(job_dir / "result.idx", "rb") as f:
        f.seek(start * idx.itemsize)
        idx.fromfile(f, 1)
        if end != start:
            f.seek(end * idx.itemsize)
            idx.fromfile(f, 1)
    byte_start, byte_end = idx[0], idx[-1]
    le = LINE_ENDINGS[row["line_ending"]]
    head = ((row["header_text"] or "") + le).encode("utf-8")
    headers = {"Content-Type": "text/csv", "Sforce-NumberOfRecords": str(limit),
               "Sforce-Locator": encode_locator(end) if end < total else "null"}
    segments = [(job_dir / "result.csv", byte_start, byte_end)] if byte_end > byte_start else []
    return row, headers, head, segments


async def query_results(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    v = api_version(version, MIN_QUERY_VERSION)
    _, headers, head, segments = await run_in_threadpool(_page, org, job_id, v, dict(request.query_params))
    return StreamingResponse(iter_segments(iter([head, *segments]), download_throttle(org)), status_code=200,
                             headers=headers)


add_route(BASE + "/{job_id}/results", query_results, ["GET"])


# -- lifespan ---------------------------------------------------------------------------------------------------------
def on_startup(org: Org) -> None:
    _executors[id(org)] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bulk-query")
    # Jobs that were queued or running when the emulator stopped run again from the start.
    engine = engine_of(org)
    rows = engine.conn().execute("SELECT id FROM bulk_jobs WHERE kind='query' AND state IN ('UploadComplete', "
                                 "'InProgress') ORDER BY seq").fetchall()
    for r in rows:
        engine.write("UPDATE bulk_jobs SET state='UploadComplete' WHERE id=?", (r[0],))
        _schedule(org, r[0])


def on_shutdown(org: Org) -> None:
    executor = _executors.pop(id(org), None)
    if executor is not None:
        _generation["value"] += 1
        threading.Thread(target=executor.shutdown, kwargs={"wait": True}, daemon=True).start()


def on_reset(org: Org) -> None:
    # Running queries notice the new generation and stop; the ingest engine's reset deletes every job row and file.
    _generation["value"] += 1

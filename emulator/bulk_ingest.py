"""Bulk API 2.0 ingest jobs: ``/services/data/vXX.X/jobs/ingest`` (``salesforce_api.md`` §4).

Routes: create (JSON or multipart with data), upload (one ``PUT .../batches`` per job, 201), close/abort
(``PATCH``), job info, the three result CSVs (``unprocessedrecords`` also as ``unprocessedRecords``, which
simple-salesforce uses), delete (204) and list (``nextRecordsUrl`` paging). Every path also answers with a
trailing slash. Processing happens in :mod:`emulator.bulk_engine`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from . import DEFAULT_API_VERSION
from .auth import Session, org_of, require_session
from .bulk_engine import Engine, iter_segments, sf_time
from .bulk_validation import DELIMITERS, LINE_ENDINGS, OPERATIONS
from .errors import SalesforceError, json_response, not_found
from .ids import make_id
from .schema import get_object
from .state import Org

router = APIRouter()

BASE = "/services/data/v{version}/jobs/ingest"
MIN_INGEST_VERSION = 41.0
MAX_VERSION = float(DEFAULT_API_VERSION)
# "A request can provide CSV data that does not in total exceed 150 MB of base64 encoded content."
MAX_BASE64_BYTES = 150 * 1024 * 1024
MULTIPART_MAX_CHARS = 100_000
LIST_PAGE = 1000
_VERSION = re.compile(r"\d{2}\.\d")


# -- shared helpers (bulk_query uses them too) ----------------------------------------------------------------------
def engine_of(org: Org) -> Engine:
    engine = getattr(org, "bulk_engine", None)
    if engine is None:
        raise SalesforceError(503, "SERVER_UNAVAILABLE", "Bulk API is starting, please try again later.")
    return engine


def api_version(version: str, minimum: float) -> float:
    """The path's API version, or Salesforce's 404 for a malformed, too old or too new one."""
    if not _VERSION.fullmatch(version) or not minimum <= float(version) <= MAX_VERSION:
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    return float(version)


def api_error(prop: str, value: Any) -> SalesforceError:
    return SalesforceError(400, "API_ERROR", f"Invalid value: '{'' if value is None else value}' supplied for "
                           f"property: '{prop}'")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SalesforceError(400, "JSON_PARSER_ERROR", f"Unexpected character in request body: {exc}") from None
    if not isinstance(body, dict):
        raise SalesforceError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
    return body


def add_route(path: str, endpoint, methods: list[str]) -> None:
    """Register ``path`` with and without a trailing slash (clients send both, redirects would break PUT)."""
    router.add_api_route(path, endpoint, methods=methods, include_in_schema=False)
    router.add_api_route(path + "/", endpoint, methods=methods, include_in_schema=False)


def job_word(state: str) -> str:
    return "Completed" if state == "JobComplete" else state


def job_info(row: Any, view: str) -> dict[str, Any]:
    """JobInfo in Salesforce's key order; ``view`` is ``create`` (create/PATCH), ``info`` or ``list``."""
    kind = row["kind"]
    version = row["api_version"]
    info: dict[str, Any] = {
        "id": row["id"], "operation": row["operation"], "object": row["object"], "createdById": row["created_by"],
        "createdDate": row["created_date"], "systemModstamp": row["system_modstamp"], "state": row["state"],
    }
    if row["external_id_field"] and view != "list":
        info["externalIdFieldName"] = row["external_id_field"]
    if row["assignment_rule_id"] and view != "list":
        info["assignmentRuleId"] = row["assignment_rule_id"]
    info["concurrencyMode"] = "Parallel"
    info["contentType"] = row["content_type"]
    info["apiVersion"] = version
    if view != "create":
        info["jobType"] = "V2Ingest" if kind == "ingest" else "V2Query"
    if kind == "ingest" and row["state"] == "Open":
        info["contentUrl"] = f"services/data/v{version:.1f}/jobs/ingest/{row['id']}/batches"
    info["lineEnding"] = row["line_ending"]
    info["columnDelimiter"] = row["column_delimiter"]
    if view == "info":
        if kind == "ingest":
            if row["state"] != "Open":
                info["numberRecordsProcessed"] = row["records_processed"]
                info["numberRecordsFailed"] = row["records_failed"]
            info["retries"] = row["retries"]
            info["totalProcessingTime"] = row["total_ms"]
            info["apiActiveProcessingTime"] = row["api_active_ms"]
            info["apexProcessingTime"] = row["apex_ms"]
        else:
            info["numberRecordsProcessed"] = row["records_processed"]
            info["retries"] = row["retries"]
            info["totalProcessingTime"] = row["total_ms"]
        if row["error_message"]:
            info["errorMessage"] = row["error_message"]
    return info


def insert_job(org: Org, session: Session, kind: str, values: dict[str, Any]) -> Any:
    """Create the job row (and its folder); returns the row."""
    engine = engine_of(org)
    # Through the engine's writer: a commit on another connection would drop the writer's page cache (see
    # Engine.writer), and jobs are created while others are being written.
    with engine.write_lock:
        c = engine.writer()
        seq = org.next_number("bulk_job", conn=c)
        job_id = make_id("750", seq)
        now = sf_time()
        row = {
            "id": job_id, "seq": seq, "kind": kind, "created_by": session.user_id, "created_date": now,
            "system_modstamp": now, "content_type": "CSV", **values,
        }
        cols = ", ".join(row)
        c.execute(f"INSERT INTO bulk_jobs({cols}) VALUES({', '.join('?' * len(row))})", tuple(row.values()))
        c.commit()
    (org.jobs_dir / job_id).mkdir(parents=True, exist_ok=True)
    return engine.job_row(job_id)


def list_jobs(org: Org, kind: str, version: float, path: str, params: dict[str, str]) -> dict[str, Any]:
    engine = engine_of(org)
    offset = 0
    locator = params.get("queryLocator")
    if locator:
        m = re.fullmatch(r"01g[A-Za-z0-9]{12,15}-(\d+)", locator)
        if not m:
            raise SalesforceError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        offset = int(m.group(1))
    where = ["kind=?"]
    args: list[Any] = [kind]
    job_type = params.get("jobType")
    if job_type:
        if job_type not in ("BigObjectIngest", "Classic", "V2Ingest", "V2Query"):
            raise api_error("jobType", job_type)
        expected = "V2Ingest" if kind == "ingest" else "V2Query"
        if job_type != expected:
            where.append("0")
    if params.get("isPkChunkingEnabled", "").lower() == "true":
        where.append("0")  # PK chunking is a Bulk API 1.0 feature
    rows = engine.conn().execute(f"SELECT * FROM bulk_jobs WHERE {' AND '.join(where)} ORDER BY seq LIMIT ? OFFSET ?",
                                 (*args, LIST_PAGE + 1, offset)).fetchall()
    done = len(rows) <= LIST_PAGE
    body: dict[str, Any] = {"done": done, "records": [job_info(r, "list") for r in rows[:LIST_PAGE]]}
    if done:
        body["nextRecordsUrl"] = None
    else:
        loc = make_id("01g", int(time.time()) % 10**9)[:15]
        body["nextRecordsUrl"] = f"/services/data/v{version:.1f}/jobs/{path}?queryLocator={loc}-{offset + LIST_PAGE}"
    return body


def ingest_row(org: Org, job_id: str) -> Any:
    row = engine_of(org).job_row(job_id)
    if row is None or row["kind"] != "ingest":
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    return row


# -- create ----------------------------------------------------------------------------------------------------------
def _validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    operation = spec.get("operation")
    if operation not in OPERATIONS:
        raise api_error("operation", operation)
    name = spec.get("object")
    obj = get_object(name) if isinstance(name, str) else None
    if obj is None:
        raise SalesforceError(400, "INVALIDJOB", f"InvalidJob : Unable to find object: {name or ''}")
    if not obj.createable:
        raise SalesforceError(400, "INVALIDJOB", f"InvalidJob : Entity '{obj.name}' is not supported by the Bulk API.")
    content_type = spec.get("contentType", "CSV")
    if content_type != "CSV":
        raise api_error("contentType", content_type)
    delimiter = spec.get("columnDelimiter", "COMMA")
    if delimiter not in DELIMITERS:
        raise api_error("columnDelimiter", delimiter)
    line_ending = spec.get("lineEnding", "LF")
    if line_ending not in LINE_ENDINGS:
        raise api_error("lineEnding", line_ending)
    ext = spec.get("externalIdFieldName")
    ext_name = None
    if operation == "upsert":
        f = obj.field(ext) if isinstance(ext, str) else None
        if f is None or not (f.external_id or f.id_lookup):
            raise SalesforceError(400, "INVALIDJOB", f"InvalidJob : Field name provided, {ext or ''} does not match "
                                  f"an External ID for {obj.name}")
        ext_name = f.name
    rule = spec.get("assignmentRuleId")
    return {"operation": operation, "object": obj.name, "external_id_field": ext_name, "column_delimiter": delimiter,
            "line_ending": line_ending, "assignment_rule_id": rule if isinstance(rule, str) else None,
            "state": "Open"}


def _create(org: Org, session: Session, version: float, spec: dict[str, Any], content: bytes | None) -> Response:
    values = _validate_spec(spec)
    values["api_version"] = version
    if content is not None:
        values["state"] = "UploadComplete"
    row = insert_job(org, session, "ingest", values)
    org.stats.add("bulk_jobs_created", 1)
    engine = engine_of(org)
    if content is not None:
        path = org.jobs_dir / row["id"] / "data.csv"
        path.write_bytes(content)
        _record_upload(org, row["id"], len(content), hashlib.sha256(content).hexdigest())
        row = engine.job_row(row["id"])
        # The upload is completed for the caller: queue it as a PATCH to UploadComplete would.
        engine.close(row)
        row = {**dict(row), "state": "UploadComplete"}  # the answer shows the state the request set
    return json_response(job_info(row, "create"))


@router.post(BASE, include_in_schema=False)
@router.post(BASE + "/", include_in_schema=False)
async def create_job(version: str, request: Request) -> Response:
    org = org_of(request)
    session = require_session(request)
    await org.profile.rest_delay()
    v = api_version(version, MIN_INGEST_VERSION)
    content_type = request.headers.get("content-type", "")
    content: bytes | None = None
    if content_type.lower().startswith("multipart/form-data"):
        form = await request.form()
        job_part = form.get("job")
        data_part = form.get("content")
        if job_part is None or data_part is None:
            raise SalesforceError(400, "INVALIDJOB", "InvalidJob : A multipart request needs the parts 'job' and "
                                  "'content'")
        raw_job = await job_part.read() if hasattr(job_part, "read") else str(job_part).encode()
        spec = parse_json(raw_job)
        content = await data_part.read() if hasattr(data_part, "read") else str(data_part).encode()
        if len(content.decode("utf-8", "replace")) > MULTIPART_MAX_CHARS:
            raise SalesforceError(400, "INVALIDJOB", f"InvalidJob : The multipart request data exceeds "
                                  f"{MULTIPART_MAX_CHARS} characters; upload larger data with PUT .../batches")
    else:
        spec = parse_json(await request.body())
    return await run_in_threadpool(_create, org, session, v, spec, content)


# -- upload ---------------------------------------------------------------------------------------------------------
_uploading: set[str] = set()


def _record_upload(org: Org, job_id: str, size: int, digest: str) -> None:
    """Mark the upload done and remember where its header ends (used by results and restarts)."""
    engine = engine_of(org)
    path = org.jobs_dir / job_id / "data.csv"
    with open(path, "rb") as f:
        first = f.readline(64 * 1024)
    header_text = first.decode("utf-8", "replace").rstrip("\r\n")
    engine.write("UPDATE bulk_jobs SET uploaded=1, upload_bytes=?, header_end=?, header_text=?, system_modstamp=? "
                 "WHERE id=?", (size, len(first), header_text, sf_time(), job_id))
    org.stats.add("bulk_uploads", 1)
    org.stats.add("bulk_upload_bytes", size)
    org.stats.upload(digest)


@router.put(BASE + "/{job_id}/batches", include_in_schema=False)
@router.put(BASE + "/{job_id}/batches/", include_in_schema=False)
async def upload(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_INGEST_VERSION)
    row = await run_in_threadpool(ingest_row, org, job_id)
    job_id = row["id"]
    if row["uploaded"] or job_id in _uploading:
        raise SalesforceError(400, "BULK_API_ERROR", f"Found multipe contents for job: <{job_id[:15]}>, please "
                              "'Close' / 'Abort' / 'Delete' the current Job then create a new Job and make sure you "
                              "only do 'PUT' once on a given Job.")
    if row["state"] != "Open":
        raise SalesforceError(400, "INVALIDJOBSTATE", f"Unable to upload data to a job in state {row['state']}; "
                              "data can only be uploaded to an Open job")
    _uploading.add(job_id)
    part = org.jobs_dir / job_id / "data.csv.part"
    size = 0
    digest = hashlib.sha256()
    too_large = False
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as f:
            async for chunk in request.stream():
                if not chunk:
                    continue
                size += len(chunk)
                if 4 * math.ceil(size / 3) > MAX_BASE64_BYTES:
                    too_large = True  # keep draining so the client reads our answer, not a reset connection
                    continue
                f.write(chunk)
                digest.update(chunk)
                mbps = org.profile.upload_mbps
                if mbps > 0:
                    await asyncio.sleep(org.profile.scaled(len(chunk) / (mbps * 1_000_000)))
        if too_large:
            part.unlink(missing_ok=True)
            raise SalesforceError(400, "BULK_API_ERROR", "The job data exceeds the maximum upload size of 150 MB "
                                  "after base64 encoding (about 100 MB of CSV). Split the data across several jobs.")
        part.replace(part.with_name("data.csv"))
        await run_in_threadpool(_record_upload, org, job_id, size, digest.hexdigest())
    finally:
        _uploading.discard(job_id)
    return Response(status_code=201)


# -- job info, close/abort, delete, list ----------------------------------------------------------------------------------
@router.get(BASE + "/{job_id}", include_in_schema=False)
@router.get(BASE + "/{job_id}/", include_in_schema=False)
async def get_job(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_INGEST_VERSION)
    row = await run_in_threadpool(ingest_row, org, job_id)
    return json_response(job_info(row, "info"))


def _patch(org: Org, job_id: str, body: dict[str, Any]) -> Response:
    engine = engine_of(org)
    row = ingest_row(org, job_id)
    state = body.get("state")
    current = row["state"]
    if state == "UploadComplete":
        if current != "Open" or row["id"] in _uploading:
            raise SalesforceError(400, "INVALIDJOBSTATE", f"Closing already {job_word(current)} Job not allowed")
        engine.close(row)
        # Answer with the state this request set, even if a worker has already picked the job up.
        return json_response(job_info({**dict(row), "state": "UploadComplete", "system_modstamp": sf_time()}, "create"))
    elif state == "Aborted":
        if current in ("JobComplete", "Failed", "Aborted"):
            raise SalesforceError(400, "INVALIDJOBSTATE", f"Aborting already {job_word(current)} Job not allowed")
        engine.abort(row)
    elif state in ("Open", "InProgress", "JobComplete", "Failed"):
        raise SalesforceError(400, "INVALIDJOBSTATE", f"Invalid state transition from {current} to {state}")
    else:
        raise api_error("state", state)
    return json_response(job_info(engine.job_row(row["id"]), "create"))


@router.patch(BASE + "/{job_id}", include_in_schema=False)
@router.patch(BASE + "/{job_id}/", include_in_schema=False)
async def patch_job(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_INGEST_VERSION)
    body = parse_json(await request.body())
    return await run_in_threadpool(_patch, org, job_id, body)


def _delete(org: Org, job_id: str) -> Response:
    row = ingest_row(org, job_id)
    if row["state"] in ("Open", "InProgress"):
        raise SalesforceError(400, "INVALIDJOBSTATE", f"Deleting a job in state {row['state']} is not allowed; "
                              "abort it first")
    engine_of(org).delete(row["id"])
    return Response(status_code=204)


@router.delete(BASE + "/{job_id}", include_in_schema=False)
@router.delete(BASE + "/{job_id}/", include_in_schema=False)
async def delete_job(version: str, job_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_INGEST_VERSION)
    return await run_in_threadpool(_delete, org, job_id)


@router.get(BASE, include_in_schema=False)
@router.get(BASE + "/", include_in_schema=False)
async def get_all_jobs(version: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    v = api_version(version, MIN_INGEST_VERSION)
    body = await run_in_threadpool(list_jobs, org, "ingest", v, "ingest", dict(request.query_params))
    return json_response(body)


# -- results --------------------------------------------------------------------------------------------------------
RESULT_KINDS = {"successfulResults": "successfulResults", "failedResults": "failedResults",
                "unprocessedrecords": "unprocessedrecords", "unprocessedRecords": "unprocessedrecords"}


def download_throttle(org: Org):
    """A per-chunk sleep modelling ``download_mbps`` (None when unlimited)."""
    def throttle(n: int) -> None:
        mbps = org.profile.download_mbps
        if mbps > 0:
            time.sleep(org.profile.scaled(n / (mbps * 1_000_000)))
    return throttle


async def results(version: str, job_id: str, kind: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    await org.profile.rest_delay()
    api_version(version, MIN_INGEST_VERSION)
    which = RESULT_KINDS.get(kind)
    if which is None:
        return not_found()
    row = await run_in_threadpool(ingest_row, org, job_id)
    parts = engine_of(org).result_stream(row, which)
    return StreamingResponse(iter_segments(parts, download_throttle(org)), status_code=200,
                             headers={"Content-Type": "text/csv"})


add_route(BASE + "/{job_id}/{kind}", results, ["GET"])


# -- lifespan ---------------------------------------------------------------------------------------------------------
def on_startup(org: Org) -> None:
    engine = Engine(org)
    org.bulk_engine = engine  # type: ignore[attr-defined]
    engine.start()


def on_shutdown(org: Org) -> None:
    engine = getattr(org, "bulk_engine", None)
    if engine is not None:
        engine.stop()


def on_reset(org: Org) -> None:
    """``POST /__emulator/reset``: abort and delete every Bulk job and its files."""
    engine = getattr(org, "bulk_engine", None)
    if engine is not None:
        engine.reset()
    _uploading.clear()


def extra_stats(org: Org) -> dict[str, Any]:
    engine = getattr(org, "bulk_engine", None)
    if engine is None:
        return {}
    return {"bulk_jobs_active": len(engine.jobs), "bulk_queue_depth": engine.queue_depth(),
            "bulk_workers_busy": engine.active}

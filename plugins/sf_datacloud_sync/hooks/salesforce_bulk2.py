"""A streaming Bulk API 2.0 hook on the provider's ``salesforce`` connection.

Compared with simple-salesforce's ``bulk2`` (reads whole files, one job per chunk sequentially, no
re-authentication of bulk calls, aborts on any exception) and the provider's ``SalesforceBulkOperator``
(Bulk API 1.0, records through XCom), this hook:

* authenticates with OAuth client credentials, JWT bearer, refresh token or username-password against the
  connection's login URL (or the provider's own login), and renews an expired session once per request,
  uploads and polling included;
* retries connection errors, 5xx and 429 (honouring ``Retry-After``) within a bounded budget, and raises
  :class:`~sf_datacloud_sync.hooks._http.SalesforceApiError` at once for other 4xx, with Salesforce's
  ``errorCode``;
* uploads from bytes or seekable files (never more than Bulk's 100 MB per job), streams result files and
  query pages row by row, and waits for jobs without ever calling a still-running job "failed";
* has an ``httpx`` async path for triggers that shares request building, retry decisions, error parsing
  and auth with the sync path (:mod:`sf_datacloud_sync.hooks._http`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any, Literal

from airflow.providers.salesforce.hooks.salesforce import SalesforceHook

from sf_datacloud_sync.hooks._http import (
    ApiRequest,
    ConnectionConfig,
    RetryPolicy,
    SalesforceApiError,
    SalesforceClient,
    SalesforceConnectionError,
    body_length,
    is_duplicate_upload_error,
)
from sf_datacloud_sync.utils.results import ChunkStream, csv_delimiter, iter_csv_records

if TYPE_CHECKING:
    import requests
    from simple_salesforce import Salesforce

log = logging.getLogger(__name__)

#: Bulk API 2.0 accepts 150 MB per job after base64, i.e. 100 MB of CSV (decimal megabytes, to be safe).
MAX_UPLOAD_BYTES = 100_000_000
OPERATIONS = ("insert", "update", "upsert", "delete", "hardDelete")
LINE_ENDINGS = ("LF", "CRLF")
COLUMN_DELIMITERS = ("BACKQUOTE", "CARET", "COMMA", "PIPE", "SEMICOLON", "TAB")
TERMINAL_STATES = frozenset({"JobComplete", "Failed", "Aborted"})
_RESULT_PATHS = {"successful": "successfulResults/", "failed": "failedResults/", "unprocessed": "unprocessedrecords/"}


class BulkUploadTooLarge(ValueError):
    """The CSV for one job is larger than Bulk API 2.0 accepts; split it into more jobs."""


class BulkJobFailed(RuntimeError):
    """A Bulk API 2.0 query job ended ``Failed`` or ``Aborted``."""

    def __init__(self, job_id: str, state: str, message: str) -> None:
        self.job_id = job_id
        self.state = state
        super().__init__(f"Bulk API 2.0 job {job_id} ended {state}: {message or 'no errorMessage given'}")


@dataclass(frozen=True)
class JobWait:
    """Where a job stood when :meth:`SalesforceBulk2Hook.wait_for_job` returned.

    ``finished=False`` means the wait's deadline passed while Salesforce was still working on the job
    (``state`` is then e.g. ``InProgress``): the job is *not* failed and can be waited for again.
    """

    job_id: str
    state: str
    info: dict[str, Any] = field(repr=False)
    finished: bool

    @property
    def succeeded(self) -> bool:
        """The job completed (rows may still have failed individually: see :attr:`records_failed`)."""
        return self.state == "JobComplete"

    @property
    def records_processed(self) -> int:
        return int(self.info.get("numberRecordsProcessed") or 0)

    @property
    def records_failed(self) -> int:
        return int(self.info.get("numberRecordsFailed") or 0)

    @property
    def error_message(self) -> str | None:
        return self.info.get("errorMessage")


class _PollBackoff:
    """Capped exponential poll intervals with jitter (grows by 1.5x, never beyond ``maximum``)."""

    def __init__(self, first: float, maximum: float) -> None:
        self.next = max(0.0, first)
        self.maximum = max(first, maximum)

    def __call__(self) -> float:
        current = self.next
        self.next = min(self.maximum, max(self.next * 1.5, 0.05))
        return current * random.uniform(0.8, 1.0)


class SalesforceBulk2Hook(SalesforceHook):
    """
    Bulk API 2.0 ingest and query, REST describe/limits/count, on a ``salesforce`` connection.

    Connection: ``login`` (username), ``password`` and extras ``instance_url``, ``login_url`` (else
    ``https://{domain}.salesforce.com``, else login.salesforce.com), ``consumer_key``/``client_id``,
    ``consumer_secret``, ``private_key``/``private_key_file_path``, ``refresh_token``, ``auth_type``
    (client_credentials, jwt, refresh_token, password or provider), ``ca_bundle``, ``version`` (default
    ``62.0``), ``security_token``, ``domain``; optional ``jwt_audience``, ``connect_timeout``,
    ``read_timeout``. See :func:`sf_datacloud_sync.hooks._http.resolve_auth_type` for the order in which a
    flow is picked when ``auth_type`` is not set. TLS is always verified (against ``ca_bundle`` when set).

    :param salesforce_conn_id: Airflow connection id.
    :param session_id: A ready access token (provider's direct-session mode; needs ``instance_url``).
    :param session: A ``requests.Session`` to send through (certificate checks stay on).
    :param retry: Retry budget for each request (default 6 attempts within 2 minutes).
    :param max_upload_bytes: Largest CSV accepted by :meth:`upload_job_data`.
    """

    conn_name_attr = "salesforce_conn_id"
    default_conn_name = "salesforce_default"
    conn_type = "salesforce"
    hook_name = "Salesforce Bulk API 2.0"

    def __init__(self, salesforce_conn_id: str = default_conn_name, session_id: str | None = None,
                 session: requests.Session | None = None, *, retry: RetryPolicy | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        super().__init__(salesforce_conn_id=salesforce_conn_id, session_id=session_id, session=session)
        self.retry_policy = retry or RetryPolicy()
        self.max_upload_bytes = min(max_upload_bytes, MAX_UPLOAD_BYTES)

    # -- connection and session ---------------------------------------------------------------------------------
    @cached_property
    def connection_config(self) -> ConnectionConfig:
        """Settings read from the Airflow connection (sync lookup; see :meth:`aget_client` in async code)."""
        return ConnectionConfig.from_connection(self.get_connection(self.conn_id), self._get_field,
                                                session_id=self.session_id)

    @cached_property
    def client(self) -> SalesforceClient:
        """The authenticated request core (pooled ``requests`` session, ``httpx`` twin for async)."""
        return self._make_client(self.connection_config)

    def _make_client(self, config: ConnectionConfig) -> SalesforceClient:
        return SalesforceClient(config, self.retry_policy, session_id=self.session_id,
                                provider_login=self._provider_login, session=self.session)

    async def aget_client(self) -> SalesforceClient:
        """The request core, looking the connection up without blocking the event loop."""
        if "client" not in self.__dict__:
            conn = await self.aget_connection(self.conn_id)
            config = ConnectionConfig.from_connection(conn, self._get_field, session_id=self.session_id)
            self.__dict__.setdefault("connection_config", config)
            self.__dict__.setdefault("client", self._make_client(config))
        return self.__dict__["client"]

    def _provider_login(self) -> tuple[str, str]:
        """``auth_type="provider"``: the provider's own simple-salesforce login (SOAP, IP filtering)."""
        if self.session is None:
            self.session = self.client.session  # so that simple-salesforce verifies against ca_bundle too
        sf = SalesforceHook.conn.func(self)  # type: ignore[attr-defined]
        return sf.session_id, f"https://{sf.sf_instance}"

    @cached_property
    def conn(self) -> Salesforce:
        """A simple-salesforce client on this hook's session, so the provider's methods work unchanged.

        It is built from the current access token ("direct session"); prefer this hook's own methods, which
        renew an expired session.
        """
        from simple_salesforce import Salesforce

        client = self.client
        token = client._current_token()
        return Salesforce(session_id=token, instance_url=client.instance_url, version=client.config.api_version,
                          session=client.session)

    def test_connection(self) -> tuple[bool, str]:
        """Log in and describe ``Account``, as the provider's test does (used by ``airflow connections test``)."""
        try:
            self.describe("Account")
        except Exception as exc:
            return False, str(exc)
        return True, f"Connection successfully tested ({self.connection_config.auth_type} login, " \
                     f"{self.client.instance_url}, API v{self.connection_config.api_version})"

    def close(self) -> None:
        """Close pooled connections."""
        if "client" in self.__dict__:
            self.client.close()

    # -- REST ------------------------------------------------------------------------------------------------------
    def describe(self, object_name: str) -> dict[str, Any]:
        """``GET /sobjects/{object_name}/describe``.

        :param object_name: sObject API name, e.g. ``Opportunity``.
        """
        return self.client.request_json("GET", f"sobjects/{object_name}/describe")

    def limits(self) -> dict[str, Any]:
        """``GET /limits/``: the org's allocations (``DailyApiRequests``, ``DailyBulkApiBatches``, ...)."""
        return self.client.request_json("GET", "limits/")

    def query_count(self, soql: str) -> int:
        """Rows matched by a ``SELECT COUNT() FROM ...`` query (REST ``totalSize``).

        :param soql: A SOQL ``SELECT COUNT()`` query.
        """
        body = self.client.request_json("GET", "query/", params={"q": soql})
        return int(body["totalSize"])

    # -- Bulk API 2.0 ingest ---------------------------------------------------------------------------------------
    def create_ingest_job(self, object_name: str, operation: str = "upsert", external_id_field: str | None = None,
                          line_ending: str = "LF", column_delimiter: str = "COMMA") -> dict[str, Any]:
        """Create an ingest job (state ``Open``).

        :param object_name: sObject API name.
        :param operation: insert, update, upsert, delete or hardDelete.
        :param external_id_field: The upsert key (required for upsert).
        :param line_ending: ``LF`` or ``CRLF``; must match the uploaded CSV.
        :param column_delimiter: Bulk's ``columnDelimiter`` name (``COMMA``, ``TAB``, ``PIPE``, ...).
        :return: the job info (``id``, ``state``, ...).
        """
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}; got {operation!r}")
        if line_ending not in LINE_ENDINGS:
            raise ValueError(f"line_ending must be LF or CRLF; got {line_ending!r}")
        if column_delimiter not in COLUMN_DELIMITERS:
            raise ValueError(f"column_delimiter must be one of {', '.join(COLUMN_DELIMITERS)}; "
                             f"got {column_delimiter!r}")
        if operation == "upsert" and not external_id_field:
            raise ValueError("an upsert job needs external_id_field")
        spec: dict[str, Any] = {"object": object_name, "operation": operation, "contentType": "CSV",
                                "lineEnding": line_ending, "columnDelimiter": column_delimiter}
        if external_id_field:
            spec["externalIdFieldName"] = external_id_field
        job = self.client.request_json("POST", "jobs/ingest", json_body=spec)
        self.log.debug("Created %s job %s on %s", operation, job.get("id"), object_name)
        return job

    def upload_job_data(self, job_id: str, data: bytes | IO[bytes]) -> None:
        """Upload the job's CSV (header row included) in one ``PUT``; file objects are streamed.

        The size is checked before anything is sent. If a retried upload is answered ``BULK_API_ERROR``
        "Found multipe contents", the earlier attempt was stored (its answer was lost): that counts as
        uploaded. A file object is sent from its current position and rewound for each attempt.

        :param job_id: An ``Open`` job.
        :param data: CSV bytes, or a seekable binary file.
        """
        size = body_length(data)
        if size > self.max_upload_bytes:
            raise BulkUploadTooLarge(f"job {job_id}: the CSV is {size:,} bytes, more than the "
                                     f"{self.max_upload_bytes:,} bytes Bulk API 2.0 accepts per job; split the rows "
                                     "over more jobs")
        if size == 0:
            raise ValueError(f"job {job_id}: nothing to upload (the CSV needs at least its header row)")
        try:
            self.client.send(ApiRequest("PUT", f"jobs/ingest/{job_id}/batches", content=data,
                                        content_type="text/csv", ok=(201,)))
        except SalesforceApiError as exc:
            if exc.attempts > 1 and is_duplicate_upload_error(exc):
                self.log.info("Job %s: the retried upload found the data already stored; treating it as uploaded",
                              job_id)
                return
            raise

    def close_job(self, job_id: str) -> dict[str, Any]:
        """Mark the upload complete (``UploadComplete``) so that Salesforce queues the job."""
        return self._set_state(job_id, "UploadComplete")

    def abort_job(self, job_id: str) -> dict[str, Any]:
        """Abort the job (rows already committed stay committed)."""
        return self._set_state(job_id, "Aborted")

    def _set_state(self, job_id: str, state: str) -> dict[str, Any]:
        try:
            return self.client.request_json("PATCH", f"jobs/ingest/{job_id}", json_body={"state": state})
        except SalesforceApiError as exc:
            # A retried PATCH whose first attempt was applied answers INVALIDJOBSTATE: look before raising.
            if exc.attempts > 1 and exc.error_code == "INVALIDJOBSTATE":
                info = self.get_job(job_id)
                if info.get("state") == state or (state == "UploadComplete" and info.get("state") != "Open"):
                    return info
            raise

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its data and results (``204``)."""
        try:
            self.client.send(ApiRequest("DELETE", f"jobs/ingest/{job_id}", ok=(204, 200)))
        except SalesforceApiError as exc:
            if exc.attempts > 1 and exc.status == 404:  # the first attempt deleted it
                return
            raise

    def get_job(self, job_id: str) -> dict[str, Any]:
        """Job info: ``state``, ``numberRecordsProcessed``, ``numberRecordsFailed``, ``errorMessage``..."""
        return self.client.request_json("GET", f"jobs/ingest/{job_id}")

    def list_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """All ingest jobs visible to the user, page by page (``nextRecordsUrl``).

        :param filters: Query parameters of ``GET /jobs/ingest`` (``jobType``, ``isPkChunkingEnabled``).
        """
        path: str | None = "jobs/ingest"
        params: dict[str, Any] | None = filters or None
        while path:
            page = self.client.request_json("GET", path, params=params)
            yield from page.get("records") or []
            next_url = page.get("nextRecordsUrl")
            if page.get("done", True) or not next_url or next_url == "null":
                return
            path, params = (next_url if next_url.startswith("/") else "/" + next_url), None

    def submit_ingest_job(self, object_name: str, data: bytes | IO[bytes], *, external_id_field: str | None,
                          operation: str = "upsert", line_ending: str = "LF", column_delimiter: str = "COMMA",
                          on_created: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Create a job, upload ``data`` and close it; if the upload or close fails the job is aborted.

        :param on_created: Called with the new job's info before the upload starts (e.g. to record the job id
            somewhere durable first); if it raises, the job is aborted.
        :return: the job info after close (state ``UploadComplete``).
        """
        job = self.create_ingest_job(object_name, operation, external_id_field, line_ending, column_delimiter)
        job_id = job["id"]
        try:
            if on_created is not None:
                on_created(job)
            self.upload_job_data(job_id, data)
            return self.close_job(job_id)
        except BaseException as exc:
            try:
                self.abort_job(job_id)
                exc.add_note(f"Bulk API 2.0 job {job_id} was aborted")
            except Exception as abort_exc:  # the original error matters more
                exc.add_note(f"Bulk API 2.0 job {job_id} could not be aborted: {abort_exc}")
            raise

    def wait_for_job(self, job_id: str, timeout: float, poll_interval: float = 2.0,
                     max_poll_interval: float = 30.0) -> JobWait:
        """Poll until the job is ``JobComplete``, ``Failed`` or ``Aborted``, or ``timeout`` seconds pass.

        At the deadline this returns ``finished=False`` with the current state (e.g. ``InProgress``): the
        job keeps running in Salesforce and is not failed.

        :param job_id: Ingest job id.
        :param timeout: Seconds to wait at most.
        :param poll_interval: First interval between polls; grows 1.5x per poll (with jitter).
        :param max_poll_interval: Cap of the interval.
        """
        return self._wait(f"jobs/ingest/{job_id}", job_id, timeout, poll_interval, max_poll_interval)

    def _wait(self, path: str, job_id: str, timeout: float, poll_interval: float,
              max_poll_interval: float) -> JobWait:
        deadline = time.monotonic() + timeout
        backoff = _PollBackoff(poll_interval, max_poll_interval)
        last_state = None
        while True:
            info = self.client.request_json("GET", path)
            state = info.get("state", "")
            if state != last_state:
                self.log.info("Bulk job %s is %s (processed %s, failed %s)", job_id, state,
                              info.get("numberRecordsProcessed", 0), info.get("numberRecordsFailed", 0))
                last_state = state
            if state in TERMINAL_STATES:
                return JobWait(job_id, state, info, True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log.info("Bulk job %s still %s after %.0fs; it keeps running in Salesforce", job_id, state,
                              timeout)
                return JobWait(job_id, state, info, False)
            time.sleep(min(backoff(), remaining))

    def iter_job_results(self, job_id: str, kind: Literal["successful", "failed", "unprocessed"], *,
                         column_delimiter: str | None = None) -> Iterator[dict[str, str]]:
        """Rows of one result file, streamed (RFC 4180; multi-line ``sf__Error`` values included).

        ``successful`` rows carry ``sf__Id`` and ``sf__Created``, ``failed`` rows ``sf__Id`` and ``sf__Error``
        (see :func:`sf_datacloud_sync.utils.results.parse_sf_error`), then the uploaded columns.

        :param job_id: Ingest job id.
        :param kind: ``successful``, ``failed`` or ``unprocessed``.
        :param column_delimiter: The job's delimiter; looked up from the job when not given.
        """
        try:
            path = _RESULT_PATHS[kind]
        except KeyError:
            raise ValueError(f"kind must be one of {', '.join(_RESULT_PATHS)}; got {kind!r}") from None
        if column_delimiter is None:
            column_delimiter = self.get_job(job_id).get("columnDelimiter") or "COMMA"
        delimiter = csv_delimiter(column_delimiter)
        yield from self._iter_csv(lambda: ApiRequest("GET", f"jobs/ingest/{job_id}/{path}", accept="text/csv",
                                                     stream=True, ok=(200, 204)), delimiter)

    def _iter_csv(self, make_request: Callable[[], ApiRequest], delimiter: str = ",",
                  on_response: Callable[[Any], None] | None = None) -> Iterator[dict[str, str]]:
        """Stream one CSV resource; if the connection breaks mid-body, fetch it again and skip what was read."""
        import requests
        import urllib3

        done = 0
        failures = 0
        while True:
            resp = self.client.send(make_request())
            try:
                if on_response is not None:
                    on_response(resp)
                if resp.status_code == 204:
                    return
                body = io.BufferedReader(ChunkStream(resp.iter_content(1 << 16)), 1 << 16)
                for i, row in enumerate(iter_csv_records(body, delimiter)):
                    if i >= done:
                        done += 1
                        yield row
                return
            except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
                failures += 1
                if failures >= self.retry_policy.max_attempts:
                    raise SalesforceConnectionError(0, type(exc).__name__, f"result stream broke {failures} times: "
                                                    f"{exc}", method="GET", url=resp.url, attempts=failures) from exc
                delay = self.retry_policy.backoff(failures)
                self.log.warning("Result stream %s broke after %d rows (%s); reading it again in %.1fs",
                                 resp.url.split("?")[0], done, type(exc).__name__, delay)
                time.sleep(delay)
            finally:
                resp.close()

    # -- Bulk API 2.0 query ------------------------------------------------------------------------------------------
    def iter_query(self, soql: str, max_records: int | None = None, *, include_deleted: bool = False,
                   timeout: float = 3600.0, poll_interval: float = 1.0,
                   max_poll_interval: float = 15.0) -> Iterator[dict[str, str]]:
        """Rows of a Bulk API 2.0 query job, page by page (``Sforce-Locator`` until ``null``), never all in memory.

        Values are strings as Salesforce writes them (empty string for null).

        :param soql: The SOQL query (no aggregates, GROUP BY or OFFSET in Bulk queries).
        :param max_records: Rows per results page (``maxRecords``); Salesforce's default when ``None``.
        :param include_deleted: ``queryAll`` instead of ``query``.
        :param timeout: Seconds to wait for the job to complete before raising ``TimeoutError``.
        """
        job = self.client.request_json("POST", "jobs/query", json_body={
            "operation": "queryAll" if include_deleted else "query", "query": soql, "contentType": "CSV",
            "columnDelimiter": "COMMA", "lineEnding": "LF"})
        job_id = job["id"]
        wait = self._wait(f"jobs/query/{job_id}", job_id, timeout, poll_interval, max_poll_interval)
        if not wait.finished:
            raise TimeoutError(f"Bulk API 2.0 query job {job_id} still {wait.state} after {timeout:.0f}s")
        if not wait.succeeded:
            raise BulkJobFailed(job_id, wait.state, wait.error_message or "")
        page: dict[str, Any] = {"locator": None}

        def make_request() -> ApiRequest:
            params: dict[str, Any] = {"maxRecords": max_records} if max_records else {}
            if page["locator"]:
                params["locator"] = page["locator"]
            return ApiRequest("GET", f"jobs/query/{job_id}/results", params=params, accept="text/csv", stream=True)

        def remember(resp: Any) -> None:
            page["next"] = resp.headers.get("Sforce-Locator")

        while True:
            page["next"] = None
            yield from self._iter_csv(make_request, ",", remember)
            if not page["next"] or page["next"] == "null":
                return
            page["locator"] = page["next"]

    # -- async (triggers) --------------------------------------------------------------------------------------------
    async def aget_job(self, job_id: str) -> dict[str, Any]:
        """Async :meth:`get_job` (``httpx``, non-blocking connection lookup)."""
        client = await self.aget_client()
        return await client.arequest_json("GET", f"jobs/ingest/{job_id}")

    async def aabort_job(self, job_id: str) -> dict[str, Any]:
        """Async :meth:`abort_job` (for a trigger's ``on_kill``)."""
        client = await self.aget_client()
        try:
            return await client.arequest_json("PATCH", f"jobs/ingest/{job_id}", json_body={"state": "Aborted"})
        except SalesforceApiError as exc:
            if exc.attempts > 1 and exc.error_code == "INVALIDJOBSTATE":
                info = await self.aget_job(job_id)
                if info.get("state") == "Aborted":
                    return info
            raise

    async def apoll_in_order(self, job_ids: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """Poll jobs one after another, oldest first, up to and including the first one still running.

        Salesforce works through an org's jobs roughly in the order they were closed, so while the oldest job runs
        the later ones almost always run too: one request per round tells "not yet", and each job is asked once
        more when its turn comes. This keeps the API requests of a wait near (rounds + jobs) instead of
        (rounds × jobs).

        :return: ``(job_id, info)`` for each job asked, in order; the last one is the first still running (if any).
        """
        polled: list[tuple[str, dict[str, Any]]] = []
        for job_id in job_ids:
            info = await self.aget_job(job_id)
            polled.append((job_id, info))
            if info.get("state", "") not in TERMINAL_STATES:
                break
        return polled

    async def await_jobs(self, job_ids: Iterable[str], timeout: float, poll_interval: float = 2.0,
                         max_poll_interval: float = 30.0) -> dict[str, JobWait]:
        """Poll many ingest jobs until all are terminal or ``timeout`` seconds pass.

        Each round asks the unfinished jobs oldest first up to the first one still running
        (:meth:`apoll_in_order`); the interval between rounds backs off like :meth:`wait_for_job`.

        :return: a :class:`JobWait` per job id, in the given order; ``finished=False`` for jobs still running
            at the deadline (or never asked because an older one was still running).
        """
        ids = list(dict.fromkeys(job_ids))
        results = {j: JobWait(j, "", {}, False) for j in ids}
        deadline = time.monotonic() + timeout
        backoff = _PollBackoff(poll_interval, max_poll_interval)
        pending = ids
        while True:
            for job_id, info in await self.apoll_in_order(pending):
                state = info.get("state", "")
                results[job_id] = JobWait(job_id, state, info, state in TERMINAL_STATES)
            pending = [j for j in pending if not results[j].finished]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                return results
            await asyncio.sleep(min(backoff(), remaining))

    async def aclose(self) -> None:
        """Close the async client's connections."""
        if "client" in self.__dict__:
            await self.client.aclose()

"""Plain-HTTP pieces the non-Airflow contenders share: session, token, Data Cloud reads, checks.

Deliberately *not* our hooks: the replaced design and the plain-library way are reproduced with what their
authors had (Apex callouts / simple-salesforce and ``requests``), so the comparison measures designs, not our
client code. Every session trusts the emulator's CA only: ``trust_env=False`` because this machine sets
``REQUESTS_CA_BUNDLE``, which would override ``session.verify``; TLS is never switched off.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
SYNC_CONFIG = ROOT / "include" / "sync_config.yaml"
LOCK_CODE = "UNABLE_TO_LOCK_ROW"


def sync_settings() -> dict[str, Any]:
    """The package's settings file: the same DMO, key and column -> field mapping for every contender."""
    return yaml.safe_load(SYNC_CONFIG.read_text())


def make_session(conn: dict[str, Any]) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override ``verify``
    session.verify = conn["ca_bundle"]
    return session


def access_token(session: requests.Session, conn: dict[str, Any]) -> str:
    """A core session through the client-credentials flow (what an integration user's connected app gets)."""
    resp = session.post(f"{conn['instance_url']}/services/oauth2/token", data={"grant_type": "client_credentials"},
                        auth=(conn["client_id"], conn["client_secret"]), timeout=60)
    resp.raise_for_status()
    return resp.json()["access_token"]


def data_url(conn: dict[str, Any]) -> str:
    return f"{conn['instance_url']}/services/data/v{conn['api_version']}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def csv_value(value: Any) -> str:
    """A Data Cloud JSON value as Bulk CSV text (numbers keep their JSON literal, see :func:`loads`)."""
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def loads(raw: bytes) -> Any:
    # Numbers stay as their JSON text: no float round trip changes an Amount on the way to Salesforce.
    return json.loads(raw, parse_float=str, parse_int=str)


class QuerySql:
    """``/ssot/query-sql`` with plain requests: submit, wait for ``Finished``, page ``/rows``."""

    def __init__(self, session: requests.Session, conn: dict[str, Any], token: str,
                 workload: str = "bench", cancel: bool = False) -> None:
        self.session = session
        self.cancel = cancel  # DELETE the query when read (neither the Apex design nor a plain export does)
        self.base = f"{data_url(conn)}/ssot/query-sql"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.params = {"dataspace": "default", "workloadName": workload}

    def rows(self, sql: str, row_limit: int | None = None) -> Iterator[list[Any]]:
        """Every row of ``sql`` in order. ``row_limit`` caps the first chunk and each page."""
        body: dict[str, Any] = {"sql": sql}
        if row_limit is not None:
            body["rowLimit"] = row_limit
        resp = self.session.post(self.base, params=self.params, json=body, headers=self.headers, timeout=600)
        _raise(resp)
        first = loads(resp.content)
        status = first["status"]
        qid = status["queryId"]
        yield from first["data"]
        offset = int(first["returnedRows"])
        try:
            while status.get("completionStatus") not in ("Finished", "ResultsProduced"):
                r = self.session.get(f"{self.base}/{qid}", params={**self.params, "waitTimeMs": 10000},
                                     headers=self.headers, timeout=600)
                _raise(r)
                status = loads(r.content)
            total = int(status["rowCount"])
            while offset < total:
                params = {**self.params, "offset": offset, "omitSchema": "true"}
                if row_limit is not None:
                    params["rowLimit"] = row_limit
                r = self.session.get(f"{self.base}/{qid}/rows", params=params, headers=self.headers, timeout=600)
                _raise(r)
                page = loads(r.content)
                n = int(page["returnedRows"])
                if not n:
                    raise RuntimeError(f"Data Cloud returned no rows at offset {offset} of {total}")
                yield from page["data"]
                offset += n
        finally:
            if self.cancel:
                self.session.delete(f"{self.base}/{qid}", params=self.params, headers=self.headers, timeout=60)

    def scalar_row(self, sql: str) -> list[Any]:
        rows = list(self.rows(sql))
        if len(rows) != 1:
            raise RuntimeError(f"expected one row from {sql!r}, got {len(rows)}")
        return rows[0]


def _raise(resp: requests.Response) -> None:
    if resp.status_code >= 400:
        raise RuntimeError(f"{resp.request.method} {resp.url} -> {resp.status_code}: {resp.text[:500]}")


def write_csv(rows: Iterable[list[Any]], header: list[str], out: io.TextIOBase | Any) -> int:
    """Bulk CSV (comma, CRLF, minimal quoting) from Data Cloud rows; returns the row count.

    CRLF because Python's csv writer quotes a field only for the characters of its line terminator: with ``"\n"``
    a value holding a bare CR goes out unquoted, and both csv readers and the org then split the row there (the
    seed has such values). With ``"\r\n"`` every value holding CR or LF is quoted.
    """
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    n = 0
    for row in rows:
        writer.writerow([csv_value(v) for v in row])
        n += 1
    return n


# -- checks after a run ------------------------------------------------------------------------------------------
def count_opportunities(session: requests.Session, conn: dict[str, Any], token: str) -> int:
    """Salesforce's count of Opportunities that carry an external id (what the sync creates)."""
    resp = session.get(f"{data_url(conn)}/query", params={"q": "SELECT COUNT() FROM Opportunity "
                                                                 "WHERE ExternalId__c != null"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=300)
    _raise(resp)
    return int(resp.json()["totalSize"])


def dmo_counts(session: requests.Session, conn: dict[str, Any], token: str) -> dict[str, int]:
    """Rows of the DMO, with and without an external id."""
    s = sync_settings()["source"]
    q = QuerySql(session, conn, token, workload="bench-check")
    total, keyed = q.scalar_row(f"SELECT COUNT(*), COUNT({quote_ident(s['key_column'])}) "
                                f"FROM {quote_ident(s['dmo'])}")
    return {"rows": int(total), "keyed_rows": int(keyed)}


def iter_ingest_jobs(session: requests.Session, conn: dict[str, Any], token: str) -> Iterator[dict[str, Any]]:
    """Every ingest job of the org (``GET /jobs/ingest``, following ``nextRecordsUrl``)."""
    headers = {"Authorization": f"Bearer {token}"}
    url: str | None = f"{data_url(conn)}/jobs/ingest"
    while url:
        resp = session.get(url, headers=headers, timeout=120)
        _raise(resp)
        body = resp.json()
        yield from body.get("records") or []
        nxt = body.get("nextRecordsUrl")
        url = f"{conn['instance_url']}{nxt}" if nxt and not body.get("done") else None


def lock_failed_keys(session: requests.Session, conn: dict[str, Any], token: str,
                     external_id_field: str = "ExternalId__c", account_field: str = "Account.ExternalId__c",
                     by_account: dict[str, int] | None = None) -> tuple[set[str], int]:
    """External ids that failed with ``UNABLE_TO_LOCK_ROW`` in any job, and the number of such failures.

    A row fails on locks at most once per job (the org never retries a failed row), and a client only re-sends a
    row after it failed, so the *distinct* keys are the rows that failed on their first attempt; the total counts
    every failed attempt, follow-up jobs included. ``by_account`` (if given) receives first-attempt failures per
    parent Account.
    """
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/csv"}
    keys: set[str] = set()
    total = 0
    for job in iter_ingest_jobs(session, conn, token):  # the list carries no counts: ask every job
        resp = session.get(f"{data_url(conn)}/jobs/ingest/{job['id']}/failedResults", headers=headers,
                           timeout=600)
        if resp.status_code == 404:
            continue
        _raise(resp)
        for row in csv.DictReader(io.StringIO(resp.content.decode("utf-8"), newline="")):
            if (row.get("sf__Error") or "").startswith(LOCK_CODE):
                total += 1
                key = row.get(external_id_field) or ""
                if key not in keys and by_account is not None:
                    acc = row.get(account_field) or ""
                    by_account[acc] = by_account.get(acc, 0) + 1
                keys.add(key)
    return keys, total


def wait_until(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def child_main(module: str, run: Callable[..., dict[str, Any]], argv: list[str]) -> None:
    """Entry point of a contender's child process: ``python -m <module> --child OUT.json``, payload on stdin.

    The payload is ``{"conn": <emulator connection info>, "options": {...}}``; ``run(conn, **options)``'s
    result goes to ``OUT.json``.
    """
    if len(argv) != 2 or argv[0] != "--child":
        raise SystemExit(f"usage: python -m {module} --child OUT.json  (payload on stdin; run by python -m bench.run)")
    payload = json.loads(sys.stdin.read())
    result = run(payload["conn"], **payload.get("options", {}))
    with open(argv[1], "w") as fh:
        json.dump(result, fh)

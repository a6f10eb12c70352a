"""The org's state: credentials, SQLite databases, sessions, statistics and injected faults."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import DEFAULT_API_VERSION
from .ids import make_id
from .profiles import Profile
from .schema import DMO_COLUMNS, DMO_NAME, OBJECTS
from .tls import TlsFiles, ensure_tls

ORG_NUMBER = 1
USER_NUMBER = 1


@dataclass(frozen=True)
class Credentials:
    """What the integration user and its connected app log in with. Generated once per data directory."""

    org_id: str
    user_id: str
    username: str
    password: str
    client_id: str
    client_secret: str
    data_cloud_tenant: str

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        if path.exists():
            return cls(**json.loads(path.read_text()))
        creds = cls(
            org_id=make_id("00D", ORG_NUMBER),
            user_id=make_id("005", USER_NUMBER),
            username="integration@datacloud-sync.emulator",
            password=secrets.token_urlsafe(18),
            client_id="3MVG9" + secrets.token_urlsafe(60).replace("-", "A").replace("_", "B"),
            client_secret=secrets.token_hex(32).upper(),
            data_cloud_tenant="emulator.c360a.salesforce.com",
        )
        path.write_text(json.dumps(creds.__dict__, indent=2))
        path.chmod(0o600)
        return creds


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection tuned for one writer and many readers (WAL), usable from the thread that opened it."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=60000")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def _create_sobject_tables(conn: sqlite3.Connection) -> None:
    for obj in OBJECTS.values():
        cols = ", ".join(
            f'"{f.name}" {f.sql_type}' + (" PRIMARY KEY" if f.name == "Id" else "") for f in obj.fields
        )
        conn.execute(f'CREATE TABLE IF NOT EXISTS "{obj.name}" ({cols})')
        for f in obj.fields:
            if f.unique and f.name != "Id":
                conn.execute(f'CREATE UNIQUE INDEX IF NOT EXISTS "ux_{obj.name}_{f.name}" ON "{obj.name}"("{f.name}")')
    conn.execute('CREATE INDEX IF NOT EXISTS "ix_Opportunity_AccountId" ON "Opportunity"("AccountId")')


ORG_DDL = """
CREATE TABLE IF NOT EXISTS oauth_tokens (
    token TEXT PRIMARY KEY, kind TEXT NOT NULL, user_id TEXT NOT NULL, client_id TEXT, scope TEXT,
    issued_at REAL NOT NULL, expires_at REAL, revoked INTEGER NOT NULL DEFAULT 0, audience TEXT
);
CREATE TABLE IF NOT EXISTS sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_usage (day TEXT PRIMARY KEY, requests INTEGER NOT NULL, bulk_batches INTEGER NOT NULL,
    bulk_records INTEGER NOT NULL);
"""


def init_org_db(conn: sqlite3.Connection) -> None:
    _create_sobject_tables(conn)
    conn.executescript(ORG_DDL)
    conn.commit()


def init_datacloud_db(conn: sqlite3.Connection) -> None:
    cols = ", ".join(f'"{name}" {"REAL" if t == "Numeric" else "TEXT"}' for name, t in DMO_COLUMNS.items())
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{DMO_NAME}" ({cols})')
    conn.commit()


class Stats:
    """Counters read by ``GET /__emulator/stats``: requests per endpoint, bulk work, failures by code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests: Counter[str] = Counter()
            self.status_codes: Counter[str] = Counter()
            self.faults_injected: Counter[str] = Counter()
            self.counters: Counter[str] = Counter()
            self.failures_by_code: Counter[str] = Counter()
            self.upload_digests: Counter[str] = Counter()
            self.started_at = time.time()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            self.status_codes[str(status)] += 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def failure(self, code: str, n: int = 1) -> None:
        with self._lock:
            self.failures_by_code[code] += n

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults_injected[kind] += 1

    def upload(self, digest: str) -> None:
        with self._lock:
            self.upload_digests[digest] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "since": self.started_at,
                "requests_total": sum(self.requests.values()),
                "requests": dict(self.requests),
                "status_codes": dict(self.status_codes),
                "faults_injected": dict(self.faults_injected),
                "failures_by_code": dict(self.failures_by_code),
                "duplicate_uploads": sum(c - 1 for c in self.upload_digests.values() if c > 1),
                **dict(self.counters),
            }


@dataclass
class FaultRule:
    """Answer ``status`` to a share ``rate`` of requests whose path matches ``path`` (a regex)."""

    path: str = ".*"
    status: int = 503
    rate: float = 1.0
    methods: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    retry_after: int | None = None
    remaining: int | None = None  # stop after this many injections


class Org:
    """Everything one emulated org owns; the ASGI app and the background workers share one instance."""

    def __init__(self, data_dir: Path, profile: Profile, host: str = "127.0.0.1", port: int = 8443) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.host = host
        self.port = port
        self.api_version = DEFAULT_API_VERSION
        self.tls: TlsFiles = ensure_tls(self.data_dir / "tls")
        self.credentials = Credentials.load_or_create(self.data_dir / "credentials.json")
        self.org_db_path = self.data_dir / "org.sqlite"
        self.datacloud_db_path = self.data_dir / "datacloud.sqlite"
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(exist_ok=True)
        self.stats = Stats()
        self.fault_rules: list[FaultRule] = []
        self.lock = threading.RLock()
        self._local = threading.local()
        with connect(self.org_db_path) as conn:
            init_org_db(conn)
        with connect(self.datacloud_db_path) as conn:
            init_datacloud_db(conn)
        self._ensure_singletons()

    # -- addresses ---------------------------------------------------------------------------------------
    @property
    def instance_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def identity_url(self) -> str:
        return f"{self.instance_url}/id/{self.credentials.org_id}/{self.credentials.user_id}"

    # -- databases ---------------------------------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        """The calling thread's connection to the org database (created on first use)."""
        conn = getattr(self._local, "org", None)
        if conn is None:
            conn = self._local.org = connect(self.org_db_path)
        return conn

    def datacloud_db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "dc", None)
        if conn is None:
            conn = self._local.dc = connect(self.datacloud_db_path)
        return conn

    def next_number(self, name: str, n: int = 1, conn: sqlite3.Connection | None = None) -> int:
        """Reserve ``n`` serial numbers for ``name``; returns the first. Survives restarts.

        ``conn``: the org-database connection to write through (default: the calling thread's). The bulk engine
        passes its writer: a commit by any other connection makes SQLite drop the writer's whole page cache at its
        next transaction, and it would then read its indexes back from disk. When ``conn`` is inside a write
        transaction (``BEGIN IMMEDIATE``) the numbers are taken in that transaction, which commits or rolls them back
        with its own writes; holding the database's write lock already makes the read-modify-write atomic, and
        taking ``self.lock`` there could deadlock with a thread that holds it while waiting for that write lock."""
        conn = conn if conn is not None else self.db()
        if conn.in_transaction:
            return self._take_numbers(conn, name, n)
        with self.lock:
            # The read belongs in the write transaction too: a value read before another connection's commit of
            # the same sequence would hand out its numbers again.
            conn.execute("BEGIN IMMEDIATE")
            try:
                start = self._take_numbers(conn, name, n)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            return start

    @staticmethod
    def _take_numbers(conn: sqlite3.Connection, name: str, n: int) -> int:
        row = conn.execute("SELECT value FROM sequences WHERE name=?", (name,)).fetchone()
        start = (row[0] if row else 0) + 1
        conn.execute("INSERT INTO sequences(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value=?",
                     (name, start + n - 1, start + n - 1))
        return start

    def _ensure_singletons(self) -> None:
        conn = self.db()
        c = self.credentials
        now = "2026-01-01T00:00:00.000+0000"
        conn.execute(
            'INSERT OR IGNORE INTO "Organization"(Id, Name, OrganizationType, InstanceName, IsSandbox) '
            "VALUES(?, 'Data Cloud Sync Emulator', 'Enterprise Edition', 'EMU1', 0)", (c.org_id,))
        conn.execute(
            'INSERT OR IGNORE INTO "User"(Id, IsDeleted, CreatedDate, CreatedById, LastModifiedDate, LastModifiedById,'
            " SystemModstamp, Username, Name, FirstName, LastName, Email, IsActive, UserType, TimeZoneSidKey) "
            "VALUES(?, 0, ?, ?, ?, ?, ?, ?, 'Integration User', 'Integration', 'User', 'integration@example.com', 1,"
            " 'Standard', 'GMT')", (c.user_id, now, c.user_id, now, c.user_id, now, c.username))
        conn.commit()

    # -- connection file -----------------------------------------------------------------------------------
    def connection_info(self) -> dict[str, Any]:
        c = self.credentials
        extra = {
            "instance_url": self.instance_url,
            "login_url": self.instance_url,
            "consumer_key": c.client_id,
            "consumer_secret": c.client_secret,
            "client_id": c.client_id,
            "version": self.api_version,
            "ca_bundle": str(self.tls.ca_cert),
            # simple-salesforce builds https://{domain}.salesforce.com/...; the query string swallows the suffix,
            # so the provider's own SalesforceHook logs in against this emulator unchanged.
            "domain": f"{self.host}:{self.port}/services/oauth2/token?via=",
        }
        airflow_conn = {"conn_type": "salesforce", "login": c.username, "password": c.password, "extra": extra}
        return {
            "instance_url": self.instance_url,
            "login_url": self.instance_url,
            "client_id": c.client_id,
            "client_secret": c.client_secret,
            "username": c.username,
            "password": c.password,
            "org_id": c.org_id,
            "user_id": c.user_id,
            "api_version": self.api_version,
            "jwt_private_key": str(self.tls.jwt_key),
            "jwt_certificate": str(self.tls.jwt_cert),
            "ca_bundle": str(self.tls.ca_cert),
            "data_cloud_tenant": c.data_cloud_tenant,
            "control_url": f"{self.instance_url}/__emulator",
            "airflow_conn": json.dumps(airflow_conn),
        }

    def write_connection_file(self) -> Path:
        path = self.data_dir / "connection.json"
        path.write_text(json.dumps(self.connection_info(), indent=2))
        path.chmod(0o600)
        return path

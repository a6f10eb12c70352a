"""Fixtures for hook tests: Airflow connections pointing at the live emulator, fast retry budgets."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from sf_datacloud_sync.hooks._http import RetryPolicy

# Retries in tests wait milliseconds, not seconds (Retry-After still wins).
FAST_RETRY = RetryPolicy(max_attempts=6, max_elapsed=30.0, base_delay=0.01, max_delay=0.1)
# Profile settings tests change; the emulator's ``clear_faults`` resets only a few of them.
KNOBS = ("session_lifetime_s", "per_record_ms", "dc_result_ttl_s", "dc_first_page_max_rows", "dc_page_max_bytes",
         "job_dequeue_delay_s", "fail_job_after_records", "lock_contention_rate")


@contextlib.contextmanager
def knobs_restored(emulator):
    """Put the emulator's timing and fault knobs back afterwards."""
    before = emulator.control("GET", "faults")
    try:
        yield
    finally:
        emulator.set_faults(**{k: before[k] for k in KNOBS if k in before})


@pytest.fixture(autouse=True)
def _restore_emulator_knobs(request):
    if "emulator" not in request.fixturenames:
        yield
        return
    with knobs_restored(request.getfixturevalue("emulator")):
        yield


@pytest.fixture
def make_conn(emulator, monkeypatch) -> Callable[..., str]:
    """Register an Airflow connection (env var) derived from the emulator's; returns its conn_id.

    ``drop`` removes top-level fields or extras; keyword arguments set extras (``login``/``password`` set
    the top-level fields).
    """
    counter = iter(range(1000))

    def make(conn_id: str | None = None, *, drop: tuple[str, ...] = (), **values: Any) -> str:
        conn = json.loads(emulator.info["airflow_conn"])
        for key in drop:
            conn.pop(key, None)
            conn["extra"].pop(key, None)
        for key, value in values.items():
            if key in ("login", "password"):
                conn[key] = value
            else:
                conn["extra"][key] = value
        conn_id = conn_id or f"sf_test_{next(counter)}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
        return conn_id

    return make


@pytest.fixture
def sf_default(emulator, monkeypatch) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", emulator.info["airflow_conn"])
    return "salesforce_default"


@pytest.fixture
def bulk(clean_emulator, sf_default):
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    hook = SalesforceBulk2Hook(retry=FAST_RETRY)
    yield hook
    hook.close()


def requests_to(emulator, fragment: str, method: str | None = None) -> int:
    """Requests the emulator counted on endpoints containing ``fragment`` (optionally one method).

    The emulator counts a request after its response is sent (streamed bodies last), so the figures are read
    until two reads 50 ms apart agree.
    """
    def count() -> int:
        return sum(n for key, n in emulator.stats()["requests"].items()
                   if fragment in key and (method is None or key.startswith(method + " ")))

    last = count()
    for _ in range(20):
        time.sleep(0.05)
        now = count()
        if now == last:
            return now
        last = now
    return last


def mint_refresh_token(emulator) -> str:
    """A refresh token the emulator will honour (its HTTP surface has no flow that issues one)."""
    token = "5Aep861refresh" + str(time.time_ns())
    with sqlite3.connect(emulator.data_dir / "org.sqlite", timeout=30) as db:
        db.execute("INSERT INTO oauth_tokens(token, kind, user_id, client_id, scope, issued_at, expires_at, audience)"
                   " VALUES(?, 'refresh', ?, ?, 'api refresh_token', ?, NULL, 'core')",
                   (token, emulator.info["user_id"], emulator.info["client_id"], time.time()))
    return token


def other_ca(tmp_path) -> str:
    """A CA bundle with an unrelated, freshly made CA: the emulator's certificate does not chain to it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some other CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    from sf_datacloud_sync.utils.csv_encoder import CsvEncoder

    enc = CsvEncoder(header)
    return enc.header_bytes + enc.encode_rows(rows)

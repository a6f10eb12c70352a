"""Security checks that need no DAG run (the log scans run inside the fault scenarios 1 and 2, and the
real-executor scenario scans ``AIRFLOW_HOME/logs``; TLS misconfigurations are in ``test_bad_config``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_support import ROOT


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_emulator_refuses_non_loopback_binds(tmp_path: Path, host: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "emulator", "serve", "--data-dir", str(tmp_path), "--host", host,
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "loopback" in proc.stderr or "does not resolve" in proc.stderr, proc.stderr
    assert not (tmp_path / "connection.json").exists()  # it never listened


@pytest.mark.parametrize("extra", [{"insecure": True}, {"extra__salesforce__verify": "false"},
                                   {"verify_ssl": "no"}, {"ca_bundle": False}])
def test_tls_verification_cannot_be_switched_off(extra: dict) -> None:
    from types import SimpleNamespace

    from sf_datacloud_sync.hooks._http import ConnectionConfig, SalesforceConfigError

    conn = SimpleNamespace(conn_id="c", login="u", password="p", extra_dejson={"client_id": "x", **extra})
    with pytest.raises(SalesforceConfigError, match="disable TLS certificate verification"):
        ConnectionConfig.from_connection(conn, lambda extras, name: extras.get(name))

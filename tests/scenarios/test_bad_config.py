"""Bad configuration: the run stops in ``discover``, before any Bulk job exists, with a message naming the problem.

Every case runs ``discover``'s task body against the live emulator (connection variants through
``AIRFLOW_CONN_SALESFORCE_DEFAULT``, settings through a temp YAML); one case also runs the whole DAG to show that
the partitions never start. The emulator's statistics prove nothing was written: no ingest job was created.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulator.harness import EmulatorProcess
from tests.e2e_support import environ, run, states, write_settings


class NoPush:
    def xcom_push(self, **_: Any) -> None:
        raise AssertionError("discover must not plan anything for a broken setup")


def ingest_jobs_created(org: EmulatorProcess) -> int:
    stats = org.stats()
    posts = sum(n for k, n in stats["requests"].items() if k.startswith("POST") and k.endswith("/jobs/ingest"))
    return posts + stats.get("bulk_jobs_created", 0)


def conn_variant(org: EmulatorProcess, change: Callable[[dict[str, Any]], None]) -> str:
    conn = json.loads(org.info["airflow_conn"])
    change(conn)
    return json.dumps(conn)


def _wrong_secret(c: dict[str, Any]) -> None:
    c["password"] = "not-the-password"
    c["extra"]["consumer_secret"] = "0" * 64


def _wrong_ca(tmp: Path) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        # A real CA, but not the one that signed the emulator's certificate.
        import certifi

        c["extra"]["ca_bundle"] = certifi.where()

    return change


CONNECTION_CASES: list[tuple[str, Callable[..., Any], str]] = [
    ("wrong-secret", lambda tmp: _wrong_secret, "invalid_client: invalid client credentials"),
    ("wrong-ca", _wrong_ca, "certificate verify failed"),
    ("verify-false", lambda tmp: lambda c: c["extra"].update(verify=False), "would disable TLS certificate verification"),
    ("ca-missing-file", lambda tmp: lambda c: c["extra"].update(ca_bundle=str(tmp / "nope.pem")),
     "is not a file"),
]
SETTINGS_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("unknown-dmo", lambda s: s["source"].update(dmo="Missing__dlm"), "Data Cloud object Missing__dlm cannot be read"),
    ("unknown-column", lambda s: s["mapping"].update(Nope__c="Name"),
     "column Nope__c does not exist in Data Cloud object Opportunity_Sync__dlm"),
    ("unknown-object", lambda s: s["target"].update(object="Opportunityy"), "Opportunityy"),
    ("unknown-field", lambda s: s["mapping"].update(Type__c="Foo__c"), "field Foo__c does not exist on Opportunity"),
    ("non-writable-field", lambda s: s["mapping"].update(Type__c="IsClosed"),
     "field IsClosed on Opportunity is not createable/updateable"),
    ("missing-connection", lambda s: s.update(salesforce_conn_id="no_such_conn"), "no_such_conn"),
]


def _discover_fails(org: EmulatorProcess, config: Path) -> str:
    from sf_datacloud_sync.discover import run_discover

    org.control("POST", "stats/reset")
    with pytest.raises(Exception) as err:  # noqa: PT011 - the type differs (config, auth, TLS); the message matters
        run_discover({"partitions": 3, "partition_key": "account"}, NoPush(), config_path=str(config))
    assert ingest_jobs_created(org) == 0
    return str(err.value)


@pytest.mark.parametrize(("case", "make", "problem"), CONNECTION_CASES, ids=[c[0] for c in CONNECTION_CASES])
def test_connection_problems_stop_discover(org: EmulatorProcess, scen_airflow: Path, tmp_path: Path,
                                           case: str, make: Any, problem: str) -> None:
    with environ(AIRFLOW_CONN_SALESFORCE_DEFAULT=conn_variant(org, make(tmp_path))):
        message = _discover_fails(org, Path(scen_airflow / "sync_config.yaml"))
    assert problem in message, message
    for secret in ("not-the-password", "0" * 64, org.info["password"], org.info["client_secret"]):
        assert secret not in message


@pytest.mark.parametrize(("case", "change", "problem"), SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_settings_problems_stop_discover(org: EmulatorProcess, tmp_path: Path, case: str, change: Any,
                                         problem: str) -> None:
    message = _discover_fails(org, write_settings(tmp_path / "case.yaml", change))
    assert problem in message, message


def test_a_broken_setup_fails_the_run_in_discover(scen_dag: Any, org: EmulatorProcess, tmp_path: Path) -> None:
    """The whole DAG with a mapping to a read-only field: discover fails, no partition runs, nothing is written."""
    broken = write_settings(tmp_path / "broken.yaml", lambda s: s["mapping"].update(Type__c="IsClosed"))
    with environ(SYNC_CONFIG_PATH=str(broken)):
        dr = run(scen_dag, org, partitions=2)
    result = states(dr)
    assert result[("discover", -1)] == "failed"
    assert result[("load_partition", -1)] == "upstream_failed"
    assert result[("verify", -1)] == "failed"
    assert ingest_jobs_created(org) == 0


def test_missing_connection_stops_discover(org: EmulatorProcess, scen_airflow: Path) -> None:
    """No ``AIRFLOW_CONN_SALESFORCE_DEFAULT`` and no such connection in the metadata DB."""
    with environ(AIRFLOW_CONN_SALESFORCE_DEFAULT=None):
        message = _discover_fails(org, Path(scen_airflow / "sync_config.yaml"))
    assert "salesforce_default" in message, message

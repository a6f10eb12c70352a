"""Shared fixtures: an isolated Airflow home and a live emulator over HTTPS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Airflow reads its configuration at import: set it before anything imports airflow.
_AIRFLOW_HOME = ROOT / ".airflow_test_home"
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
# Tests run triggers in-process (dag.test), where the scheduler race that min_defer_s guards against cannot occur.
os.environ.setdefault("SYNC_MIN_DEFER_S", "0")
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from emulator.harness import EmulatorProcess  # noqa: E402


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory):
    """One emulator for the session, seeded with a small data set; tests that change it reset what they touch."""
    data_dir = tmp_path_factory.mktemp("emulator")
    proc = EmulatorProcess(data_dir)
    proc.seed(records=2_000, accounts=50, random_seed=7, bad_rows=20)
    with proc:
        yield proc


@pytest.fixture
def clean_emulator(emulator: EmulatorProcess):
    """The session emulator with no faults, no Opportunities and fresh stats, before and after the test."""
    emulator.reset()
    yield emulator
    emulator.clear_faults()
    emulator.reset()


@pytest.fixture
def sf_session(emulator: EmulatorProcess):
    """A ``requests.Session`` that trusts the emulator's CA and carries a fresh bearer token."""
    import requests

    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override ``verify``
    session.verify = emulator.ca_bundle
    session.headers["Authorization"] = f"Bearer {emulator.access_token()}"
    return session

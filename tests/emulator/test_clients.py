"""Contract tests: clients nobody here wrote (simple-salesforce 1.12.10, the Airflow Salesforce provider) against
the emulator over HTTPS, trusting its CA through ``REQUESTS_CA_BUNDLE`` (never ``verify=False``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest, SalesforceResourceNotFound

from emulator.harness import EmulatorProcess
from emulator.ids import make_id
from emulator.rest import security_token
from emulator.state import Credentials, connect

N_OPPS = 2_300  # more than one 2,000-record page
ACCOUNTS = [(make_id("001", 1), "Acme", "ACC-1"), (make_id("001", 2), "O'Brien & Co", "K'ey\\1")]
QUERY_MORE = "GET /services/data/vXX.X/query/{id}"


def fill_org(data_dir: Path) -> None:
    creds = Credentials.load_or_create(data_dir / "credentials.json")
    conn = connect(data_dir / "org.sqlite")
    conn.executemany('INSERT INTO "Account"(Id, IsDeleted, OwnerId, Name, ExternalId__c) VALUES(?, 0, ?, ?, ?)',
                     [(i, creds.user_id, n, k) for i, n, k in ACCOUNTS])
    conn.executemany(
        'INSERT INTO "Opportunity"(Id, IsDeleted, OwnerId, AccountId, Name, StageName, Amount, CloseDate, '
        "ExternalId__c, IsClosed, IsWon) VALUES(?, 0, ?, ?, ?, 'Prospecting', ?, '2026-06-30', ?, 0, 0)",
        [(make_id("006", i), creds.user_id, ACCOUNTS[i % 2][0], f"Deal {i}", float(i), f"OPP-{i:05d}")
         for i in range(1, N_OPPS + 1)])
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    proc = EmulatorProcess(tmp_path_factory.mktemp("clients_org")).start()
    try:
        fill_org(proc.data_dir)
        with pytest.MonkeyPatch.context() as mp:
            # What a deployment does: the clients' requests sessions trust the emulator's CA.
            mp.setenv("REQUESTS_CA_BUNDLE", proc.ca_bundle)
            yield proc
    finally:
        # The clients keep pooled keep-alive connections the tests cannot reach; do not wait for them.
        proc.stop(kill=True)


@pytest.fixture(scope="module")
def extra(org: EmulatorProcess) -> dict:
    return json.loads(org.info["airflow_conn"])["extra"]


@pytest.fixture(scope="module")
def sf(org: EmulatorProcess, extra: dict) -> Salesforce:
    """OAuth username-password flow, exactly as the Airflow connection's fields drive it."""
    return Salesforce(username=org.info["username"], password=org.info["password"],
                      consumer_key=extra["consumer_key"], consumer_secret=extra["consumer_secret"],
                      domain=extra["domain"], version=extra["version"])


def test_login_points_the_client_at_the_emulator(org, sf):
    assert f"https://{sf.sf_instance}" == org.instance_url
    assert sf.base_url == f"{org.instance_url}/services/data/v{org.info['api_version']}/"


def test_query_and_query_all_across_pages(org, sf):
    one = sf.query("SELECT Id, Name FROM Account WHERE ExternalId__c = 'ACC-1'")
    assert one["totalSize"] == 1 and one["done"] is True
    assert one["records"][0]["Name"] == "Acme"
    assert one["records"][0]["attributes"] == {"type": "Account",
                                               "url": f"/services/data/v{sf.sf_version}/sobjects/Account/"
                                                      f"{ACCOUNTS[0][0]}"}
    before = org.stats()["requests"].get(QUERY_MORE, 0)
    everything = sf.query_all("SELECT Id, ExternalId__c, Account.ExternalId__c FROM Opportunity")
    assert everything["totalSize"] == N_OPPS
    assert len({r["Id"] for r in everything["records"]}) == N_OPPS
    assert org.stats()["requests"][QUERY_MORE] - before == 1
    assert everything["records"][0]["Account"]["ExternalId__c"] == "K'ey\\1"
    # Sforce-Query-Options is forwarded to every page by query_all.
    before += 1
    paged = sf.query_all("SELECT Id FROM Opportunity", headers={"Sforce-Query-Options": "batchSize=500"})
    assert paged["totalSize"] == N_OPPS
    assert org.stats()["requests"][QUERY_MORE] - before == 4


def test_count_and_quoted_keys(sf):
    assert sf.query("SELECT COUNT() FROM Opportunity WHERE ExternalId__c != null") == {
        "totalSize": N_OPPS, "done": True, "records": []}
    found = sf.query("SELECT Id FROM Account WHERE ExternalId__c = 'K\\'ey\\\\1'")
    assert [r["Id"] for r in found["records"]] == [ACCOUNTS[1][0]]


def test_describe_get_and_limits(org, sf):
    describe = sf.Opportunity.describe()
    names = [f["name"] for f in describe["fields"]]
    assert {"Id", "AccountId", "StageName", "CloseDate", "ExternalId__c"} <= set(names)
    assert {s["name"] for s in sf.describe()["sobjects"]} >= {"Account", "Opportunity"}
    assert sf.Account.metadata()["objectDescribe"]["keyPrefix"] == "001"
    acc = sf.Account.get(ACCOUNTS[0][0])
    assert (acc["Id"], acc["Name"], acc["ExternalId__c"]) == (ACCOUNTS[0][0], "Acme", "ACC-1")
    assert sf.Account.get_by_custom_id("ExternalId__c", "ACC-1")["Id"] == ACCOUNTS[0][0]
    limits = sf.limits()
    assert limits["DailyBulkApiBatches"]["Max"] == 15000
    usage = sf.api_usage["api-usage"]
    assert usage.total == limits["DailyApiRequests"]["Max"]
    assert usage.used == limits["DailyApiRequests"]["Max"] - limits["DailyApiRequests"]["Remaining"]


def test_errors_map_to_simple_salesforce_exceptions(sf):
    with pytest.raises(SalesforceMalformedRequest) as bad:
        sf.query("SELECT Bacon__c FROM Account")
    assert bad.value.status == 400 and bad.value.content[0]["errorCode"] == "INVALID_FIELD"
    with pytest.raises(SalesforceResourceNotFound) as missing:
        sf.Account.get(make_id("001", 999))
    assert missing.value.content == [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}]


def test_expired_session_is_renewed_by_the_client(org, extra):
    client = Salesforce(username=org.info["username"], password=org.info["password"],
                        consumer_key=extra["consumer_key"], consumer_secret=extra["consumer_secret"],
                        domain=extra["domain"], version=extra["version"])
    old = client.session_id
    org.control("POST", "sessions/expire")
    # The 401 [{"errorCode": "INVALID_SESSION_ID"}] list makes simple-salesforce log in again and retry.
    assert client.query("SELECT COUNT() FROM Account")["totalSize"] == 2
    assert client.session_id != old


def test_direct_session(org):
    with requests.Session() as session:
        client = Salesforce(instance_url=org.instance_url, session_id=org.access_token(), session=session,
                            version=org.info["api_version"])
        assert client.query("SELECT Id FROM Organization")["records"][0]["Id"] == org.info["org_id"]


def test_soap_login_with_security_token(org):
    creds = Credentials.load_or_create(org.data_dir / "credentials.json")
    host = org.instance_url.removeprefix("https://")
    client = Salesforce(username=creds.username, password=creds.password, security_token=security_token(creds),
                        domain=f"{host}/services/Soap/u/59.0?via=")
    assert client.sf_instance == host
    assert client.query("SELECT Id, Name FROM User")["records"][0]["Id"] == creds.user_id


def test_airflow_salesforce_hook(org, monkeypatch):
    from airflow.providers.salesforce.hooks.salesforce import SalesforceHook

    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", org.info["airflow_conn"])
    hook = SalesforceHook()
    assert hook.test_connection() == (True, "Connection successfully tested")
    assert "ExternalId__c" in hook.get_available_fields("Opportunity")
    result = hook.make_query("SELECT Id, Name FROM Opportunity")
    assert (result["totalSize"], result["done"]) == (N_OPPS, True)
    assert len(result["records"]) == N_OPPS

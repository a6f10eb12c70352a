"""SalesforceBulk2Hook against the emulator over real HTTPS: auth flows, REST, Bulk ingest/query, faults, async."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
import requests

from sf_datacloud_sync.hooks._http import (
    RetryPolicy,
    SalesforceApiError,
    SalesforceAuthError,
    SalesforceConfigError,
    SalesforceTlsError,
    _VerifyingAdapter,
)
from sf_datacloud_sync.hooks.salesforce_bulk2 import BulkUploadTooLarge, JobWait, SalesforceBulk2Hook
from sf_datacloud_sync.utils.results import parse_sf_error

from .conftest import FAST_RETRY, csv_bytes, mint_refresh_token, other_ca, requests_to

HEADER = ["ExternalId__c", "Name", "StageName", "CloseDate", "Account.ExternalId__c", "Description", "Amount"]


def opp_rows(n: int, prefix: str = "T", **overrides) -> list[list[str]]:
    rows = []
    for i in range(n):
        row = {"ExternalId__c": f"{prefix}-{i:05d}", "Name": f"Deal {i}", "StageName": "Prospecting",
               "CloseDate": "2026-03-31", "Account.ExternalId__c": f"ACC-{1 + i % 50:07d}",
               "Description": f"row {i}", "Amount": f"{i}.50"}
        row.update(overrides)
        rows.append([row[h] for h in HEADER])
    return rows


def hook(conn_id: str = "salesforce_default", **kwargs) -> SalesforceBulk2Hook:
    return SalesforceBulk2Hook(salesforce_conn_id=conn_id, retry=kwargs.pop("retry", FAST_RETRY), **kwargs)


class LoseResponses(_VerifyingAdapter):
    """Deliver matching requests to the server, then hand the client a 502 instead (a proxy lost the answer)."""

    def __init__(self, verify: str, method: str, times: int = 1) -> None:
        super().__init__(verify, max_retries=0)
        self.method = method
        self.left = times

    def send(self, request, **kwargs):
        resp = super().send(request, **kwargs)
        if request.method == self.method and self.left > 0:
            self.left -= 1
            resp.close()
            fake = requests.Response()
            fake.status_code = 502
            fake._content = b'[{"errorCode":"BAD_GATEWAY","message":"upstream answer lost"}]'
            fake.url = request.url
            fake.request = request
            return fake
        return resp


# -- authentication -------------------------------------------------------------------------------------------
def test_password_flow_and_test_connection(clean_emulator, sf_default):
    h = hook()
    assert h.connection_config.auth_type == "password"
    ok, message = h.test_connection()
    assert ok, message
    assert "password login" in message
    assert requests_to(clean_emulator, "oauth2/token") == 1
    assert requests_to(clean_emulator, "sobjects/Account/describe") == 1


def test_test_connection_reports_failure(clean_emulator, make_conn):
    ok, message = hook(make_conn(password="wrong-password-value")).test_connection()
    assert not ok
    assert "invalid_grant" in message and "wrong-password-value" not in message


def test_client_credentials_flow(clean_emulator, make_conn):
    h = hook(make_conn(drop=("login", "password")))
    assert h.connection_config.auth_type == "client_credentials"
    assert h.describe("Opportunity")["name"] == "Opportunity"


@pytest.mark.parametrize("inline", [False, True])
def test_jwt_bearer_flow(clean_emulator, make_conn, inline):
    key_path = clean_emulator.info["jwt_private_key"]
    extras = {"private_key": Path(key_path).read_text()} if inline else {"private_key_file_path": key_path}
    h = hook(make_conn(drop=("password", "consumer_secret"), **extras))
    assert h.connection_config.auth_type == "jwt"
    assert h.limits()["DailyApiRequests"]["Max"] > 0


def test_jwt_with_wrong_key_is_refused(clean_emulator, make_conn, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    h = hook(make_conn(drop=("password", "consumer_secret"), private_key=other))
    with pytest.raises(SalesforceAuthError, match="invalid_grant"):
        h.limits()


def test_refresh_token_flow(clean_emulator, make_conn):
    token = mint_refresh_token(clean_emulator)
    h = hook(make_conn(drop=("password",), refresh_token=token))
    assert h.connection_config.auth_type == "refresh_token"
    assert h.query_count("SELECT COUNT() FROM Account") == 50


def test_unknown_refresh_token_fails_at_once(clean_emulator, make_conn):
    h = hook(make_conn(refresh_token="5Aep-not-a-real-token", auth_type="refresh_token"))
    with pytest.raises(SalesforceAuthError) as info:
        h.limits()
    assert info.value.error_code == "invalid_grant" and info.value.attempts == 1
    assert "5Aep-not-a-real-token" not in str(info.value)


def test_provider_soap_login(clean_emulator, make_conn):
    # login + password + security_token: the provider's (simple-salesforce's) SOAP login, as SalesforceHook does.
    from emulator.rest import security_token
    from emulator.state import Credentials

    token = security_token(Credentials.load_or_create(clean_emulator.data_dir / "credentials.json"))
    host = clean_emulator.instance_url.removeprefix("https://")
    h = hook(make_conn(drop=("consumer_key", "consumer_secret", "client_id", "login_url"), security_token=token,
                       domain=f"{host}/services/Soap/u/62.0?via=", auth_type="provider"))
    assert h.connection_config.auth_type == "provider"
    assert token not in repr(h.connection_config)
    assert h.describe("Account")["name"] == "Account"
    assert requests_to(clean_emulator, "Soap/u") == 1


def test_direct_session_id_cannot_be_renewed(clean_emulator, sf_default):
    h = hook(session_id=clean_emulator.access_token())
    assert h.limits()
    clean_emulator.control("POST", "sessions/expire")
    with pytest.raises(SalesforceApiError) as info:
        h.limits()
    assert info.value.error_code == "INVALID_SESSION_ID"


@pytest.mark.parametrize(("extras", "message"), [
    ({"auth_type": "jwt"}, "private_key"),
    ({"auth_type": "kerberos"}, "must be one of"),
    ({"version": "v62"}, "version"),
    ({"login_url": "http://127.0.0.1:1"}, "https://"),
    ({"ca_bundle": "/nonexistent/ca.pem"}, "not a file"),
    ({"datacloud_query_api": "v2"}, "datacloud_query_api' must be one of v3, query-sql"),
])
def test_bad_connection_settings_are_named(make_conn, extras, message):
    with pytest.raises(SalesforceConfigError, match=message):
        hook(make_conn(drop=("private_key",), **extras)).connection_config  # noqa: B018


@pytest.mark.parametrize("extras", [{"verify": False}, {"verify": "false"}, {"ca_bundle": False},
                                    {"insecure": True}, {"extra__salesforce__verify_ssl": "0"}])
def test_tls_verification_cannot_be_disabled(make_conn, extras):
    with pytest.raises(SalesforceConfigError, match="would disable TLS certificate verification"):
        hook(make_conn(**extras)).connection_config  # noqa: B018


def test_wrong_ca_is_a_clear_tls_error(clean_emulator, make_conn, tmp_path):
    bundle = other_ca(tmp_path)
    h = hook(make_conn(ca_bundle=bundle))
    started = time.monotonic()
    with pytest.raises(SalesforceTlsError) as info:
        h.limits()
    assert "could not be verified" in str(info.value) and bundle in str(info.value)
    assert time.monotonic() - started < 5  # not retried: a certificate does not fix itself


def test_environment_ca_bundle_and_verify_false_cannot_override(clean_emulator, make_conn, monkeypatch, tmp_path):
    bundle = other_ca(tmp_path)
    # requests lets these win over a session's verify; simple-salesforce passes no verify= of its own.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", bundle)
    monkeypatch.setenv("CURL_CA_BUNDLE", bundle)
    h = hook(make_conn())
    assert h.describe_object("Account")["name"] == "Account"
    assert h.limits()
    # A caller passing verify=False through the hook's session is still verified (against the wrong CA here).
    wrong = hook(make_conn(ca_bundle=bundle))
    with pytest.raises(requests.exceptions.SSLError):
        wrong.client.session.get(clean_emulator.instance_url + "/services/data/", verify=False, timeout=10)


def test_prefixed_extras_are_read(clean_emulator, emulator, monkeypatch):
    conn = json.loads(emulator.info["airflow_conn"])
    conn["extra"] = {f"extra__salesforce__{k}": v for k, v in conn["extra"].items()}
    monkeypatch.setenv("AIRFLOW_CONN_SF_PREFIXED", json.dumps(conn))
    assert hook("sf_prefixed").query_count("SELECT COUNT() FROM Account") == 50


def test_secrets_stay_out_of_logs_errors_and_reprs(clean_emulator, make_conn, caplog):
    caplog.set_level(logging.DEBUG)
    info = clean_emulator.info
    h = hook(make_conn())
    h.limits()
    clean_emulator.control("POST", "sessions/expire")
    h.limits()  # renewal is logged
    token = h.client._grant.access_token
    bad = hook(make_conn(consumer_secret="S3CRET-consumer-secret-value", password="P4ss-word-value"))
    with pytest.raises(SalesforceAuthError) as err:
        bad.limits()
    texts = [caplog.text, str(err.value), repr(err.value), repr(h.connection_config), repr(h.client._grant),
             repr(bad.connection_config)]
    for secret in (info["password"], info["client_secret"], token, "S3CRET-consumer-secret-value", "P4ss-word-value"):
        for text in texts:
            assert secret not in text


# -- REST ---------------------------------------------------------------------------------------------------------
def test_rest_calls_and_inherited_provider_methods(bulk):
    assert "DailyBulkApiBatches" in bulk.limits()
    assert bulk.query_count("SELECT COUNT() FROM Account") == 50
    fields = {f["name"] for f in bulk.describe("Opportunity")["fields"]}
    assert {"ExternalId__c", "StageName", "CloseDate"} <= fields
    # The provider's own methods run on this hook's session (simple-salesforce in direct-session mode).
    assert bulk.describe_object("Account")["name"] == "Account"
    assert "Name" in bulk.get_available_fields("Account")
    assert bulk.make_query("SELECT Id FROM Account")["totalSize"] == 50


def test_4xx_raises_at_once_with_error_code(bulk, clean_emulator):
    with pytest.raises(SalesforceApiError) as info:
        bulk.query_count("SELECT COUNT() FROM NoSuchObject__c")
    assert info.value.status == 400 and info.value.error_code in ("INVALID_TYPE", "MALFORMED_QUERY")
    assert info.value.attempts == 1 and info.value.message
    assert requests_to(clean_emulator, "/query") == 1


def test_5xx_storm_is_retried(bulk, clean_emulator):
    clean_emulator.set_faults(rules=[{"path": "/query", "status": 503, "rate": 0.5}])
    for _ in range(10):
        assert bulk.query_count("SELECT COUNT() FROM Account") == 50
    assert sum(clean_emulator.stats()["faults_injected"].values()) >= 3


def test_429_honours_retry_after(bulk, clean_emulator):
    bulk.limits()  # logged in
    clean_emulator.set_faults(rules=[{"path": "/limits", "status": 429, "rate": 1.0, "retry_after": 1,
                                      "remaining": 1}])
    started = time.monotonic()
    bulk.limits()
    assert time.monotonic() - started >= 0.95
    assert clean_emulator.stats()["status_codes"].get("429") == 1


def test_persistent_5xx_gives_up_within_the_budget(clean_emulator, sf_default):
    h = hook(retry=RetryPolicy(max_attempts=3, max_elapsed=10, base_delay=0.01, max_delay=0.05))
    h.limits()
    clean_emulator.set_faults(rules=[{"path": "/limits", "status": 500, "rate": 1.0}])
    with pytest.raises(SalesforceApiError) as info:
        h.limits()
    assert info.value.status == 500 and info.value.attempts == 3 and info.value.retryable
    assert "after 3 attempts" in str(info.value)


def test_expired_session_is_renewed_once(bulk, clean_emulator):
    bulk.limits()
    clean_emulator.control("POST", "sessions/expire")
    assert bulk.query_count("SELECT COUNT() FROM Account") == 50
    assert requests_to(clean_emulator, "oauth2/token") == 2
    # A 401 that renewal cannot fix is not retried forever.
    clean_emulator.set_faults(rules=[{"path": "/limits", "status": 401, "rate": 1.0}])
    with pytest.raises(SalesforceApiError) as info:
        bulk.limits()
    assert info.value.error_code == "INVALID_SESSION_ID" and info.value.attempts == 2


# -- Bulk ingest ---------------------------------------------------------------------------------------------------
def test_ingest_lifecycle(bulk, clean_emulator):
    rows = opp_rows(30)
    rows[3][1] = ""  # Name missing: a row-level failure
    rows[4][5] = 'multi\nline "quoted", description'
    job = bulk.create_ingest_job("Opportunity", "upsert", "ExternalId__c")
    assert job["state"] == "Open"
    bulk.upload_job_data(job["id"], csv_bytes(HEADER, rows))
    assert bulk.close_job(job["id"])["state"] in ("UploadComplete", "InProgress", "JobComplete")
    wait = bulk.wait_for_job(job["id"], timeout=60, poll_interval=0.05)
    assert isinstance(wait, JobWait) and wait.finished and wait.succeeded
    assert (wait.records_processed, wait.records_failed) == (30, 1)
    assert bulk.get_job(job["id"])["state"] == "JobComplete"

    ok = list(bulk.iter_job_results(job["id"], "successful"))
    assert len(ok) == 29 and all(r["sf__Created"] == "true" and r["sf__Id"] for r in ok)
    assert {r["ExternalId__c"]: r["Description"] for r in ok}["T-00004"] == 'multi\nline "quoted", description'
    failed = list(bulk.iter_job_results(job["id"], "failed"))
    assert [r["ExternalId__c"] for r in failed] == ["T-00003"]
    assert parse_sf_error(failed[0]["sf__Error"]).code == "REQUIRED_FIELD_MISSING"
    assert list(bulk.iter_job_results(job["id"], "unprocessed")) == []

    assert job["id"] in {j["id"] for j in bulk.list_jobs()}
    bulk.delete_job(job["id"])
    with pytest.raises(SalesforceApiError) as info:
        bulk.get_job(job["id"])
    assert info.value.status == 404 and info.value.error_code == "NOT_FOUND"


def test_on_created_runs_before_the_upload_and_can_veto(bulk, clean_emulator):
    seen = []

    def record(info):
        seen.append((info["id"], info["state"], requests_to(clean_emulator, "/batches", "PUT")))

    job = bulk.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(3)), external_id_field="ExternalId__c",
                                 on_created=record)
    assert seen == [(job["id"], "Open", 0)]

    def veto(info):
        raise OSError("ledger unavailable")

    with pytest.raises(OSError, match="ledger unavailable") as info:
        bulk.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(3)), external_id_field="ExternalId__c",
                               on_created=veto)
    vetoed = info.value.__notes__[0].split()[4]
    assert bulk.get_job(vetoed)["state"] == "Aborted"
    assert requests_to(clean_emulator, "/batches", "PUT") == 1


def test_second_upsert_updates(bulk):
    for created in ("true", "false"):
        job = bulk.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(5)), external_id_field="ExternalId__c")
        assert bulk.wait_for_job(job["id"], 60, 0.05).succeeded
        assert {r["sf__Created"] for r in bulk.iter_job_results(job["id"], "successful")} == {created}


def test_upload_from_a_file_object_and_crlf(bulk, tmp_path):
    from sf_datacloud_sync.utils.csv_encoder import CsvEncoder

    enc = CsvEncoder(HEADER, line_ending="CRLF")
    path = tmp_path / "data.csv"
    path.write_bytes(enc.header_bytes + enc.encode_rows(opp_rows(40)))
    with open(path, "rb") as f:
        job = bulk.submit_ingest_job("Opportunity", f, external_id_field="ExternalId__c", line_ending="CRLF")
    wait = bulk.wait_for_job(job["id"], 60, 0.05)
    assert wait.succeeded and wait.records_processed == 40 and wait.records_failed == 0


def test_upload_size_is_checked_before_sending(clean_emulator, sf_default):
    h = hook(max_upload_bytes=1_000)
    job = h.create_ingest_job("Opportunity", "upsert", "ExternalId__c")
    with pytest.raises(BulkUploadTooLarge, match=job["id"]):
        h.upload_job_data(job["id"], csv_bytes(HEADER, opp_rows(100)))
    assert requests_to(clean_emulator, "/batches") == 0
    # submit_ingest_job aborts the job it created when the upload fails.
    with pytest.raises(BulkUploadTooLarge) as info:
        h.submit_ingest_job("Opportunity", io.BytesIO(csv_bytes(HEADER, opp_rows(100))),
                            external_id_field="ExternalId__c")
    aborted = info.value.__notes__[0].split()[4]
    assert h.get_job(aborted)["state"] == "Aborted"


def test_session_expiring_during_upload_resends_the_body(bulk, clean_emulator, tmp_path):
    job = bulk.create_ingest_job("Opportunity", "upsert", "ExternalId__c")
    path = tmp_path / "rows.csv"
    path.write_bytes(csv_bytes(HEADER, opp_rows(200)))
    clean_emulator.control("POST", "sessions/expire")
    with open(path, "rb") as f:
        bulk.upload_job_data(job["id"], f)
    bulk.close_job(job["id"])
    assert bulk.wait_for_job(job["id"], 60, 0.05).records_processed == 200
    assert requests_to(clean_emulator, "/batches", "PUT") == 2  # the 401, then the re-sent body
    assert clean_emulator.stats()["duplicate_uploads"] == 0


def test_5xx_storm_during_ingest(bulk, clean_emulator):
    clean_emulator.set_faults(rules=[{"path": "/jobs/ingest", "status": 503, "rate": 0.3}])
    jobs = [bulk.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(20, prefix=f"S{i}")),
                                   external_id_field="ExternalId__c") for i in range(5)]
    waits = [bulk.wait_for_job(j["id"], 60, 0.05) for j in jobs]
    assert all(w.succeeded and w.records_processed == 20 for w in waits)
    assert sum(clean_emulator.stats()["faults_injected"].values()) >= 3
    assert clean_emulator.stats()["duplicate_uploads"] == 0


def test_lost_upload_answer_counts_as_uploaded(bulk, clean_emulator):
    job = bulk.create_ingest_job("Opportunity", "upsert", "ExternalId__c")
    bulk.client.session.mount("https://", LoseResponses(clean_emulator.ca_bundle, "PUT"))
    bulk.upload_job_data(job["id"], csv_bytes(HEADER, opp_rows(10)))  # 502, retry: "Found multipe contents"
    assert requests_to(clean_emulator, "/batches", "PUT") == 2
    bulk.close_job(job["id"])
    assert bulk.wait_for_job(job["id"], 60, 0.05).records_processed == 10


def test_second_upload_by_the_caller_still_raises(bulk):
    job = bulk.create_ingest_job("Opportunity", "upsert", "ExternalId__c")
    bulk.upload_job_data(job["id"], csv_bytes(HEADER, opp_rows(2)))
    with pytest.raises(SalesforceApiError) as info:
        bulk.upload_job_data(job["id"], csv_bytes(HEADER, opp_rows(2)))
    assert info.value.error_code == "BULK_API_ERROR" and info.value.attempts == 1


def test_lost_close_answer_is_checked_against_the_job(bulk, clean_emulator):
    job = bulk.create_ingest_job("Opportunity", "upsert", "ExternalId__c")
    bulk.upload_job_data(job["id"], csv_bytes(HEADER, opp_rows(3)))
    bulk.client.session.mount("https://", LoseResponses(clean_emulator.ca_bundle, "PATCH"))
    info = bulk.close_job(job["id"])  # applied, 502, retry: INVALIDJOBSTATE, job is past Open
    assert info["state"] in ("UploadComplete", "InProgress", "JobComplete")
    assert requests_to(clean_emulator, "/jobs/ingest/{id}", "PATCH") == 2


def test_abort_and_invalid_transitions(bulk):
    job = bulk.create_ingest_job("Opportunity", "insert")
    assert bulk.abort_job(job["id"])["state"] == "Aborted"
    with pytest.raises(SalesforceApiError) as info:
        bulk.close_job(job["id"])
    assert info.value.error_code == "INVALIDJOBSTATE" and info.value.attempts == 1


def test_create_job_errors_carry_the_error_code(bulk):
    with pytest.raises(SalesforceApiError) as info:
        bulk.create_ingest_job("NoSuchObject__c", "insert")
    assert info.value.status == 400 and info.value.error_code == "INVALIDJOB"
    with pytest.raises(ValueError, match="external_id_field"):
        bulk.create_ingest_job("Opportunity", "upsert")
    with pytest.raises(ValueError, match="column_delimiter"):
        bulk.create_ingest_job("Opportunity", "insert", column_delimiter="SPACE")


def test_wait_deadline_reports_still_running(bulk, clean_emulator):
    clean_emulator.set_faults(per_record_ms=25)
    job = bulk.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(40)), external_id_field="ExternalId__c")
    started = time.monotonic()
    wait = bulk.wait_for_job(job["id"], timeout=0.4, poll_interval=0.1)
    assert time.monotonic() - started < 2
    assert not wait.finished and wait.state in ("UploadComplete", "InProgress") and wait.job_id == job["id"]
    clean_emulator.set_faults(per_record_ms=0)
    assert bulk.wait_for_job(job["id"], timeout=60, poll_interval=0.1).succeeded


def test_session_expiring_while_polling(clean_emulator, sf_default):
    clean_emulator.set_faults(session_lifetime_s=1, per_record_ms=15)
    h = hook()
    job = h.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(150)), external_id_field="ExternalId__c")
    wait = h.wait_for_job(job["id"], timeout=60, poll_interval=0.2, max_poll_interval=0.4)
    assert wait.succeeded and wait.records_processed == 150
    assert requests_to(clean_emulator, "oauth2/token") >= 2


def test_unprocessed_rows_of_a_failed_job(bulk, clean_emulator):
    clean_emulator.set_faults(fail_job_after_records=10)
    job = bulk.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(25_000)), external_id_field="ExternalId__c")
    wait = bulk.wait_for_job(job["id"], 120, 0.1)
    assert wait.finished and wait.state == "Failed" and wait.error_message
    done = sum(1 for _ in bulk.iter_job_results(job["id"], "successful"))
    done += sum(1 for _ in bulk.iter_job_results(job["id"], "failed"))
    unprocessed = sum(1 for _ in bulk.iter_job_results(job["id"], "unprocessed"))
    assert unprocessed > 0 and done + unprocessed == 25_000


# -- Bulk query --------------------------------------------------------------------------------------------------------
def test_bulk_query_pages_with_locator(bulk, clean_emulator):
    rows = list(bulk.iter_query("SELECT Id, Name, ExternalId__c FROM Account ORDER BY ExternalId__c", max_records=7))
    assert len(rows) == 50 and list(rows[0]) == ["Id", "Name", "ExternalId__c"]
    assert [r["ExternalId__c"] for r in rows] == [f"ACC-{i:07d}" for i in range(1, 51)]
    assert requests_to(clean_emulator, "/results", "GET") == 8  # ceil(50 / 7) pages


def test_bulk_query_errors(bulk):
    with pytest.raises(SalesforceApiError) as info:
        list(bulk.iter_query("SELECT Nope__c FROM Account"))
    assert info.value.status == 400


# -- async (triggers) -----------------------------------------------------------------------------------------------
async def test_async_polling_of_many_jobs(clean_emulator, sf_default, monkeypatch):
    h = hook()
    jobs = [h.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(10, prefix=f"A{i}")),
                                external_id_field="ExternalId__c")["id"] for i in range(4)]
    # The async path looks the connection up without the sync API (surprise #12 in airflow.md).
    fresh = hook()
    monkeypatch.setattr(SalesforceBulk2Hook, "get_connection", classmethod(lambda cls, conn_id: 1 / 0))
    assert (await fresh.aget_job(jobs[0]))["id"] == jobs[0]
    clean_emulator.control("POST", "sessions/expire")
    waits = await fresh.await_jobs(jobs, timeout=60, poll_interval=0.05)
    assert list(waits) == jobs
    assert all(w.finished and w.succeeded and w.records_processed == 10 for w in waits.values())
    await fresh.aclose()


async def test_async_deadline_and_abort(clean_emulator, sf_default):
    clean_emulator.set_faults(per_record_ms=20)
    h = hook()
    job = h.submit_ingest_job("Opportunity", csv_bytes(HEADER, opp_rows(50)), external_id_field="ExternalId__c")
    waits = await h.await_jobs([job["id"]], timeout=0.3, poll_interval=0.05)
    assert not waits[job["id"]].finished and waits[job["id"]].state in ("UploadComplete", "InProgress")
    clean_emulator.set_faults(per_record_ms=0)
    assert (await h.aabort_job(job["id"]))["state"] == "Aborted"
    await h.aclose()


async def test_async_retries_and_4xx(clean_emulator, sf_default):
    h = hook()
    job = h.create_ingest_job("Opportunity", "insert")
    clean_emulator.set_faults(rules=[{"path": "/jobs/ingest/", "status": 503, "rate": 1.0, "remaining": 2},
                                     {"path": "/jobs/ingest/", "status": 429, "rate": 1.0, "remaining": 1,
                                      "retry_after": 0}])
    assert (await h.aget_job(job["id"]))["state"] == "Open"
    assert sum(clean_emulator.stats()["faults_injected"].values()) == 3
    with pytest.raises(SalesforceApiError) as info:
        await h.aget_job("750000000000000AAA")
    assert info.value.status == 404 and info.value.attempts == 1
    await h.aclose()


async def test_async_wrong_ca(make_conn, tmp_path):
    bundle = other_ca(tmp_path)
    h = hook(make_conn(ca_bundle=bundle))
    with pytest.raises(SalesforceTlsError, match="could not be verified"):
        await h.aget_job("750000000000000AAA")
    await h.aclose()

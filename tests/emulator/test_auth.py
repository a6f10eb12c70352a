"""OAuth flows and session checks over real HTTPS."""

from __future__ import annotations

import requests


def test_client_credentials_basic_header(emulator):
    resp = requests.post(f"{emulator.instance_url}/services/oauth2/token", data={"grant_type": "client_credentials"},
                         auth=(emulator.info["client_id"], emulator.info["client_secret"]), verify=emulator.ca_bundle)
    assert resp.status_code == 200
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["instance_url"] == emulator.instance_url
    assert body["issued_at"].isdigit()


def test_wrong_secret_is_invalid_client(emulator):
    resp = requests.post(f"{emulator.instance_url}/services/oauth2/token",
                         data={"grant_type": "client_credentials", "client_id": emulator.info["client_id"],
                               "client_secret": "nope"}, verify=emulator.ca_bundle)
    assert resp.status_code == 400
    assert resp.json() == {"error": "invalid_client", "error_description": "invalid client credentials"}


def test_missing_token_is_invalid_session_list(emulator):
    resp = requests.get(f"{emulator.instance_url}/services/oauth2/userinfo", verify=emulator.ca_bundle)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Token"
    assert resp.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]

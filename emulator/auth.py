"""OAuth 2.0 token endpoint (four flows), revoke, identity, and bearer-session checks for every API call."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

import jwt
from fastapi import APIRouter, Request
from starlette.responses import Response

from .errors import json_response, oauth_error
from .state import Org
from .tls import load_public_key

router = APIRouter()

CORE_AUDIENCE = "core"
DATA_CLOUD_AUDIENCE = "datacloud"


@dataclass(frozen=True)
class Session:
    token: str
    user_id: str
    client_id: str | None
    audience: str


class InvalidSession(Exception):
    """Raised by :func:`require_session`; the app answers 401 INVALID_SESSION_ID as Salesforce does."""


def org_of(request: Request) -> Org:
    return request.app.state.org


def issue_token(org: Org, user_id: str, client_id: str | None, kind: str = "access",
                audience: str = CORE_AUDIENCE, lifetime_s: float | None = None, token: str | None = None) -> str:
    """Record and return a session; ``token`` lets a caller choose the string (the Data Cloud token is a JWT)."""
    if token is None:
        prefix = org.credentials.org_id[:15] + "!" if audience == CORE_AUDIENCE else ""
        token = prefix + secrets.token_urlsafe(72 if kind == "access" else 48)
    now = time.time()
    if lifetime_s is None and kind == "access":
        lifetime_s = org.profile.session_lifetime_s
    expires = now + lifetime_s if lifetime_s else None
    conn = org.db()
    with org.lock:
        conn.execute(
            "INSERT INTO oauth_tokens(token, kind, user_id, client_id, scope, issued_at, expires_at, audience) "
            "VALUES(?, ?, ?, ?, 'api refresh_token cdp_query_api', ?, ?, ?)",
            (token, kind, user_id, client_id, now, expires, audience))
        conn.commit()
    return token


def lookup_token(org: Org, token: str, kind: str = "access") -> tuple[str, str | None, str] | None:
    """``(user_id, client_id, audience)`` of a live token, else ``None``."""
    row = org.db().execute(
        "SELECT user_id, client_id, audience, expires_at, revoked FROM oauth_tokens WHERE token=? AND kind=?",
        (token, kind)).fetchone()
    if row is None or row[4] or (row[3] is not None and row[3] < time.time()):
        return None
    return row[0], row[1], row[2]


def expire_all_sessions(org: Org) -> int:
    with org.lock:
        cur = org.db().execute("UPDATE oauth_tokens SET revoked=1 WHERE kind='access' AND revoked=0")
        org.db().commit()
        return cur.rowcount


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer " or header[:6].lower() == "oauth ":
        return header.split(" ", 1)[1].strip()
    return request.headers.get("x-sfdc-session")


def require_session(request: Request, audience: str = CORE_AUDIENCE) -> Session:
    """FastAPI dependency: the caller's live session, or :class:`InvalidSession`."""
    token = bearer_token(request)
    if not token:
        raise InvalidSession()
    found = lookup_token(org_of(request), token)
    if found is None or found[2] != audience:
        raise InvalidSession()
    return Session(token, found[0], found[1], found[2])


def _signature(org: Org, identity: str, issued_at: str) -> str:
    digest = hmac.new(org.credentials.client_secret.encode(), (identity + issued_at).encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


def token_response(org: Org, user_id: str, client_id: str | None, *, signed: bool = True,
                   refresh_token: str | None = None) -> Response:
    access = issue_token(org, user_id, client_id)
    issued_at = str(int(time.time() * 1000))
    body = {
        "access_token": access,
        "signature": _signature(org, org.identity_url(), issued_at),
        "scope": "api refresh_token cdp_query_api",
        "instance_url": org.instance_url,
        "id": org.identity_url(),
        "token_type": "Bearer",
        "issued_at": issued_at,
        "api_instance_url": org.instance_url,
    }
    if not signed:  # the JWT bearer flow answers without signature and issued_at
        body = {k: body[k] for k in ("access_token", "scope", "instance_url", "id", "token_type")}
    if refresh_token:
        body["refresh_token"] = refresh_token
    return json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _form(request: Request) -> dict[str, str]:
    raw = (await request.body()).decode("utf-8", "replace")
    merged = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    # Salesforce also accepts the parameters in the query string of a POST.
    for k, v in request.query_params.items():
        merged.setdefault(k, v)
    return merged


def _client_from_request(request: Request, form: dict[str, str]) -> tuple[str | None, str | None]:
    header = request.headers.get("authorization", "")
    if header[:6].lower() == "basic ":
        try:
            cid, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            return cid, secret
        except (ValueError, UnicodeDecodeError):
            return None, None
    return form.get("client_id"), form.get("client_secret")


@router.post("/services/oauth2/token")
async def token(request: Request) -> Response:
    org = org_of(request)
    await org.profile.rest_delay()
    ctype = request.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" not in ctype and not request.query_params:
        return oauth_error("unsupported_grant_type", "grant type not supported")
    form = await _form(request)
    grant = form.get("grant_type", "")
    creds = org.credentials
    client_id, client_secret = _client_from_request(request, form)

    if grant == "client_credentials":
        if client_id != creds.client_id:
            return oauth_error("invalid_client_id", "client identifier invalid")
        if not client_secret or not hmac.compare_digest(client_secret, creds.client_secret):
            return oauth_error("invalid_client", "invalid client credentials")
        return token_response(org, creds.user_id, client_id)

    if grant == "password":
        if client_id != creds.client_id:
            return oauth_error("invalid_client_id", "client identifier invalid")
        if not client_secret or not hmac.compare_digest(client_secret, creds.client_secret):
            return oauth_error("invalid_client", "invalid client credentials")
        if form.get("username") != creds.username or not hmac.compare_digest(form.get("password", ""),
                                                                              creds.password):
            return oauth_error("invalid_grant", "authentication failure")
        return token_response(org, creds.user_id, client_id)

    if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
        return _jwt_bearer(org, form.get("assertion", ""))

    if grant == "refresh_token":
        if client_id != creds.client_id:
            return oauth_error("invalid_client_id", "client identifier invalid")
        if client_secret is not None and client_secret != "" and not hmac.compare_digest(client_secret,
                                                                                        creds.client_secret):
            return oauth_error("invalid_client", "invalid client credentials")
        found = lookup_token(org, form.get("refresh_token", ""), kind="refresh")
        if found is None:
            return oauth_error("invalid_grant", "expired access/refresh token")
        return token_response(org, found[0], client_id)

    return oauth_error("unsupported_grant_type", "grant type not supported")


def _jwt_bearer(org: Org, assertion: str) -> Response:
    creds = org.credentials
    try:
        claims = jwt.decode(assertion, load_public_key(org.tls.jwt_cert), algorithms=["RS256"],
                            options={"verify_aud": False, "verify_exp": False})
    except jwt.PyJWTError:
        return oauth_error("invalid_grant", "invalid assertion")
    aud = str(claims.get("aud", ""))
    allowed = ("https://login.salesforce.com", "https://test.salesforce.com", org.instance_url)
    if not any(aud == a or aud.startswith(org.instance_url) for a in allowed):
        return oauth_error("invalid_grant", "Audience validation failed")
    try:
        exp = float(claims.get("exp", 0))  # simple-salesforce sends exp as a string
    except (TypeError, ValueError):
        return oauth_error("invalid_grant", "invalid assertion")
    if exp < time.time():
        return oauth_error("invalid_grant", "expired authorization code")
    if claims.get("iss") != creds.client_id:
        return oauth_error("invalid_client_id", "client identifier invalid")
    if claims.get("sub") != creds.username:
        return oauth_error("invalid_grant", "user hasn't approved this consumer")
    return token_response(org, creds.user_id, creds.client_id, signed=False)


@router.post("/services/oauth2/revoke")
async def revoke(request: Request) -> Response:
    org = org_of(request)
    form = await _form(request)
    tok = form.get("token", "")
    with org.lock:
        cur = org.db().execute("UPDATE oauth_tokens SET revoked=1 WHERE token=? AND revoked=0", (tok,))
        org.db().commit()
    if cur.rowcount == 0:
        return oauth_error("unsupported_token_type", "this token type is not supported")
    return Response(status_code=200)


def _identity(org: Org) -> dict:
    c = org.credentials
    base = org.instance_url
    v = org.api_version
    return {
        "id": org.identity_url(),
        "asserted_user": True,
        "user_id": c.user_id,
        "organization_id": c.org_id,
        "username": c.username,
        "nick_name": "integration",
        "display_name": "Integration User",
        "email": "integration@example.com",
        "email_verified": True,
        "first_name": "Integration",
        "last_name": "User",
        "timezone": "GMT",
        "active": True,
        "user_type": "STANDARD",
        "language": "en_US",
        "locale": "en_US",
        "utcOffset": 0,
        "urls": {
            "enterprise": f"{base}/services/Soap/c/{{version}}/{c.org_id[:15]}",
            "partner": f"{base}/services/Soap/u/{{version}}/{c.org_id[:15]}",
            "rest": f"{base}/services/data/v{{version}}/",
            "sobjects": f"{base}/services/data/v{{version}}/sobjects/",
            "search": f"{base}/services/data/v{{version}}/search/",
            "query": f"{base}/services/data/v{{version}}/query/",
            "recent": f"{base}/services/data/v{{version}}/recent/",
            "profile": f"{base}/{c.user_id}",
            "custom_domain": base,
        },
        "is_app_installed": True,
        "api_version": v,
    }


@router.get("/id/{org_id}/{user_id}")
async def identity(org_id: str, user_id: str, request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    c = org.credentials
    if org_id[:15] != c.org_id[:15] or user_id[:15] != c.user_id[:15]:
        return oauth_error("Bad_Id", "Bad Id", status=404)
    return json_response(_identity(org))


@router.get("/services/oauth2/userinfo")
async def userinfo(request: Request) -> Response:
    org = org_of(request)
    require_session(request)
    ident = _identity(org)
    c = org.credentials
    return json_response({
        "sub": ident["id"],
        "user_id": c.user_id,
        "organization_id": c.org_id,
        "preferred_username": c.username,
        "nickname": ident["nick_name"],
        "name": ident["display_name"],
        "email": ident["email"],
        "email_verified": True,
        "given_name": ident["first_name"],
        "family_name": ident["last_name"],
        "zoneinfo": "GMT",
        "active": True,
        "user_type": "STANDARD",
        "language": "en_US",
        "locale": "en_US",
        "utcOffset": 0,
        "urls": ident["urls"],
        "is_app_installed": True,
    })

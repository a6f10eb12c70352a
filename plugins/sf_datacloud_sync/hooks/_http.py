"""The request core shared by the Bulk API 2.0 and Data Cloud hooks, sync (``requests``) and async (``httpx``).

Everything that decides *what* to send and *what an answer means* lives here once: the connection settings,
the OAuth token requests of each flow, Salesforce's error envelope, which failures are retried and how long
to wait, and the one-time session renewal on ``401 INVALID_SESSION_ID``. The two transports only move bytes.

Retry rules (both transports):

* connection errors and timeouts, HTTP 5xx and 429 are retried with capped exponential backoff and jitter,
  at least as long as ``Retry-After`` asks, within :class:`RetryPolicy`'s attempt and time budget;
* ``403 REQUEST_LIMIT_EXCEEDED`` is retried only for the *concurrent* long-transaction limit; the daily
  ``TotalRequests`` allocation resets over 24 hours, so waiting minutes for it would only hide the problem;
* ``401 INVALID_SESSION_ID`` renews the session once per request and resends (the body too: uploads are
  bytes or seekable files and are rewound);
* every other 4xx raises :class:`SalesforceApiError` at once with Salesforce's ``errorCode`` and message.

Every method is retried on ambiguous failures (the request may have been applied before the connection
broke). The callers make that safe: a repeated upload answers ``BULK_API_ERROR "Found multipe contents"``
(see :func:`is_duplicate_upload_error`), a repeated close or abort answers ``INVALIDJOBSTATE`` and the job's
state is then checked, a repeated delete answers 404. A repeated ``POST /jobs/ingest`` can leave an empty
``Open`` job behind; it holds no data and Salesforce removes jobs left open after 24 hours.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import requests
from requests.adapters import HTTPAdapter

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

DEFAULT_API_VERSION = "62.0"
DEFAULT_LOGIN_URL = "https://login.salesforce.com"
# Which Data Cloud query API to read with: "v3" (tenant host, a360 token, pages up to 20 MB) or "query-sql" (the
# Query Connect API on the core host, pages of ~2 MB).
DATACLOUD_QUERY_APIS = ("v3", "query-sql")
DEFAULT_DATACLOUD_QUERY_API = "v3"
AUTH_TYPES = ("client_credentials", "jwt", "refresh_token", "password", "provider")
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_VERSION_RE = re.compile(r"^v?(\d{2,3}\.\d)$")
_LIMIT_INFO_RE = re.compile(r"(?:^|[^-])api-usage=(\d+)/(\d+)")
# Extras someone might use to switch certificate checks off; all of them are refused.
_TLS_OFF_EXTRAS = ("verify", "verify_ssl", "ssl_verify", "tls_verify", "insecure", "disable_ssl_verification")
_FALSE_WORDS = {"false", "0", "no", "off", "none"}
_TRUE_WORDS = {"true", "1", "yes", "on"}


# -- errors -----------------------------------------------------------------------------------------------------
class SalesforceApiError(Exception):
    """Salesforce answered with an error (``[{"errorCode", "message", "fields"}]``) or could not be reached.

    :param status: HTTP status (0 when no answer arrived).
    :param error_code: Salesforce's ``errorCode`` (or the OAuth ``error``).
    :param message: Salesforce's message.
    :param fields: Fields Salesforce named, if any.
    """

    def __init__(self, status: int, error_code: str, message: str, fields: list[str] | None = None, *,
                 method: str = "", url: str = "", attempts: int = 1, retry_after: float | None = None) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = list(fields or [])
        self.method = method
        self.url = url
        self.attempts = attempts
        self.retry_after = retry_after
        super().__init__(self._text())

    def _text(self) -> str:
        where = f" ({self.method} {self.url})" if self.method else ""
        fields = f" fields={self.fields}" if self.fields else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"HTTP {self.status} {self.error_code}: {self.message}{fields}{where}{tries}"

    def __str__(self) -> str:
        return self._text()

    def __reduce__(self):  # keep the keyword-only details when pickled (Airflow ships exceptions around)
        return (_rebuild_error, (type(self), self.__dict__.copy()))

    @property
    def retryable(self) -> bool:
        """Whether the same request could succeed later (5xx, 429, the concurrent-request limit)."""
        return _retryable_status(self.status, self.error_code, self.message)


def _rebuild_error(cls: type[SalesforceApiError], state: dict[str, Any]) -> SalesforceApiError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    Exception.__init__(err, err._text())
    return err


class SalesforceConnectionError(SalesforceApiError, ConnectionError):
    """No HTTP answer (connection refused or reset, timeout) within the retry budget; ``status`` is 0."""


class SalesforceAuthError(SalesforceApiError):
    """The token endpoint refused the credentials (``{"error", "error_description"}``)."""


class SalesforceTlsError(SalesforceApiError):
    """The server's certificate could not be verified against the configured CA bundle."""


class SalesforceConfigError(ValueError):
    """The Airflow connection cannot be used as configured; the message names the setting."""


def _retryable_status(status: int, error_code: str, message: str) -> bool:
    if status == 0 or status == 429 or status >= 500:
        return True
    return status == 403 and error_code == "REQUEST_LIMIT_EXCEEDED" and "ConcurrentPerOrgLongTxn" in message


def is_duplicate_upload_error(err: SalesforceApiError) -> bool:
    """A second ``PUT .../batches`` on one job: the first upload was stored (Salesforce's typo "multipe")."""
    text = err.message.lower()
    return err.error_code == "BULK_API_ERROR" and ("multipe contents" in text or "multiple contents" in text)


def error_from_response(status: int, body: bytes, *, method: str = "", url: str = "",
                        retry_after: float | None = None) -> SalesforceApiError:
    """Salesforce's error list, OAuth's error object, or whatever else came back, as one exception."""
    code, message, fields = f"HTTP_{status}", "", None
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        first = payload[0]
        code = str(first.get("errorCode") or code)
        message = str(first.get("message") or "")
        fields = first.get("fields") or None
        if len(payload) > 1:
            message += "".join(f"; {p.get('errorCode')}: {p.get('message')}" for p in payload[1:]
                               if isinstance(p, dict))
    elif isinstance(payload, dict):
        # OAuth's {"error", "error_description"}; Data Cloud's tenant host says {"error": "Bad Request", "message"}.
        if "error" in payload and ("error_description" in payload or
                                   (isinstance(payload["error"], str) and "message" not in payload)):
            code = str(payload.get("error"))
            message = str(payload.get("error_description") or "")
            cls: type[SalesforceApiError] = SalesforceAuthError if method == "POST" and "oauth2" in url else \
                SalesforceApiError
            return cls(status, code, message, method=method, url=url, retry_after=retry_after)
        code = str(payload.get("errorCode") or payload.get("internalErrorCode") or code)
        message = str(payload.get("message") or payload)
    else:
        # HTML or text (an edge proxy, the a360 endpoint's redirect page): keep it short and printable.
        message = body[:300].decode("utf-8", "replace").strip() if body else ""
    return SalesforceApiError(status, code, message, fields, method=method, url=url, retry_after=retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- retry policy -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a request is retried.

    :param max_attempts: Attempts per request, the first included.
    :param max_elapsed: Seconds after the first attempt when no further attempt starts.
    :param base_delay: First backoff in seconds; doubles per attempt.
    :param max_delay: Cap of one backoff (a longer ``Retry-After`` still wins, within ``max_elapsed``).
    """

    max_attempts: int = 6
    max_elapsed: float = 120.0
    base_delay: float = 0.5
    max_delay: float = 30.0

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before attempt ``attempt + 1``: "equal jitter" so that parallel clients spread out."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


# -- connection settings --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConnectionConfig:
    """What the hooks need from the Airflow ``salesforce`` connection. Secrets are kept out of ``repr``."""

    conn_id: str
    login_url: str
    instance_url: str | None
    api_version: str
    auth_type: str
    username: str | None = None
    client_id: str | None = None
    ca_bundle: str | None = None
    private_key_file_path: str | None = None
    jwt_audience: str | None = None
    proxies: dict[str, str] | None = None
    connect_timeout: float = 15.0
    read_timeout: float = 300.0
    dataspace: str = "default"
    workload_name: str = "airflow-sf-datacloud-sync"
    datacloud_query_api: str = DEFAULT_DATACLOUD_QUERY_API
    password: str | None = field(default=None, repr=False)
    security_token: str | None = field(default=None, repr=False)
    client_secret: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)

    @property
    def verify(self) -> str | bool:
        """``requests``' ``verify``: the CA bundle path, else the system store. Never ``False``."""
        return self.ca_bundle or True

    def ssl_context(self) -> ssl.SSLContext:
        """The same trust for ``httpx``: certificate and host name checks stay on."""
        return ssl.create_default_context(cafile=self.ca_bundle) if self.ca_bundle else ssl.create_default_context()

    @classmethod
    def from_connection(cls, conn: Any, get_field: Callable[[dict, str], Any], *,
                        session_id: str | None = None) -> ConnectionConfig:
        """Read an Airflow connection (``login``, ``password``, extras) into settings.

        :param conn: The Airflow ``Connection``.
        :param get_field: The provider's ``_get_field`` (plain extra name, then ``extra__salesforce__`` prefix).
        :param session_id: A session passed to the hook directly (the provider's "direct session" mode).
        """
        extras = conn.extra_dejson or {}

        def extra(name: str) -> Any:
            value = get_field(extras, name)
            return value.strip() if isinstance(value, str) else value

        _refuse_tls_off(extras)
        ca_bundle = extra("ca_bundle")
        if ca_bundle is not None and not isinstance(ca_bundle, str):
            raise SalesforceConfigError("connection extra 'ca_bundle' must be the path of a PEM CA bundle")
        if ca_bundle and not Path(ca_bundle).is_file():
            raise SalesforceConfigError(f"connection extra 'ca_bundle' points to {ca_bundle!r}, which is not a file")

        version = str(extra("version") or DEFAULT_API_VERSION)
        match = _VERSION_RE.match(version)
        if not match:
            raise SalesforceConfigError(f"connection extra 'version' must look like '62.0', got {version!r}")

        domain = extra("domain")
        login_url = extra("login_url") or (f"https://{domain}.salesforce.com" if domain else DEFAULT_LOGIN_URL)
        instance_url = extra("instance_url") or (f"https://{extra('instance')}" if extra("instance") else None)
        for name, url in (("login_url", login_url), ("instance_url", instance_url)):
            if url and not str(url).startswith("https://"):
                raise SalesforceConfigError(f"connection extra '{name}' must be an https:// URL, got {url!r}")

        proxies = extra("proxies")
        if isinstance(proxies, str):
            try:
                proxies = json.loads(proxies)
            except ValueError:
                raise SalesforceConfigError("connection extra 'proxies' must be a JSON object") from None
        values = {
            "conn_id": conn.conn_id,
            "login_url": str(login_url).rstrip("/"),
            "instance_url": str(instance_url).rstrip("/") if instance_url else None,
            "api_version": match.group(1),
            "username": conn.login or None,
            "password": conn.password or None,
            "security_token": extra("security_token"),
            "client_id": extra("consumer_key") or extra("client_id"),
            "client_secret": extra("consumer_secret") or extra("client_secret"),
            "private_key": extra("private_key"),
            "private_key_file_path": extra("private_key_file_path"),
            "refresh_token": extra("refresh_token"),
            "ca_bundle": ca_bundle,
            "jwt_audience": extra("jwt_audience"),
            "proxies": proxies or None,
            "dataspace": str(extra("dataspace") or "default"),
            "workload_name": str(extra("workload_name") or "airflow-sf-datacloud-sync"),
            "datacloud_query_api": str(extra("datacloud_query_api") or DEFAULT_DATACLOUD_QUERY_API).lower(),
        }
        if values["datacloud_query_api"] not in DATACLOUD_QUERY_APIS:
            raise SalesforceConfigError(f"connection extra 'datacloud_query_api' must be one of "
                                        f"{', '.join(DATACLOUD_QUERY_APIS)}, got {extra('datacloud_query_api')!r}")
        for name in ("connect_timeout", "read_timeout"):
            if extra(name) is not None:
                try:
                    values[name] = float(extra(name))
                except (TypeError, ValueError):
                    raise SalesforceConfigError(f"connection extra '{name}' must be a number of seconds") from None
        values["auth_type"] = "session" if session_id else resolve_auth_type(values, extra("auth_type"),
                                                                             extra("organization_id"))
        if values["auth_type"] == "session" and not values["instance_url"]:
            raise SalesforceConfigError("a session_id needs the connection extra 'instance_url'")
        return cls(**values)


def _refuse_tls_off(extras: Mapping[str, Any]) -> None:
    """Raise if any extra (plain or ``extra__salesforce__``-prefixed) tries to switch certificate checks off."""
    for name in (*_TLS_OFF_EXTRAS, "ca_bundle"):
        for key in (name, f"extra__salesforce__{name}"):
            if key not in extras:
                continue
            value = extras[key]
            text = str(value).strip().lower()
            if name in ("insecure", "disable_ssl_verification"):
                off = value is True or text in _TRUE_WORDS
            else:
                off = value is False or text in _FALSE_WORDS
            if off:
                raise SalesforceConfigError(
                    f"connection extra {key!r}={value!r} would disable TLS certificate verification, which this hook "
                    "never does; set 'ca_bundle' to the path of the PEM file of the CA that signed the server "
                    "certificate")


def resolve_auth_type(values: Mapping[str, Any], explicit: str | None, organization_id: str | None = None) -> str:
    """Pick the OAuth flow. Order when ``auth_type`` is not set (first match wins):

    1. ``refresh_token`` + client id → refresh token flow;
    2. private key (``private_key`` or ``private_key_file_path``) + client id + login → JWT bearer;
    3. login + password + client id + secret → username-password flow (what the provider picks too);
    4. client id + secret → client credentials;
    5. login + password (+ ``security_token`` or ``organization_id``) → the provider's own login (SOAP),
       performed by simple-salesforce.
    """
    has = {k: bool(values.get(k)) for k in ("username", "password", "client_id", "client_secret", "refresh_token")}
    has_key = bool(values.get("private_key") or values.get("private_key_file_path"))
    needs = {
        "client_credentials": ("client_id", "client_secret"),
        "jwt": ("client_id", "username"),
        "refresh_token": ("client_id", "refresh_token"),
        "password": ("client_id", "client_secret", "username", "password"),
        "provider": ("username", "password"),
    }
    if explicit:
        auth_type = explicit.lower().replace("-", "_")
        if auth_type in ("jwt_bearer", "jwt-bearer"):
            auth_type = "jwt"
        if auth_type not in AUTH_TYPES:
            raise SalesforceConfigError(f"connection extra 'auth_type' must be one of {', '.join(AUTH_TYPES)}; "
                                        f"got {explicit!r}")
        missing = [k for k in needs[auth_type] if not has[k]]
        if auth_type == "jwt" and not has_key:
            missing.append("private_key or private_key_file_path")
        if missing:
            names = ", ".join("login" if m == "username" else "consumer_key" if m == "client_id" else
                              "consumer_secret" if m == "client_secret" else m for m in missing)
            raise SalesforceConfigError(f"auth_type {auth_type!r} needs connection field(s): {names}")
        return auth_type
    if has["refresh_token"] and has["client_id"]:
        return "refresh_token"
    if has_key and has["client_id"] and has["username"]:
        return "jwt"
    if has["username"] and has["password"] and has["client_id"] and has["client_secret"]:
        return "password"
    if has["client_id"] and has["client_secret"]:
        return "client_credentials"
    if has["username"] and has["password"] and (values.get("security_token") or organization_id):
        return "provider"
    raise SalesforceConfigError(
        "cannot tell how to log in: give consumer_key + consumer_secret (client credentials), consumer_key + "
        "login + private_key (JWT), consumer_key + refresh_token, or login + password + consumer_key + "
        "consumer_secret; or set extra 'auth_type'")


# -- OAuth ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenRequest:
    """One ``POST {login_url}/services/oauth2/token`` (form body; client credentials in a Basic header)."""

    url: str
    form: dict[str, str] = field(repr=False)
    basic_auth: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if self.basic_auth:
            headers["Authorization"] = "Basic " + self.basic_auth
        return headers


@dataclass(frozen=True)
class TokenGrant:
    access_token: str = field(repr=False)
    instance_url: str


def build_token_request(cfg: ConnectionConfig) -> TokenRequest:
    url = f"{cfg.login_url}/services/oauth2/token"
    if cfg.auth_type == "client_credentials":
        basic = base64.b64encode(f"{cfg.client_id}:{cfg.client_secret}".encode()).decode()
        return TokenRequest(url, {"grant_type": "client_credentials"}, basic)
    if cfg.auth_type == "password":
        form = {"grant_type": "password", "client_id": cfg.client_id or "", "client_secret": cfg.client_secret or "",
                "username": cfg.username or "", "password": (cfg.password or "") + (cfg.security_token or "")}
        return TokenRequest(url, form)
    if cfg.auth_type == "refresh_token":
        form = {"grant_type": "refresh_token", "client_id": cfg.client_id or "",
                "refresh_token": cfg.refresh_token or ""}
        if cfg.client_secret:
            form["client_secret"] = cfg.client_secret
        return TokenRequest(url, form)
    if cfg.auth_type == "jwt":
        return TokenRequest(url, {"grant_type": JWT_GRANT, "assertion": _jwt_assertion(cfg)})
    raise SalesforceConfigError(f"auth_type {cfg.auth_type!r} does not use the OAuth token endpoint")


def _jwt_assertion(cfg: ConnectionConfig) -> str:
    import jwt

    key = cfg.private_key
    if not key and cfg.private_key_file_path:
        try:
            key = Path(cfg.private_key_file_path).read_text()
        except OSError as exc:
            raise SalesforceConfigError(
                f"connection extra 'private_key_file_path' cannot be read: {exc.strerror}") from None
    if key and "\\n" in key and "\n" not in key:
        key = key.replace("\\n", "\n")  # a PEM pasted into a one-line UI field
    claims = {"iss": cfg.client_id, "sub": cfg.username, "aud": cfg.jwt_audience or cfg.login_url,
              "exp": int(time.time()) + 180}
    try:
        return jwt.encode(claims, key, algorithm="RS256")
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise SalesforceConfigError(f"the JWT private key cannot sign RS256 assertions ({type(exc).__name__})") \
            from None


def parse_token_response(status: int, body: bytes, url: str, fallback_instance: str | None) -> TokenGrant:
    if status != 200:
        err = error_from_response(status, body, method="POST", url=url)
        raise SalesforceAuthError(err.status, err.error_code, err.message, method="POST", url=url)
    try:
        payload = json.loads(body)
        token = payload["access_token"]
    except (ValueError, KeyError, TypeError):
        raise SalesforceAuthError(status, "INVALID_TOKEN_RESPONSE", "the token endpoint did not return an "
                                  "access_token", method="POST", url=url) from None
    instance = (payload.get("instance_url") or fallback_instance or "").rstrip("/")
    if not instance.startswith("https://"):
        raise SalesforceAuthError(status, "INVALID_TOKEN_RESPONSE", f"unusable instance_url {instance!r}",
                                  method="POST", url=url)
    _mask(token)
    return TokenGrant(token, instance)


def _mask(secret: str) -> None:
    """Register a value with Airflow's log masker (tokens are not connection fields, so it can't know them)."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older Airflow
        return
    mask_secret(secret)


# -- requests ---------------------------------------------------------------------------------------------------------
class Credential(Protocol):
    """A token for another host than the Salesforce session's (Data Cloud's tenant): :meth:`SalesforceClient.send`
    uses its grant's token and base URL, and renews it once when the host answers 401."""

    name: str

    def grant(self) -> TokenGrant: ...

    def renew(self, stale: TokenGrant) -> TokenGrant: ...


@dataclass
class ApiRequest:
    """A request relative to the instance (``path``) or absolute (``url``), and what counts as success."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json_body: Any = None
    content: bytes | IO[bytes] | None = None
    content_type: str | None = None
    accept: str = "application/json"
    ok: tuple[int, ...] = (200,)
    stream: bool = False
    authenticated: bool = True
    form: Mapping[str, str] | None = field(default=None, repr=False)
    credential: Credential | None = field(default=None, repr=False)  # instead of the Salesforce session
    extra_headers: Mapping[str, str] | None = field(default=None, repr=False)

    def body(self) -> bytes | IO[bytes] | None:
        if self.json_body is not None:
            return json.dumps(self.json_body, separators=(",", ":")).encode()
        return self.content


class _FileBody:
    """A seekable file sent as the request body from a fixed start, with a known length (no chunked encoding).

    ``requests`` would otherwise probe ``fileno()``, which makes a ``SpooledTemporaryFile`` roll over to disk.
    """

    def __init__(self, fileobj: IO[bytes], start: int, length: int) -> None:
        self._f = fileobj
        self._start = start
        self._length = length
        self._left = length

    def rewind(self) -> None:
        self._f.seek(self._start)
        self._left = self._length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._f.read(size)
        self._left -= len(data)
        return data


def body_length(data: bytes | bytearray | memoryview | IO[bytes]) -> int:
    """Bytes that ``data`` holds from its current position (files are not read)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    pos = data.tell()
    end = data.seek(0, 2)
    data.seek(pos)
    return end - pos


class _VerifyingAdapter(HTTPAdapter):
    """Verifies every request against one CA bundle, whatever the caller passes.

    ``requests`` lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override a session's ``verify`` and lets any
    caller pass ``verify=False``; simple-salesforce (the provider's login and methods) sends through this
    session without ``verify``. Pinning it in the adapter keeps the connection's ``ca_bundle`` in force.
    """

    def __init__(self, verify: str | bool, **kwargs: Any) -> None:
        self.pinned_verify = verify
        super().__init__(**kwargs)

    def send(self, request, **kwargs):  # type: ignore[override]
        kwargs["verify"] = self.pinned_verify
        return super().send(request, **kwargs)


@dataclass
class _Attempts:
    request: ApiRequest
    started: float = field(default_factory=time.monotonic)
    count: int = 0
    renewed: bool = False


class SalesforceClient:
    """Authenticated Salesforce REST client with a pooled ``requests`` session and an ``httpx`` async twin.

    One instance per hook; thread-safe for concurrent sync calls (the token renewal is locked).

    :param config: Connection settings.
    :param retry: Retry budget for every request.
    :param session_id: A ready session (provider's direct-session mode); it cannot be renewed.
    :param provider_login: For ``auth_type="provider"``: a callable doing simple-salesforce's login and
        returning ``(session_id, instance_url)``.
    :param session: A ``requests.Session`` to use instead of a new one (TLS checks stay on regardless).
    """

    def __init__(self, config: ConnectionConfig, retry: RetryPolicy | None = None, *, session_id: str | None = None,
                 provider_login: Callable[[], tuple[str, str]] | None = None,
                 session: requests.Session | None = None) -> None:
        self.config = config
        self.retry = retry or RetryPolicy()
        self._provider_login = provider_login
        self._grant: TokenGrant | None = None
        if session_id:
            _mask(session_id)
            self._grant = TokenGrant(session_id, config.instance_url or "")
        self._lock = threading.Lock()
        self._alock: asyncio.Lock | None = None
        self._alock_loop: asyncio.AbstractEventLoop | None = None
        self._session = session
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self.api_usage: tuple[int, int] | None = None

    # -- shared pieces ---------------------------------------------------------------------------------------------
    @property
    def can_renew(self) -> bool:
        return self.config.auth_type != "session"

    @property
    def instance_url(self) -> str:
        if self._grant is None:
            self.login()
        assert self._grant is not None
        return self._grant.instance_url

    def _url(self, req: ApiRequest, instance_url: str) -> str:
        if req.path.startswith("https://"):
            return req.path
        if req.path.startswith("/"):
            return instance_url + req.path
        return f"{instance_url}/services/data/v{self.config.api_version}/{req.path}"

    def _headers(self, req: ApiRequest, token: str | None) -> dict[str, str]:
        headers = {"Accept": req.accept}
        if token:
            headers["Authorization"] = "Bearer " + token
        if req.json_body is not None:
            headers["Content-Type"] = "application/json"
        elif req.content_type:
            headers["Content-Type"] = req.content_type
        if req.extra_headers:
            headers.update(req.extra_headers)
        return headers

    def _decide(self, att: _Attempts, err: SalesforceApiError) -> tuple[str, float]:
        """``("renew", 0)``, ``("retry", delay)`` or ``("raise", 0)`` after a failed attempt."""
        err.attempts = att.count
        err.args = (err._text(),)
        credential = att.request.credential
        if err.status == 401 and not att.renewed and (credential is not None or (
                err.error_code == "INVALID_SESSION_ID" and att.request.authenticated and self.can_renew)):
            att.renewed = True
            log.info("%s expired or was revoked; renewing it (%s %s)",
                     credential.name if credential else "Salesforce session", err.method, _path_only(err.url))
            return "renew", 0.0
        if not err.retryable or att.count >= self.retry.max_attempts:
            return "raise", 0.0
        delay = self.retry.backoff(att.count, err.retry_after)
        if time.monotonic() - att.started + delay > self.retry.max_elapsed:
            return "raise", 0.0
        log.warning("Salesforce %s %s failed (HTTP %s %s), attempt %d/%d; retrying in %.1fs", err.method,
                    _path_only(err.url), err.status or "-", err.error_code, att.count, self.retry.max_attempts, delay)
        return "retry", delay

    def _track_limits(self, headers: Mapping[str, str]) -> None:
        info = headers.get("Sforce-Limit-Info") or headers.get("sforce-limit-info")
        if not info:
            return
        m = _LIMIT_INFO_RE.search(info)
        if m:
            used, total = int(m.group(1)), int(m.group(2))
            if total and used * 10 >= total * 9 and (self.api_usage is None or self.api_usage[0] * 10 < total * 9):
                log.warning("Salesforce API usage at %d of %d daily requests", used, total)
            self.api_usage = (used, total)

    def _connection_error(self, exc: BaseException, method: str, url: str) -> SalesforceApiError:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
                where = "the connection extra 'ca_bundle' " + (repr(self.config.ca_bundle) if self.config.ca_bundle
                                                                else "(not set: the system CA store was used)")
                return SalesforceTlsError(
                    0, "TLS_VERIFY_FAILED",
                    f"the TLS certificate of {_origin(url)} could not be verified against {where}: "
                    f"{getattr(cause, 'verify_message', None) or 'certificate verify failed'}. Point 'ca_bundle' at "
                    "the PEM of the CA that signed the server certificate.", method=method, url=url)
            cause = cause.__cause__ or cause.__context__
        return SalesforceConnectionError(0, type(exc).__name__, str(exc)[:300] or "connection failed",
                                         method=method, url=url)

    # -- sync transport ----------------------------------------------------------------------------------------------
    @property
    def session(self) -> requests.Session:
        """The pooled ``requests`` session; every HTTPS request on it verifies against the connection's CA."""
        if self._session is None:
            self._session = requests.Session()
            self._session.headers["User-Agent"] = "sf-datacloud-sync/0.1 (apache-airflow)"
        if not isinstance(self._session.get_adapter("https://"), _VerifyingAdapter):
            # Pooled keep-alive connections; retries are ours (urllib3 would retry blind of Salesforce's errors).
            self._session.mount("https://", _VerifyingAdapter(self.config.verify, pool_connections=4, pool_maxsize=16,
                                                               max_retries=0))
            self._session.verify = self.config.verify
            if self.config.proxies:
                self._session.proxies.update(self.config.proxies)
        return self._session

    def login(self) -> TokenGrant:
        """Log in (or again) and return the new grant."""
        if self.config.auth_type == "session":
            if self._grant is None:
                raise SalesforceConfigError("no session to use")
            return self._grant
        if self.config.auth_type == "provider":
            if self._provider_login is None:
                raise SalesforceConfigError("auth_type 'provider' needs the provider's login")
            token, instance = self._provider_login()
            _mask(token)
            self._grant = TokenGrant(token, instance.rstrip("/"))
            return self._grant
        token_req = build_token_request(self.config)
        resp = self.send(ApiRequest("POST", token_req.url, form=token_req.form, authenticated=False,
                                    extra_headers=token_req.headers(), ok=(200,)))
        self._grant = parse_token_response(resp.status_code, resp.content, token_req.url, self.config.instance_url)
        log.info("Logged in to Salesforce %s (%s flow)", self._grant.instance_url, self.config.auth_type)
        return self._grant

    def _renew(self, stale: str | None) -> None:
        with self._lock:
            if self._grant is not None and self._grant.access_token != stale:
                return  # another thread renewed it meanwhile
            self.login()

    def _current_token(self) -> str:
        if self._grant is None:
            with self._lock:
                if self._grant is None:
                    self.login()
        assert self._grant is not None
        return self._grant.access_token

    def send(self, req: ApiRequest) -> requests.Response:
        """Send with auth, renewal and retries; the successful response (streamed ones left open)."""
        att = _Attempts(req)
        body = req.body()
        file_body = None
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            file_body = _FileBody(body, body.tell(), body_length(body))
            body = file_body
        timeout = (self.config.connect_timeout, self.config.read_timeout)
        while True:
            att.count += 1
            grant = req.credential.grant() if req.credential is not None else None
            if grant is not None:
                token, url = grant.access_token, self._url(req, grant.instance_url)
            else:
                token = self._current_token() if req.authenticated else None
                url = self._url(req, self.instance_url if req.authenticated else "")
            if file_body is not None:
                file_body.rewind()
            try:
                resp = self.session.request(
                    req.method, url, params=_params(req.params), data=req.form if req.form is not None else body,
                    headers=self._headers(req, token), stream=req.stream, timeout=timeout, allow_redirects=False)
            except requests.RequestException as exc:
                err = self._connection_error(exc, req.method, url)
                if isinstance(err, SalesforceTlsError):
                    raise err from None
            else:
                self._track_limits(resp.headers)
                if resp.status_code in req.ok:
                    return resp
                content = resp.content
                resp.close()
                err = error_from_response(resp.status_code, content, method=req.method, url=url,
                                          retry_after=parse_retry_after(resp.headers.get("Retry-After")))
            action, delay = self._decide(att, err)
            if action == "raise":
                raise err
            if action == "renew":
                if grant is not None:
                    req.credential.renew(grant)
                else:
                    self._renew(token)
            else:
                time.sleep(delay)

    def request_json(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """Send and decode JSON (``None`` for an empty body, e.g. 204)."""
        resp = self.send(ApiRequest(method, path, ok=ok, **kwargs))
        return json.loads(resp.content) if resp.content else None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # -- async transport ---------------------------------------------------------------------------------------------
    def _async_client(self) -> httpx.AsyncClient:
        import httpx

        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop or self._aclient.is_closed:
            # An AsyncClient belongs to the loop that created it (the triggerer may run several).
            self._aclient = httpx.AsyncClient(
                verify=self.config.ssl_context(), proxy=(self.config.proxies or {}).get("https"),
                timeout=httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout),
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=16), follow_redirects=False,
                headers={"User-Agent": "sf-datacloud-sync/0.1 (apache-airflow; async)"})
            self._aclient_loop = loop
        return self._aclient

    def _async_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._alock is None or self._alock_loop is not loop:
            self._alock = asyncio.Lock()
            self._alock_loop = loop
        return self._alock

    async def alogin(self) -> TokenGrant:
        if self.config.auth_type in ("session", "provider"):
            # The provider's login is simple-salesforce (blocking): keep it off the event loop.
            return await asyncio.to_thread(self.login)
        token_req = build_token_request(self.config)
        resp = await self.asend(ApiRequest("POST", token_req.url, form=token_req.form, authenticated=False,
                                           extra_headers=token_req.headers(), ok=(200,)))
        self._grant = parse_token_response(resp.status_code, resp.content, token_req.url, self.config.instance_url)
        return self._grant

    async def _acurrent_token(self) -> str:
        if self._grant is None:
            async with self._async_lock():
                if self._grant is None:
                    await self.alogin()
        assert self._grant is not None
        return self._grant.access_token

    async def _arenew(self, stale: str | None) -> None:
        async with self._async_lock():
            if self._grant is not None and self._grant.access_token != stale:
                return
            await self.alogin()

    async def asend(self, req: ApiRequest) -> httpx.Response:
        """Async twin of :meth:`send` (bodies must be bytes; responses are read completely; Salesforce session only)."""
        import httpx

        if req.credential is not None:
            raise NotImplementedError("asend uses the Salesforce session; a request with a credential needs send")

        att = _Attempts(req)
        body = req.body()
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            body = body.read()  # async uploads are not a trigger's job; keep it simple and re-sendable
        client = self._async_client()
        while True:
            att.count += 1
            token = await self._acurrent_token() if req.authenticated else None
            url = self._url(req, self._grant.instance_url if (req.authenticated and self._grant) else "")
            try:
                resp = await client.request(req.method, url, params=_params(req.params),
                                            data=req.form if req.form is not None else None,
                                            content=bytes(body) if (body is not None and req.form is None) else None,
                                            headers=self._headers(req, token))
            except httpx.HTTPError as exc:
                err = self._connection_error(exc, req.method, url)
                if isinstance(err, SalesforceTlsError):
                    raise err from None
            else:
                self._track_limits(resp.headers)
                if resp.status_code in req.ok:
                    return resp
                err = error_from_response(resp.status_code, resp.content, method=req.method, url=url,
                                          retry_after=parse_retry_after(resp.headers.get("Retry-After")))
            action, delay = self._decide(att, err)
            if action == "raise":
                raise err
            if action == "renew":
                await self._arenew(token)
            else:
                await asyncio.sleep(delay)

    async def arequest_json(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        resp = await self.asend(ApiRequest(method, path, ok=ok, **kwargs))
        return json.loads(resp.content) if resp.content else None

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None


def _params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    return {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in params.items() if v is not None}


def _origin(url: str) -> str:
    m = re.match(r"^(https?://[^/]+)", url)
    return m.group(1) if m else url


def _path_only(url: str) -> str:
    """URL without the query string: keeps log lines short (and SOQL out of them)."""
    return url.split("?", 1)[0]

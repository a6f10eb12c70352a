"""The ASGI application: Salesforce and Data Cloud routes, fault injection and the control plane."""

from __future__ import annotations

import asyncio
import json
import random
import re
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from . import auth, bulk_ingest, bulk_query, control, datacloud, rest
from .errors import SalesforceError, invalid_session, not_found, sf_error
from .state import Org

ROUTE_MODULES = (auth, rest, bulk_ingest, bulk_query, datacloud, control)

# Collapse ids, versions and locators so that stats group requests by endpoint.
# Record ids always contain a digit (their key prefix does), unlike path words such as "unprocessedrecords".
# Data Cloud v3 query ids are base64("ip:port") + "_" + hex.
_ID_SEGMENT = re.compile(r"/(?:(?=[a-zA-Z]*\d)(?:[a-zA-Z0-9]{18}|[a-zA-Z0-9]{15})|[0-9a-f-]{32,36}|01g[A-Za-z0-9]+-\d+"
                         r"|[A-Za-z0-9_-]{8,}_[0-9a-f]{8})(?=/|$)")
_VERSION = re.compile(r"/v\d+\.\d+")


def endpoint_key(method: str, path: str) -> str:
    return f"{method} {_ID_SEGMENT.sub('/{id}', _VERSION.sub('/vXX.X', path.rstrip('/') or '/'))}"


class FaultAndStatsMiddleware:
    """Counts every request by endpoint and answers injected faults before the route runs."""

    def __init__(self, app, org: Org) -> None:
        self.app = app
        self.org = org
        self.random = random.Random(1234)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        method: str = scope["method"]
        key = endpoint_key(method, path)
        status_holder = {"status": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        if not path.startswith("/__emulator"):
            fault = self._match_fault(method, path)
            if fault is not None:
                if fault.latency_ms:
                    await asyncio.sleep(fault.latency_ms / 1000)
                if fault.status:
                    self.org.stats.fault(f"{fault.status} {key}")
                    response = self._fault_response(fault)
                    await response(scope, receive, send_wrapper)
                    self.org.stats.request(key, status_holder["status"])
                    return
        await self.app(scope, receive, send_wrapper)
        if not path.startswith("/__emulator"):
            self.org.stats.request(key, status_holder["status"])

    def _match_fault(self, method: str, path: str):
        for rule in self.org.fault_rules:
            if rule.methods and method not in rule.methods:
                continue
            if not re.search(rule.path, path):
                continue
            if rule.remaining is not None and rule.remaining <= 0:
                continue
            if self.random.random() >= rule.rate:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
            return rule
        return None

    @staticmethod
    def _fault_response(rule):
        if rule.status == 429:
            headers = {"Retry-After": str(rule.retry_after if rule.retry_after is not None else 1)}
            return sf_error(429, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.",
                            headers=headers)
        if rule.status == 401:
            return invalid_session()
        if rule.status >= 500:
            headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
            return sf_error(rule.status, "SERVER_UNAVAILABLE",
                            "Server temporarily unavailable, please try again later.", headers=headers)
        return sf_error(rule.status, "UNKNOWN_EXCEPTION", "An unexpected error occurred. Please include this "
                        "ErrorId if you contact support: 1234567890-12345 (-1234567890)")


def create_app(org: Org) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for module in ROUTE_MODULES:
            if hasattr(module, "on_startup"):
                module.on_startup(org)
        yield
        for module in reversed(ROUTE_MODULES):
            if hasattr(module, "on_shutdown"):
                module.on_shutdown(org)

    app = FastAPI(title="Salesforce org emulator", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.org = org
    # Modules may hook the control plane: ``on_reset(org)`` for POST /__emulator/reset, ``extra_stats(org)``
    # for GET /__emulator/stats.
    app.state.reset_hooks = [m.on_reset for m in ROUTE_MODULES if hasattr(m, "on_reset")]
    app.state.extra_stats = [m.extra_stats for m in ROUTE_MODULES if hasattr(m, "extra_stats")]
    for module in ROUTE_MODULES:
        app.include_router(module.router)

    @app.exception_handler(auth.InvalidSession)
    async def _invalid_session(request: Request, exc: auth.InvalidSession):
        return invalid_session()

    @app.exception_handler(SalesforceError)
    async def _salesforce_error(request: Request, exc: SalesforceError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return not_found()
        if exc.status_code == 405:
            return sf_error(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{request.method}' not allowed.")
        return sf_error(exc.status_code, "UNKNOWN_EXCEPTION", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return sf_error(400, "JSON_PARSER_ERROR", json.dumps(exc.errors(), default=str)[:500])

    app.add_middleware(FaultAndStatsMiddleware, org=org)
    return app

"""Salesforce's error envelopes: REST/Bulk errors are a JSON list, OAuth errors a flat object."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

JSON_TYPE = "application/json;charset=UTF-8"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise with the stdlib encoder (fast, no pydantic) and Salesforce's content type."""
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        status_code=status,
        media_type=JSON_TYPE,
        headers=headers,
    )


def sf_error(status: int, error_code: str, message: str, fields: list[str] | None = None,
             headers: dict[str, str] | None = None) -> Response:
    """``[{"message": ..., "errorCode": ...}]`` with ``fields`` when Salesforce names them."""
    item: dict[str, Any] = {"message": message, "errorCode": error_code}
    if fields is not None:
        item["fields"] = fields
    return json_response([item], status, headers)


def not_found() -> Response:
    return sf_error(404, "NOT_FOUND", "The requested resource does not exist")


def invalid_session() -> Response:
    return sf_error(401, "INVALID_SESSION_ID", "Session expired or invalid", headers={"WWW-Authenticate": "Token"})


def oauth_error(error: str, description: str, status: int = 400) -> Response:
    return json_response({"error": error, "error_description": description}, status,
                         headers={"Cache-Control": "no-store"})


class SalesforceError(Exception):
    """Raised inside handlers; the app turns it into Salesforce's error list."""

    def __init__(self, status: int, error_code: str, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields

    def response(self) -> Response:
        return sf_error(self.status, self.error_code, self.message, self.fields)

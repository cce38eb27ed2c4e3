"""The emulator's response bodies: compact JSON, the API's error body and the Files API envelope.

Every body the emulator sends is built here, so the wire shapes in API_CONTRACT.md live in one place.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

# The `type` of an API error body, by HTTP status (API_CONTRACT.md, "HTTP errors").
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "upstream_error",
}

DEFAULT_MESSAGES: dict[int, str] = {
    400: "Bad request.",
    401: "Invalid API key.",
    402: "Insufficient credits.",
    403: "This key may not use this model.",
    404: "Not found.",
    405: "Method not allowed.",
    409: "Conflict.",
    413: "Request body too large.",
    429: "Rate limit exceeded.",
    500: "Internal server error.",
    502: "Upstream error.",
    503: "Service temporarily unavailable.",
    504: "Upstream timeout.",
}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> bytes:
    """Compact JSON (no spaces): some shell clients grep for `"id":"..."`."""
    return _dumps(value).encode()


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(value), status=status, headers=headers, content_type="application/json")


def error_body(status: int, code: int | str | None = None, message: str | None = None,
               param: str | None = None, fallback_suggestion: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        # Generic errors carry the status as an integer code, specific ones a string code: the
        # contract says clients meet both, so the emulator sends both.
        "code": status if code is None else code,
        "message": message or DEFAULT_MESSAGES.get(status, "Error."),
        "type": ERROR_TYPES.get(status, "internal_server_error" if status >= 500 else "invalid_request_error"),
    }
    if param is not None:
        error["param"] = param
    if fallback_suggestion is not None:
        error["fallback_suggestion"] = fallback_suggestion
    return {"error": error}


def api_error(status: int, code: int | str | None = None, message: str | None = None, *,
              param: str | None = None, fallback_suggestion: str | None = None,
              retry_after: int | float | None = None) -> web.Response:
    headers = {"Retry-After": format_seconds(retry_after)} if retry_after is not None else None
    return json_response(error_body(status, code, message, param, fallback_suggestion), status, headers)


def files_ok(data: Any, msg: str = "success") -> web.Response:
    return json_response({"success": True, "code": 200, "msg": msg, "data": data})


def files_error(status: int, code: int, msg: str, *, as_200: bool = False,
                retry_after: int | float | None = None) -> web.Response:
    """The Files API's failure envelope: a non-2xx status, or HTTP 200 when the scenario asks for the
    older variant the contract also lists."""
    headers = {"Retry-After": format_seconds(retry_after)} if retry_after is not None else None
    body = {"success": False, "code": code, "msg": msg}
    return json_response(body, 200 if as_200 else status, headers)


def format_seconds(value: int | float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")

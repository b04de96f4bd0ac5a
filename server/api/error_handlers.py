"""Every error leaves the API as ``{"error": "<clear message>"}`` with a 4xx status.

A 500 means a bug: it is logged with its traceback and the client learns nothing
about the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import AuthError, RateLimitedError, ServerError

log = logging.getLogger(__name__)
_MAX_REPORTED = 5


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def describe_validation(errors: Sequence[Any]) -> str:
    """Name each bad field and why, without echoing the input (it may be a secret)."""
    parts = []
    for err in list(errors)[:_MAX_REPORTED]:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            parts.append("request body is not valid JSON")
            continue
        if where == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("request body must be a JSON object")
            continue
        msg = str(err.get("msg", "invalid"))
        parts.append(f"{where}: {msg}")
    more = len(errors) - _MAX_REPORTED
    suffix = f" (and {more} more)" if more > 0 else ""
    return "invalid request: " + "; ".join(parts) + suffix


async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServerError)
    if exc.status >= 500:
        log.error("server error: %s", exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else None
    if isinstance(exc, RateLimitedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return error_response(exc.status, str(exc), headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = describe_validation(exc.errors())
    ctype = request.headers.get("content-type", "")
    if message.endswith("must be a JSON object") and "json" not in ctype:
        message += " sent as Content-Type: application/json"
    return error_response(422, message)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

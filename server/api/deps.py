"""Shared state of the API and its authentication checks.

Operator routes take ``Authorization: Bearer`` with the operator token, or a
console session cookie (``server.console.session``) whose unsafe requests
carry the CSRF header. The viewer token, or a viewer's session, may read the
fleet (``VIEWER_READABLE``), never act: that is a 403.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from server.config import MqttEndpoint, ServerConfig
from server.console.session import COOKIE_NAME, CSRF_HEADER, Role, SessionSigner
from server.db.tables import Database
from server.errors import AuthError, ForbiddenError
from server.publish.tuf_repo import TufRepository

_MAX_AUTH_HEADER = 1024

# Declared for the OpenAPI document (/docs "Authorize"); the checks below enforce.
bearer_scheme = HTTPBearer(auto_error=False, description="operator, viewer or device token")
SAFE_METHODS = frozenset({"GET", "HEAD"})
# What a viewer may read: fleet state and measurements. Not the broker files (secrets).
VIEWER_READABLE = tuple(
    f"/api/v1/{name}"
    for name in ("devices", "models", "rollouts", "telemetry", "accuracy", "bandwidth", "fleet")
)


@dataclass
class AppState:
    """What every route needs; one per server process."""

    config: ServerConfig
    db: Database
    repo: TufRepository
    operator_token: str
    mqtt_public: MqttEndpoint
    # Spans processes with --workers (server.publish.repo_lock.ProcessWideLock).
    publish_lock: AbstractContextManager[Any] = field(default_factory=threading.Lock)
    viewer_token: str | None = None  # create_app fills it (server.config.ensure_viewer_token)
    sessions: SessionSigner | None = None  # create_app makes it from both tokens


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.edgefleet
    return state


def bearer_token(request: Request) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or AuthError."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if len(header) > _MAX_AUTH_HEADER or scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing or malformed Authorization: Bearer token")
    return token.strip()


def caller_role(request: Request) -> Role:
    """Who is asking: a bearer token's role, else the console session's (CSRF-checked)."""
    state = app_state(request)
    signer = state.sessions
    cookie = request.cookies.get(COOKIE_NAME)
    if signer is None or cookie is None or "authorization" in request.headers:
        token = bearer_token(request)
        if signer is not None:
            role = signer.role_of_token(token)
        elif hmac.compare_digest(token.encode(), state.operator_token.encode()):
            role = "operator"
        else:
            role = None
        if role is None:
            raise AuthError("operator token is invalid")
        return role
    session = signer.verify(cookie)
    if session is None:
        raise AuthError("the console session has expired or is invalid: log in at /ui/login")
    if request.method not in SAFE_METHODS and not signer.check_csrf(
        session, request.headers.get(CSRF_HEADER)
    ):
        raise ForbiddenError(f"missing or invalid {CSRF_HEADER} header for a console action")
    return session.role


def check_operator(request: Request) -> None:
    """The operator may do anything; a viewer may only read ``VIEWER_READABLE``."""
    if caller_role(request) == "operator":
        return
    if request.method in SAFE_METHODS and request.url.path.startswith(VIEWER_READABLE):
        return
    raise ForbiddenError("the viewer role can look, not act: this needs the operator token")


class OperatorRoute(APIRoute):
    """Checks the operator token before the body is read, so no anonymous upload is parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            check_operator(request)
            return await handler(request)

        return guarded

"""Shared state of the API and its authentication checks."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from server.config import MqttEndpoint, ServerConfig
from server.db.tables import Database
from server.errors import AuthError
from server.publish.tuf_repo import TufRepository

_MAX_AUTH_HEADER = 1024

# Declared for the OpenAPI document (/docs "Authorize"); the checks below enforce.
bearer_scheme = HTTPBearer(auto_error=False, description="operator or device token")


@dataclass
class AppState:
    """What every route needs; one per server process."""

    config: ServerConfig
    db: Database
    repo: TufRepository
    operator_token: str
    mqtt_public: MqttEndpoint
    publish_lock: threading.Lock = field(default_factory=threading.Lock)


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


def check_operator(request: Request) -> None:
    token = bearer_token(request)
    expected = app_state(request).operator_token
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthError("operator token is invalid")


class OperatorRoute(APIRoute):
    """Checks the operator token before the body is read, so no anonymous upload is parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            check_operator(request)
            return await handler(request)

        return guarded

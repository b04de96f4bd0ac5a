"""Request body size limits, enforced while the body streams in.

A declared Content-Length over the limit is refused before a byte is read; a
chunked body is counted and cut off as soon as it passes the limit. Either
way the client gets the API's usual JSON error (413), not a bare text page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Query
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.error_handlers import error_response

TOO_LARGE = "request body is too large"

# A page offset: beyond a signed 64-bit integer the database driver fails (a 500), and no
# list is anywhere near this long.
MAX_OFFSET = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]


class BodyLimitMiddleware:
    """``limits`` maps ``(method, path)`` to a byte limit; everything else gets ``default``."""

    def __init__(self, app: ASGIApp, default: int, limits: Mapping[tuple[str, str], int]) -> None:
        self.app = app
        self.default = default
        self.limits = dict(limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get((scope["method"], scope["path"]), self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(413, f"{TOO_LARGE} (limit {limit} bytes)")(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPException from body reading: it becomes our JSON 413.
                    raise HTTPException(413, f"{TOO_LARGE} (limit {limit} bytes)")
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

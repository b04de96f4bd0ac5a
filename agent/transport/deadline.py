"""An overall deadline for one HTTP exchange: connect, headers and the whole body.

``requests``' ``timeout`` bounds each socket read, not the call: a server that
sends one byte every 2 s keeps a 3 s-timeout request alive for ever. Here the
connect and header reads get at most the time left, and before every body read
the socket's timeout is cut to the time left, so a call ends within its budget
plus one scheduling slice, whatever the server does with the body.

Limit: a server that drips the *status line and headers* is bounded per read
only (``http.client`` reads them before the response object exists); the agent's
servers send headers at once and the body is where the bytes, and the risk, are.

Budgets. Small exchanges (check-in, events, enrollment, TUF metadata) get a
fixed budget. A download's budget scales with the bytes it may carry:
``base_s + max_length / min_rate_bps`` (``download_budget``), so a 19 MB model
on a link that sustains the floor rate (16 KiB/s by default: ~20 min) still
completes, while a stalled or dripping server is cut off.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3

from agent.common.errors import ServerRequestError

DEFAULT_MIN_RATE_BPS = 16 * 1024  # slowest sustained download rate still accepted


class DeadlineExceededError(ServerRequestError):
    """An HTTP exchange ran past its overall deadline (slow, stalled or dripping server)."""

    def __init__(self, what: str, budget_s: float, elapsed_s: float) -> None:
        super().__init__(f"{what}: no complete answer within {budget_s:.1f}s ({elapsed_s:.1f}s)")
        self.what = what
        self.budget_s = budget_s
        self.elapsed_s = elapsed_s


@dataclass(frozen=True)
class Deadline:
    """A monotonic budget shared by every step of one exchange (or a retried series)."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def check(self, what: str) -> float:
        """The time left; DeadlineExceededError once there is none."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceededError(what, self.budget_s, self.elapsed())
        return left

    def read_timeout(self, per_read_s: float, what: str) -> float:
        return min(per_read_s, self.check(what))


def download_budget(base_s: float, max_length: int, min_rate_bps: int) -> float:
    """Seconds a download of at most ``max_length`` bytes may take (see module doc)."""
    return base_s + max(0, max_length) / max(1, min_rate_bps)


def open_stream(
    session: requests.Session,
    method: str,
    url: str,
    deadline: Deadline,
    per_read_s: float,
    **kwargs: Any,
) -> requests.Response:
    """Send the request and return once headers are in, with at most the time left.

    Raises DeadlineExceededError, or the ``requests`` error when the budget was
    not the reason (the caller maps those to its own errors).
    """
    timeout = deadline.read_timeout(per_read_s, url)
    try:
        return session.request(method, url, stream=True, timeout=(timeout, timeout), **kwargs)
    except requests.Timeout as err:
        if deadline.remaining() <= 0:
            raise DeadlineExceededError(url, deadline.budget_s, deadline.elapsed()) from err
        raise


def _cut_socket_timeout(resp: requests.Response, timeout: float) -> None:
    conn = getattr(resp.raw, "connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(timeout)


def iter_body(
    resp: requests.Response, deadline: Deadline, per_read_s: float, chunk_size: int
) -> Iterator[bytes]:
    """Yield the body as it arrives (``read1``: a partial chunk is never lost).

    Each read waits at most ``min(per_read_s, time left)``. Raises
    DeadlineExceededError when the budget runs out, else the urllib3/OS error.
    """
    what = resp.url or "response"
    while True:
        _cut_socket_timeout(resp, deadline.read_timeout(per_read_s, what))
        try:
            chunk = resp.raw.read1(chunk_size, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if deadline.remaining() <= 0:
                raise DeadlineExceededError(what, deadline.budget_s, deadline.elapsed()) from err
            raise
        if not chunk:
            return
        yield chunk


def read_body(
    resp: requests.Response, deadline: Deadline, per_read_s: float, max_bytes: int
) -> bytes:
    """The whole body, at most ``max_bytes + 1`` bytes (the caller checks the excess)."""
    parts: list[bytes] = []
    size = 0
    for chunk in iter_body(resp, deadline, per_read_s, 64 * 1024):
        parts.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            break
    return b"".join(parts)

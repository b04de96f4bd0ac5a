"""A small keep-alive HTTP/1.1 client on asyncio streams, for JSON POSTs to one server.

The simulator is a load generator: with thousands of devices, the cost of
each request on the client side is taken from the server it measures (they
share the machine). General-purpose async clients spend more time managing
their pool than sending the request; this one does only what devices need:
POST a JSON body over a pool of persistent connections to one host, read a
``Content-Length`` or chunked answer, bounded in size and time.

A connection the server closed while idle (its keep-alive timeout) is noticed
when reused; a request that got no byte of answer on a reused connection is
sent once more on a fresh one, as the server cannot have processed it.

Requests wait for a connection slot in two queues: ``urgent`` ones (a device
in the middle of an update reporting its steps) go before routine check-ins.
A real device has its own connection; without this, a device's nine update
reports would each queue behind the whole fleet's check-ins whenever the
server runs at capacity, which no real fleet does.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.common.errors import ProtocolError, ServerRequestError

_CRLF = b"\r\n"


class HttpPoolError(ServerRequestError):
    """The server could not be reached, broke the connection or did not answer in time."""


@dataclass(frozen=True)
class PoolLimits:
    connections: int = 32
    timeout_s: float = 30.0
    idle_s: float = 4.0  # reuse a connection idle for less than this (uvicorn closes at 5 s)
    max_body: int = 4 * 1024 * 1024
    max_header_lines: int = 100


class _Slots:
    """A semaphore with two FIFO queues; urgent waiters are served first."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._routine: deque[asyncio.Future[None]] = deque()

    async def acquire(self, urgent: bool) -> None:
        if self._free > 0 and not self._urgent and (urgent or not self._routine):
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._routine).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot in the same instant as the cancellation
            raise

    def release(self) -> None:
        for queue in (self._urgent, self._routine):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():  # cancelled waiters are skipped
                    waiter.set_result(None)
                    return
        self._free += 1


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used_at: float

    def close(self) -> None:
        self.writer.close()


class _NoAnswerError(Exception):
    """The connection ended before the first byte of an answer."""


class HttpPool:
    def __init__(self, base_url: str, limits: PoolLimits, user_agent: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the simulator speaks plain http to one host, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.limits = limits
        self._host_header = f"{self.host}:{self.port}".encode()
        self._agent = user_agent.encode()
        self._idle: deque[_Conn] = deque()
        self._slots = _Slots(limits.connections)

    async def close(self) -> None:
        while self._idle:
            self._idle.popleft().close()

    async def post(
        self, path: str, body: bytes, token: str | None, *, urgent: bool = False
    ) -> tuple[int, bytes, float]:
        """(status, body, seconds the exchange took once a connection slot was free)."""
        await self._slots.acquire(urgent)
        try:
            started = time.perf_counter()
            request = self._request(path, body, token)
            try:
                status, answer = await asyncio.wait_for(
                    self._exchange(request), self.limits.timeout_s
                )
            except asyncio.TimeoutError as err:
                raise HttpPoolError(
                    f"POST {path} timed out after {self.limits.timeout_s}s"
                ) from err
            return status, answer, time.perf_counter() - started
        finally:
            self._slots.release()

    def _request(self, path: str, body: bytes, token: str | None) -> bytes:
        lines = [
            b"POST " + path.encode() + b" HTTP/1.1",
            b"Host: " + self._host_header,
            b"User-Agent: " + self._agent,
            b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(),
        ]
        if token:
            lines.append(b"Authorization: Bearer " + token.encode())
        return _CRLF.join(lines) + _CRLF + _CRLF + body

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        conn, reused = await self._connection()
        try:
            try:
                status, body, keep = await self._send(conn, request)
            except _NoAnswerError:
                if not reused:
                    raise HttpPoolError("the server closed the connection unanswered") from None
                conn.close()  # a stale keep-alive: the request was not read; once more, fresh
                conn = await self._connect()
                try:
                    status, body, keep = await self._send(conn, request)
                except _NoAnswerError:
                    raise HttpPoolError("the server closed the connection unanswered") from None
        except BaseException:
            conn.close()
            raise
        if keep:
            conn.used_at = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return status, body

    async def _connection(self) -> tuple[_Conn, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used is the least likely closed
            if now - conn.used_at < self.limits.idle_s and not conn.reader.at_eof():
                return conn, True
            conn.close()
        return await self._connect(), False

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as err:
            raise HttpPoolError(f"cannot connect to {self.host}:{self.port}: {err}") from err
        return _Conn(reader, writer, time.monotonic())

    async def _send(self, conn: _Conn, request: bytes) -> tuple[int, bytes, bool]:
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            first = await conn.reader.readline()
        except (ConnectionError, OSError) as err:
            raise _NoAnswerError() from err
        if not first:
            raise _NoAnswerError()
        try:
            return await self._answer(conn.reader, first)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise ProtocolError(f"malformed HTTP answer: {err}") from err
        except (ConnectionError, OSError) as err:
            raise HttpPoolError(f"connection lost while reading the answer: {err}") from err

    async def _answer(self, reader: asyncio.StreamReader, first: bytes) -> tuple[int, bytes, bool]:
        parts = first.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP status line: {first[:60]!r}")
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        for _ in range(self.limits.max_header_lines):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ProtocolError("too many HTTP header lines")
        keep = headers.get(b"connection", b"").lower() != b"close" and parts[0] == b"HTTP/1.1"
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            return status, await self._chunked(reader), keep
        length = int(headers.get(b"content-length", b"-1"))
        if length < 0:  # no length: the body runs to the end of the connection
            return status, await reader.read(self.limits.max_body + 1), False
        if length > self.limits.max_body:
            raise ProtocolError(f"answer of {length} bytes exceeds {self.limits.max_body}")
        return status, await reader.readexactly(length), keep

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            if len(body) + size > self.limits.max_body:
                raise ProtocolError(f"answer exceeds {self.limits.max_body} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)

"""A small keep-alive HTTP/1.1 client on asyncio streams, for the requests devices make.

The simulator is a load generator: with thousands of devices, the cost of
each request on the client side is taken from the server it measures (they
share the machine). General-purpose async clients spend more time managing
their pool than sending the request; this one does only what devices need:
POST a JSON body or GET a file over a pool of persistent connections to one
host (under an optional base path), read a ``Content-Length`` or chunked
answer, bounded in size and time. A downloaded file's bytes can be counted
and dropped as they arrive (``keep_body=False``), so a thousand devices each
pulling a model cost the wire, not the simulator's memory.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent.common.errors import ProtocolError, ServerRequestError

_CRLF = b"\r\n"
_READ_CHUNK = 256 * 1024
_NO_BODY = (204, 304)  # answers that never carry a body, whatever their headers say


class HttpPoolError(ServerRequestError):
    """The server could not be reached, broke the connection or did not answer in time."""


@dataclass(frozen=True)
class PoolLimits:
    connections: int = 32
    timeout_s: float = 30.0
    idle_s: float = 4.0  # reuse a connection idle for less than this (uvicorn closes at 5 s)
    max_body: int = 4 * 1024 * 1024
    max_header_lines: int = 100


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # empty when the body was counted and dropped
    size: int  # body bytes received
    took: float  # seconds, from holding a connection slot to the last byte
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lower-case names

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.lower().encode())
        return None if value is None else value.decode("latin-1")


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
        self.base_path = parts.path.rstrip("/").encode()
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
        answer = await self.request("POST", path, body, token, urgent=urgent)
        return answer.status, answer.body, answer.took

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        urgent: bool = False,
        keep_body: bool = True,
    ) -> Answer:
        """One exchange; ``keep_body=False`` counts the body's bytes without keeping them."""
        await self._slots.acquire(urgent)
        try:
            started = time.perf_counter()
            request = self._request(method, path, body, token, headers)
            try:
                status, answer, size, heads = await asyncio.wait_for(
                    self._exchange(request, keep_body), self.limits.timeout_s
                )
            except asyncio.TimeoutError as err:
                raise HttpPoolError(
                    f"{method} {path} timed out after {self.limits.timeout_s}s"
                ) from err
            return Answer(status, answer, size, time.perf_counter() - started, heads)
        finally:
            self._slots.release()

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        token: str | None,
        headers: Sequence[tuple[str, str]],
    ) -> bytes:
        lines = [
            method.encode() + b" " + self.base_path + path.encode() + b" HTTP/1.1",
            b"Host: " + self._host_header,
            b"User-Agent: " + self._agent,
        ]
        if body is not None:
            lines.append(b"Content-Type: application/json")
            lines.append(b"Content-Length: " + str(len(body)).encode())
        if token:
            lines.append(b"Authorization: Bearer " + token.encode())
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
        return _CRLF.join(lines) + _CRLF + _CRLF + (body or b"")

    async def _exchange(self, request: bytes, keep_body: bool) -> _Result:
        conn, reused = await self._connection()
        try:
            try:
                result, keep = await self._send(conn, request, keep_body)
            except _NoAnswerError:
                if not reused:
                    raise HttpPoolError("the server closed the connection unanswered") from None
                conn.close()  # a stale keep-alive: the request was not read; once more, fresh
                conn = await self._connect()
                try:
                    result, keep = await self._send(conn, request, keep_body)
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
        return result

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

    async def _send(self, conn: _Conn, request: bytes, keep_body: bool) -> tuple[_Result, bool]:
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            first = await conn.reader.readline()
        except (ConnectionError, OSError) as err:
            raise _NoAnswerError() from err
        if not first:
            raise _NoAnswerError()
        try:
            return await self._answer(conn.reader, first, keep_body)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise ProtocolError(f"malformed HTTP answer: {err}") from err
        except (ConnectionError, OSError) as err:
            raise HttpPoolError(f"connection lost while reading the answer: {err}") from err

    async def _answer(
        self, reader: asyncio.StreamReader, first: bytes, keep_body: bool
    ) -> tuple[_Result, bool]:
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
        if status in _NO_BODY or 100 <= status < 200:
            return (status, b"", 0, headers), keep
        sink = _Sink(keep_body, self.limits.max_body)
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            await self._chunked(reader, sink)
            return (status, sink.body(), sink.size, headers), keep
        length = int(headers.get(b"content-length", b"-1"))
        if length < 0:  # no length: the body runs to the end of the connection
            while chunk := await reader.read(_READ_CHUNK):
                sink.add(chunk)
            return (status, sink.body(), sink.size, headers), False
        if length > self.limits.max_body:
            raise ProtocolError(f"answer of {length} bytes exceeds {self.limits.max_body}")
        await _read_exactly(reader, length, sink)
        return (status, sink.body(), sink.size, headers), keep

    async def _chunked(self, reader: asyncio.StreamReader, sink: _Sink) -> None:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            await _read_exactly(reader, size, sink)
            await reader.readexactly(2)


_Result = tuple[int, bytes, int, dict[bytes, bytes]]  # status, body, size, headers


class _Sink:
    """Where an answer's body goes: kept, or only counted; bounded either way."""

    def __init__(self, keep: bool, limit: int) -> None:
        self.keep = keep
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise ProtocolError(f"answer exceeds {self.limit} bytes")
        if self.keep:
            self._parts.append(chunk)

    def body(self) -> bytes:
        return b"".join(self._parts)


async def _read_exactly(reader: asyncio.StreamReader, length: int, sink: _Sink) -> None:
    left = length
    while left > 0:
        chunk = await reader.read(min(left, _READ_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        sink.add(chunk)
        left -= len(chunk)

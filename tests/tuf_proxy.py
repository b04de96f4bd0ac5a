"""A tampering HTTP proxy on 127.0.0.1, between a real agent and a real fleet server.

Every request is forwarded to the upstream server unchanged unless a rule
matches its URL path; a rule's tamper function then decides the answer. It
may fetch the genuine answer first (``request.upstream()``), so an attack can
be built from the server's own bytes: a replayed old file, a re-signed or
stripped metadata file, a flipped byte, or a body that never ends. Every
answer is recorded as a ``Hit``, including how many body bytes went out
before the client hung up, so a test can show where the agent stopped.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata

# Headers that belong to one hop, not to the message (RFC 9110 7.6.1), plus the
# ones this proxy recomputes.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass(frozen=True)
class Reply:
    """What the proxy answers. A body that is an iterator is streamed without a length."""

    status: int
    body: bytes | Iterable[bytes]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str  # the URL path, query excluded
    target: str  # path and query, as sent
    headers: dict[str, str]
    body: bytes
    _upstream: Callable[[Request], Reply]

    def upstream(self) -> Reply:
        """The genuine answer of the real server to this request."""
        return self._upstream(self)


Tamper = Callable[[Request], Reply]


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    status: int
    tampered: bool
    body_bytes: int  # body bytes the client accepted before the answer ended or it hung up
    client_hung_up: bool


class TamperingProxy:
    """``with TamperingProxy(server.url) as proxy: proxy.on(r"/tuf/metadata/timestamp.json", t)``.

    ``stream_cap`` bounds a streamed (endless) body, so an agent that never
    stops reading fails its test instead of hanging it; ``capped`` tells.
    """

    def __init__(self, upstream_url: str, stream_cap: int = 64 * 1024 * 1024) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.stream_cap = stream_cap
        self.hits: list[Hit] = []
        self.capped = False
        self._rules: list[tuple[re.Pattern[str], Tamper]] = []
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def on(self, path_regex: str, tamper: Tamper) -> None:
        """Tamper with requests whose URL path fully matches ``path_regex`` (first rule wins)."""
        with self._lock:
            self._rules.append((re.compile(path_regex), tamper))

    def clear(self) -> None:
        """Back to a transparent proxy."""
        with self._lock:
            self._rules.clear()

    def tampered(self, path_regex: str = ".*") -> list[Hit]:
        pattern = re.compile(path_regex)
        with self._lock:
            return [h for h in self.hits if h.tampered and pattern.fullmatch(h.path)]

    def _rule(self, path: str) -> Tamper | None:
        with self._lock:
            return next((t for p, t in self._rules if p.fullmatch(path)), None)

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def _forward(self, request: Request) -> Reply:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Accept-Encoding"] = "identity"  # the body is relayed (and tampered) as is
        resp = self._session.request(
            request.method,
            self.upstream_url + request.target,
            headers=headers,
            data=request.body or None,
            timeout=30,
            allow_redirects=False,
        )
        kept = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        return Reply(resp.status_code, resp.content, kept)

    def __enter__(self) -> TamperingProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._session.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so a body without a length
            # simply runs until the connection closes.
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest output clean

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command,
                    urlsplit(self.path).path,
                    self.path,
                    dict(self.headers.items()),
                    self.rfile.read(length) if length else b"",
                    proxy._forward,
                )
                tamper = proxy._rule(request.path)
                try:
                    reply = tamper(request) if tamper else proxy._forward(request)
                except requests.RequestException as err:
                    reply = Reply(502, f"upstream failed: {err}".encode())
                sent, hung_up = self._send(reply)
                proxy._record(
                    Hit(
                        request.method,
                        request.path,
                        reply.status,
                        tamper is not None,
                        sent,
                        hung_up,
                    )
                )

            def _send(self, reply: Reply) -> tuple[int, bool]:
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if isinstance(reply.body, bytes):
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
                sent = 0
                try:
                    for chunk in chunks:
                        if sent >= proxy.stream_cap:
                            proxy.capped = True
                            break
                        self.wfile.write(chunk)
                        sent += len(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return sent, True
                return sent, False

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

        return Handler


# --- tamper functions ---------------------------------------------------------------------
def replay(body: bytes) -> Tamper:
    """Answer with bytes captured earlier (a genuine, validly signed old file)."""
    return lambda _request: Reply(200, body, {"Content-Type": "application/json"})


def flip_byte(offset: int | None = None) -> Tamper:
    """The genuine body with one bit flipped (in the middle unless ``offset`` is given)."""

    def tamper(request: Request) -> Reply:
        genuine = request.upstream()
        if genuine.status != 200 or not isinstance(genuine.body, bytes) or not genuine.body:
            return genuine
        data = bytearray(genuine.body)
        data[len(data) // 2 if offset is None else offset] ^= 0x01
        return Reply(200, bytes(data), genuine.headers)

    return tamper


def endless(chunk: bytes = b"\0" * 65536) -> Tamper:
    """A 200 answer whose body never ends (the proxy's ``stream_cap`` aside)."""

    def body() -> Iterator[bytes]:
        while True:
            yield chunk

    return lambda _request: Reply(200, body(), {"Content-Type": "application/octet-stream"})


def rewrite_metadata(
    mutate: Callable[[Metadata[Any]], None], signers: Iterable[Signer] = ()
) -> Tamper:
    """The genuine metadata, changed by ``mutate``, its signatures replaced by ``signers``'
    (none: unsigned)."""

    def tamper(request: Request) -> Reply:
        genuine = request.upstream()
        assert isinstance(genuine.body, bytes) and genuine.status == 200, genuine.status
        md: Metadata[Any] = Metadata.from_bytes(genuine.body)
        mutate(md)
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return Reply(200, md.to_bytes(), {"Content-Type": "application/json"})

    return tamper

"""A real HTTP server on 127.0.0.1 serving a TUF repository directory, with faults.

``/tuf/metadata/<name>`` maps to ``repo_dir/metadata`` and ``/tuf/targets/<path>``
to ``repo_dir/targets``, the layout the fleet server serves. GET honours
``Range: bytes=N-``. Faults are queued per URL path and consumed one per
request: drop the connection after N body bytes, answer a status code, ignore
Range, or append bytes the file does not have.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata

_RANGE = re.compile(r"^bytes=(\d+)-$")
_PREFIXES = {"/tuf/metadata/": "metadata", "/tuf/targets/": "targets"}


def resign(path: Path, signer: Signer, mutate: Callable[[Metadata[Any]], None]) -> bytes:
    """Rewrite one metadata file the way an attacker (or a careless operator) would."""
    md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
    mutate(md)
    md.sign(signer)
    data: bytes = md.to_bytes()
    path.write_bytes(data)
    return data


@dataclass(frozen=True)
class Fault:
    kind: str  # "drop" | "status" | "ignore_range" | "oversize"
    after: int = 0  # drop: body bytes sent before the connection is cut
    status: int = 500  # status: code answered
    extra: bytes = b""  # oversize: bytes appended to the real body
    send_length: bool = True  # oversize: announce Content-Length or not

    @classmethod
    def drop(cls, after: int) -> Fault:
        return cls("drop", after=after)

    @classmethod
    def error(cls, status: int) -> Fault:
        return cls("status", status=status)

    @classmethod
    def oversize(cls, extra: bytes, send_length: bool = True) -> Fault:
        return cls("oversize", extra=extra, send_length=send_length)


@dataclass(frozen=True)
class Hit:
    path: str
    range: str | None
    status: int
    body_bytes: int


class RepoServer:
    """``with RepoServer(repo_dir) as srv: srv.url ...``"""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = Path(repo_dir)
        self.hits: list[Hit] = []
        self._faults: dict[str, list[Fault]] = defaultdict(list)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_fault(self, url_path: str, *faults: Fault) -> None:
        with self._lock:
            self._faults[url_path].extend(faults)

    def hits_for(self, url_path: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path == url_path]

    def _next_fault(self, url_path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(url_path)
            return queue.pop(0) if queue else None

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def resolve(self, url_path: str) -> Path | None:
        for prefix, sub in _PREFIXES.items():
            if url_path.startswith(prefix):
                base = (self.repo_dir / sub).resolve()
                path = (base / unquote(url_path[len(prefix) :])).resolve()
                if path.is_relative_to(base) and path.is_file():
                    return path
        return None

    def __enter__(self) -> RepoServer:
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

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest output clean

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url_path = urlsplit(self.path).path
                range_header = self.headers.get("Range")
                fault = server._next_fault(url_path)
                if fault is not None and fault.kind == "status":
                    body = f"injected {fault.status}".encode()
                    server._record(Hit(url_path, range_header, fault.status, 0))
                    self._answer(fault.status, body, {"Content-Length": str(len(body))})
                    return
                file = server.resolve(url_path)
                if file is None:
                    server._record(Hit(url_path, range_header, 404, 0))
                    self._answer(404, b"not found", {"Content-Length": "9"})
                    return
                data = file.read_bytes()
                self._serve(url_path, data, range_header, fault)

            def _serve(
                self, url_path: str, data: bytes, rng: str | None, fault: Fault | None
            ) -> None:
                status, start, headers = 200, 0, {}
                match = _RANGE.match(rng or "")
                if match and not (fault and fault.kind == "ignore_range"):
                    start = int(match.group(1))
                    if start >= len(data):
                        server._record(Hit(url_path, rng, 416, 0))
                        self._answer(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                        return
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if fault and fault.kind == "oversize":
                    body += fault.extra
                if not (fault and fault.kind == "oversize" and not fault.send_length):
                    headers["Content-Length"] = str(len(body))
                if fault and fault.kind == "drop":
                    body = body[: fault.after]
                    self.close_connection = True
                server._record(Hit(url_path, rng, status, len(body)))
                self._answer(status, body, headers)

        return Handler

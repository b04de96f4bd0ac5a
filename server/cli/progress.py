"""Progress for long CLI work: a byte bar while uploading, then a status line while waiting.


Progress goes to stderr, and only when stderr is a terminal or ``--progress`` is
given: stdout keeps the result, so ``--json`` output stays one parseable document
and logs of scripted runs are not filled with carriage returns.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, TextIO

BAR_WIDTH = 24
_REDRAW_S = 0.1
_TICK_S = 0.25
_CHUNK = 256 * 1024


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: when stderr is a terminal)",
    )


def progress_wanted(args: argparse.Namespace) -> bool:
    choice = getattr(args, "progress", None)
    return bool(choice) if choice is not None else sys.stderr.isatty()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # not reached; keeps mypy sure of a return


class Meter:
    """One rewritten stderr line. ``None`` stream: every call is a no-op."""

    def __init__(self, stream: TextIO | None, label: str, total: int) -> None:
        self.stream, self.label, self.total = stream, label, total
        self.done = 0
        self._drawn = 0.0
        self._width = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _draw(self, text: str) -> None:
        if self.stream is None:
            return
        # Pad over the previous text: a shorter line must not leave its tail behind.
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(text))

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done < self.total and now - self._drawn < _REDRAW_S:
            return
        self._drawn = now
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * BAR_WIDTH) + "." * (BAR_WIDTH - int(frac * BAR_WIDTH))
        self._draw(
            f"{self.label} [{bar}] {100 * frac:3.0f}% {_size(self.done)} of {_size(self.total)}"
        )

    def fraction(self, frac: float, detail: str) -> None:
        """Draw the bar at ``frac`` (0..1) with ``detail`` instead of byte counts."""
        frac = min(max(frac, 0.0), 1.0)
        bar = "#" * int(frac * BAR_WIDTH) + "." * (BAR_WIDTH - int(frac * BAR_WIDTH))
        self._draw(f"{self.label} [{bar}] {100 * frac:3.0f}% {detail}")

    def waiting(self, what: str) -> None:
        """From now until ``close``, show ``what`` with the seconds it has taken so far."""
        if self.stream is None or self._thread is not None:
            return
        start = time.monotonic()
        self._draw(f"{what} ...")

        def tick() -> None:
            while not self._stop.wait(_TICK_S):
                self._draw(f"{what} ... {time.monotonic() - start:.1f}s")

        self._thread = threading.Thread(target=tick, name="cli-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.stream is not None and self._width:
            self.stream.write("\r" + " " * self._width + "\r")  # leave the terminal clean
            self.stream.flush()


@contextlib.contextmanager
def meter(args: argparse.Namespace, label: str, total: int) -> Iterator[Meter]:
    m = Meter(sys.stderr if progress_wanted(args) else None, label, total)
    try:
        yield m
    finally:
        m.close()


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "%22").replace("\r", "").replace("\n", "")


class MultipartBody:
    """A ``multipart/form-data`` body that requests streams through ``read``.

    ``requests``' ``files=`` builds the whole body in memory before sending, so
    nobody sees how far an upload got; this reads each file in chunks as the
    socket takes them and tells the meter. When the last byte is read the
    server starts validating and signing (deltas come later), so the meter then
    shows ``after_upload`` until the answer arrives.
    """

    def __init__(
        self,
        fields: Mapping[str, str],
        files: Mapping[str, Path],
        progress: Meter,
        after_upload: str,
    ) -> None:
        self.boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[bytes | Path] = []
        for name, value in fields.items():
            self._parts.append(self._head(name) + b"\r\n" + value.encode() + b"\r\n")
        for name, path in files.items():
            head = self._head(name, f'; filename="{_quoted(path.name)}"')
            self._parts += [head + b"Content-Type: application/octet-stream\r\n\r\n", path, b"\r\n"]
        self._parts.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(p.stat().st_size if isinstance(p, Path) else len(p)
                           for p in self._parts)  # fmt: skip
        self._progress, self._after = progress, after_upload
        progress.total = self._length
        self._open: BinaryIO | None = None

    def _head(self, name: str, extra: str = "") -> bytes:
        disposition = f'Content-Disposition: form-data; name="{_quoted(name)}"{extra}\r\n'
        return f"--{self.boundary}\r\n{disposition}".encode()

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(_CHUNK):
            yield chunk

    def read(self, size: int = -1) -> bytes:
        want = _CHUNK if size is None or size < 0 else size
        out = b""
        while self._parts and len(out) < want:
            part = self._parts[0]
            if isinstance(part, bytes):
                take = part[: want - len(out)]
                out += take
                rest = part[len(take) :]
                if rest:
                    self._parts[0] = rest
                else:
                    self._parts.pop(0)
                continue
            if self._open is None:
                self._open = open(part, "rb")  # noqa: SIM115 - closed at its end below
            data = self._open.read(want - len(out))
            if data:
                out += data
            else:
                self._open.close()
                self._open = None
                self._parts.pop(0)
        self._progress.advance(len(out))
        if not self._parts:
            self._progress.waiting(self._after)
        return out

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

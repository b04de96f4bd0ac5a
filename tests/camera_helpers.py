"""Real servers and real video files for the camera source tests.

- ``write_video``: a video file encoded with PyAV, one solid colour per frame.
- ``MjpegServer``: Python's HTTP server streaming multipart/x-mixed-replace JPEGs
  on a loopback socket, the way MJPEG IP cameras serve them.
- ``RtspServer``: GStreamer's RTSP server (``tests/rtsp_server.py``) run by
  Debian's Python, which has the GObject bindings the venv lacks.
"""

from __future__ import annotations

import io
import os
import selectors
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
from conftest import service_unavailable
from PIL import Image

RTSP_SCRIPT = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"
WAIT_S = 60.0  # generous: a loaded 2-core CI machine can be slow, never flaky


def colour(index: int) -> tuple[int, int, int]:
    """A distinct, codec-friendly RGB colour per frame index (channels differ a lot)."""
    return ((index * 53) % 200 + 30, (index * 97 + 80) % 200 + 30, (index * 151 + 160) % 200 + 30)


def write_video(path: Path, frames: int, codec: str = "libx264", size: tuple[int, int] = (160, 120),
                fps: int = 30) -> list[tuple[int, int, int]]:
    """Encode ``frames`` solid-colour frames; returns the colours in order."""
    width, height = size
    colours = [colour(i) for i in range(frames)]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for rgb in colours:
            pixels = np.full((height, width, 3), rgb, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return colours


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (160, 120)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


class MjpegServer:
    """An MJPEG camera: every GET streams JPEG frames of ``rgb`` at ``fps`` until stopped."""

    def __init__(self, port: int = 0, rgb: tuple[int, int, int] = (200, 100, 50),
                 fps: float = 25.0, corrupt_every: int = 0) -> None:
        self.frame = jpeg(rgb)
        self.period = 1.0 / fps
        self.corrupt_every = corrupt_every  # every Nth frame is noise, as from a bad link
        self.stopping = threading.Event()
        self.clients = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/video"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/video":
                    self.send_error(404)
                    return
                server.clients += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                sent = 0
                try:
                    while not server.stopping.is_set():
                        sent += 1
                        frame = server.frame
                        if server.corrupt_every and sent % server.corrupt_every == 0:
                            frame = bytes(len(frame))
                        self.wfile.write(head % len(frame) + frame + b"\r\n")
                        self.wfile.flush()
                        server.stopping.wait(server.period)
                except OSError:
                    pass  # the client went away

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def stop(self) -> None:
        """Go down like a camera losing power: streams end, the port closes."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=WAIT_S)


class RtspServer:
    """GStreamer's RTSP server in a subprocess on 127.0.0.1:``port``."""

    def __init__(self, port: int, *args: str) -> None:
        self.port = port
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> RtspServer:
        if not os.path.exists(SYSTEM_PYTHON):
            service_unavailable("GStreamer RTSP server", f"{SYSTEM_PYTHON} is missing")
        cmd = [SYSTEM_PYTHON, str(RTSP_SCRIPT), "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self._first_line()
        if not line.startswith("READY "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=WAIT_S)
            why = (line.strip() or err.strip() or "no output").splitlines()[-1]
            service_unavailable("GStreamer RTSP server (tests/rtsp_server.py)", why)
        self.url = line.split()[1]
        return self

    def _first_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=WAIT_S):
                return ""
        return self.proc.stdout.readline()

    def stop(self) -> None:
        """SIGKILL: the camera vanishes without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)
        if self.proc is not None:
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()

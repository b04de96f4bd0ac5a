"""Camera streams on PyAV (FFmpeg): spec parsing, demuxer options, decoding, errors.

PyAV is imported only when a stream is opened, so an agent installed without
the ``camera`` extra still runs ``dir:`` and ``synthetic`` sources. Every error
leaves this module as a one-line ``FrameSourceError`` with PyAV's as its cause;
URLs in messages have their password hidden.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import numpy as np

from agent.common.errors import FrameSourceError, SourceOpenError

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

    from agent.inference.sources import Frame

log = logging.getLogger(__name__)

NO_PYAV = "camera sources need PyAV: pip install 'edgefleet[camera]'"
# Short names accepted in a v4l2: spec, mapped to FFmpeg's pixel format names.
V4L2_INPUT_FORMATS = {"mjpeg": "mjpeg", "yuyv": "yuyv422", "yuyv422": "yuyv422"}
V4L2_KEYS = ("format", "size", "fps")
RTSP_TRANSPORTS = ("tcp", "udp")
_SIZE = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}")


class StreamError(FrameSourceError):
    """The stream broke while it was read; the capture thread reconnects."""


@dataclass(frozen=True)
class StreamTarget:
    """What FFmpeg opens for one source spec."""

    kind: str  # "file", "v4l2", "rtsp" or "http"
    url: str  # may hold credentials: never log it, log ``display``
    display: str
    format: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.kind != "file"


def v4l2_options(input_format: str = "mjpeg", size: str | None = None,
                 fps: str | None = None) -> dict[str, str]:
    """FFmpeg v4l2 demuxer options; the driver negotiates the nearest mode it has."""
    pixel_format = V4L2_INPUT_FORMATS.get(input_format.lower())
    if pixel_format is None:
        raise FrameSourceError(f"V4L2 input format {input_format!r} is not one of "
                               f"{', '.join(sorted(V4L2_INPUT_FORMATS))}")
    options = {"input_format": pixel_format}
    if size is not None:
        if not _SIZE.fullmatch(size):
            raise FrameSourceError(f"V4L2 size {size!r} is not WIDTHxHEIGHT, as in 640x480")
        options["video_size"] = size
    if fps is not None:
        try:
            rate = float(fps)
        except ValueError:
            rate = 0.0
        if not 0 < rate <= 1000:
            raise FrameSourceError(f"V4L2 frame rate {fps!r} is not a number in (0, 1000]")
        options["framerate"] = fps
    return options


def parse_target(spec: str, *, rtsp_transport: str = "tcp",
                 v4l2_format: str = "mjpeg") -> StreamTarget:
    """The stream behind ``file:``, ``v4l2:``, ``rtsp(s)://`` or ``http(s)://`` specs."""
    if spec.startswith("file:"):
        return StreamTarget("file", *_file_path(spec[5:]))
    if spec.startswith("v4l2:"):
        path, _, query = spec[5:].partition("?")
        params = _query(spec, query)
        fmt = params.pop("format", v4l2_format)
        options = v4l2_options(fmt, params.pop("size", None), params.pop("fps", None))
        return StreamTarget("v4l2", *_device_path(path), "v4l2", options)
    if rtsp_transport not in RTSP_TRANSPORTS:
        raise FrameSourceError(f"RTSP transport {rtsp_transport!r} is not tcp or udp")
    parts = urlsplit(spec)
    if parts.scheme not in ("rtsp", "rtsps", "http", "https"):
        raise FrameSourceError(f"camera spec {_redact(spec)!r} is not file:, v4l2:, "
                               "rtsp(s):// or http(s)://")
    if not parts.hostname:
        raise FrameSourceError(f"camera URL {_redact(spec)!r} has no host")
    if parts.scheme in ("rtsp", "rtsps"):
        transport = "tcp" if parts.scheme == "rtsps" else rtsp_transport
        options = {"rtsp_transport": transport, "allowed_media_types": "video"}
        return StreamTarget("rtsp", spec, _redact(spec), None, options)
    # FFmpeg's mpjpeg demuxer reads multipart/x-mixed-replace, the usual MJPEG camera stream.
    return StreamTarget("http", spec, _redact(spec), "mpjpeg")


def _query(spec: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=bool(query))
    except ValueError as err:
        raise FrameSourceError(f"options in {spec!r} are not key=value&...: {err}") from err
    params = dict(pairs)
    unknown = sorted(set(params) - set(V4L2_KEYS))
    if unknown:
        raise FrameSourceError(f"unknown V4L2 option {unknown[0]!r} in {spec!r}; "
                               f"expected {', '.join(V4L2_KEYS)}")
    return params


def _file_path(arg: str) -> tuple[str, str]:
    if not arg:
        raise FrameSourceError("frame source 'file:' needs a path, as in file:/var/video.mp4")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise SourceOpenError(f"video file {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise SourceOpenError(f"video file {path} is not readable")
    return str(path), f"file:{path}"


def _device_path(arg: str) -> tuple[str, str]:
    if not arg:
        raise FrameSourceError("frame source 'v4l2:' needs a device, as in v4l2:/dev/video0")
    try:
        mode = os.stat(arg).st_mode
    except OSError as err:
        raise SourceOpenError(f"V4L2 device {arg} cannot be opened: {err.strerror}") from err
    if not stat.S_ISCHR(mode):
        raise SourceOpenError(f"V4L2 device {arg} is not a character device")
    return arg, f"v4l2:{arg}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def describe(err: BaseException, target: StreamTarget) -> str:
    """One line for an error, without the URL's password."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).replace(target.url, target.display).replace("\n", " ")


def require_av() -> None:
    """Fail when the source is opened, not later in its thread, without the camera extra."""
    try:
        import av  # noqa: F401, PLC0415 - optional dependency (extra "camera")
    except ImportError as err:
        raise SourceOpenError(NO_PYAV) from err


def open_stream(target: StreamTarget, open_timeout_s: float,
                io_timeout_s: float) -> tuple[InputContainer, VideoStream]:
    """Open the container and its first video stream, or raise ``StreamError``.

    PyAV's timeouts bound every blocking FFmpeg call, so a camera that accepts
    the connection and then says nothing cannot hang the capture thread.
    """
    try:
        import av  # noqa: PLC0415 - optional dependency (extra "camera")
    except ImportError as err:
        raise SourceOpenError(NO_PYAV) from err
    try:
        container = av.open(target.url, mode="r", format=target.format,
                            options=dict(target.options), timeout=(open_timeout_s, io_timeout_s))
    except (av.error.ProtocolNotFoundError, av.error.DemuxerNotFoundError) as err:
        raise SourceOpenError(f"{target.display} is not supported by this FFmpeg build: "
                              f"{describe(err, target)}") from err
    except (av.error.FFmpegError, OSError) as err:
        raise StreamError(f"{target.display} cannot be opened: {describe(err, target)}") from err
    if not container.streams.video:
        container.close()
        raise SourceOpenError(f"{target.display} has no video stream")
    stream = container.streams.video[0]
    if not target.live:
        stream.thread_type = "AUTO"  # frame threads add latency, which only files can afford
    return container, stream


def decode(container: InputContainer, stream: VideoStream, target: StreamTarget,
           on_decode_error: Callable[[str], None],
           max_consecutive_errors: int) -> Iterator[tuple[Frame, float | None]]:
    """RGB frames and their time in seconds until the end of the stream.

    A packet that does not decode is counted and skipped (a glitch on the wire);
    a run of them, or a failing read, means the stream is broken: ``StreamError``.
    """
    import av  # noqa: PLC0415 - already loaded by open_stream

    failures = 0
    try:
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError as err:
                failures += 1
                on_decode_error(describe(err, target))
                if failures > max_consecutive_errors:
                    raise StreamError(f"{target.display}: {failures} packets in a row "
                                      f"do not decode: {describe(err, target)}") from err
                continue
            failures = 0
            for frame in decoded:
                yield np.ascontiguousarray(frame.to_ndarray(format="rgb24")), frame.time
    except (av.error.FFmpegError, OSError) as err:
        raise StreamError(f"{target.display} broke: {describe(err, target)}") from err

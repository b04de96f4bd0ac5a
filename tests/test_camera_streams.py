"""Network cameras on loopback: GStreamer's RTSP server and an HTTP MJPEG server.

Both are real servers on real sockets. The RTSP server needs Debian's GStreamer
packages (``.ci/run`` installs them); without them the RTSP tests skip locally
and fail under EDGEFLEET_PRODUCTION=1. Waits are generous and bounded; no test
asserts how fast anything is.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from camera_helpers import (
    WAIT_S,
    MjpegServer,
    RtspServer,
    colour,
    free_port,
    write_video,
)
from waiting import wait_for

from agent.common.errors import CameraStalledError
from agent.inference.capture import CameraSource, CaptureOptions
from agent.inference.sources import Frame, SourceState, open_source

SOLID = (200, 100, 50)  # distinct channels, so a BGR frame cannot pass for RGB
SOLID_ARGB = "0xffc86432"
# Fast retries so a restarted server is found quickly; long reads for slow machines.
LIVE = CaptureOptions(read_timeout_s=WAIT_S, stall_after_s=WAIT_S, open_timeout_s=20.0,
                      io_timeout_s=5.0, backoff_initial_s=0.1, backoff_max_s=1.0)


@pytest.fixture
def rtsp() -> Iterator[RtspServer]:
    server = RtspServer(free_port(), "--color", SOLID_ARGB).start()
    yield server
    server.stop()


@pytest.fixture
def mjpeg() -> Iterator[MjpegServer]:
    server = MjpegServer(rgb=SOLID)
    yield server
    server.stop()


def assert_solid(frame: Frame, shape: tuple[int, int, int], tolerance: int) -> None:
    assert frame.shape == shape and frame.dtype == np.uint8 and frame.flags.c_contiguous
    mean = frame.reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - SOLID).max() <= tolerance, mean


def wait_for_state(source: CameraSource, state: SourceState) -> None:
    wait_for(f"{source.description} to be {state.value}",
             lambda: source.stats().state is state, WAIT_S)


def read_past_start(source: CameraSource, frames: int = 45) -> Frame:
    """A live stream joined mid-GOP may start with a few frames still being refreshed."""
    frame = next(source)
    for _ in range(frames):
        frame = next(source)
    return frame


def test_rtsp_stream_from_gstreamer(rtsp: RtspServer) -> None:
    with open_source(rtsp.url, (1, 224, 224, 3), capture=LIVE) as source:
        assert isinstance(source, CameraSource)
        frame = read_past_start(source)
        assert_solid(frame, (480, 640, 3), tolerance=8)
        stats = source.stats()
        health = source.health()
    assert stats.state is SourceState.STREAMING and health.ok and health.error == ""
    assert stats.frames_captured >= stats.frames_delivered == 46
    assert stats.camera_fps > 0 and stats.reconnects == 0 and stats.downtime_s == 0


def test_rtsp_camera_that_drops_reconnects(rtsp: RtspServer) -> None:
    with open_source(rtsp.url, capture=LIVE) as source:
        assert isinstance(source, CameraSource)
        next(source)
        rtsp.stop()  # SIGKILL: the camera loses power mid-stream
        wait_for_state(source, SourceState.RECONNECTING)
        assert source.health().ok and source.health().error  # not an error yet, but why
        rtsp.start()  # back on the same port
        assert_solid(read_past_start(source, 5), (480, 640, 3), tolerance=8)
        stats = source.stats()
    assert stats.reconnects >= 1 and stats.downtime_s > 0
    assert stats.state is SourceState.STREAMING


def test_rtsp_latest_frame_wins_over_a_slow_model(rtsp: RtspServer) -> None:
    with open_source(rtsp.url, capture=LIVE) as source:
        for _ in range(200):
            next(source)
            threading.Event().wait(0.2)  # a model at 5 fps on a 30 fps camera
            if source.stats().frames_dropped >= 20:
                break
        stats = source.stats()
    assert stats.frames_dropped >= 20
    assert stats.frames_captured - stats.frames_delivered - stats.frames_dropped in (0, 1)


def test_rtsp_server_plays_a_file_in_order(tmp_path: Path) -> None:
    # The benchmark's setup: an H.264 file sent as it is, without re-encoding.
    path = tmp_path / "clip.mp4"
    colours = write_video(path, 60, size=(320, 240))
    server = RtspServer(free_port(), "--file", str(path)).start()
    try:
        with open_source(server.url, capture=LIVE) as source:
            seen: list[int] = []
            while len(seen) < 10:
                mean = next(source).reshape(-1, 3).mean(axis=0)
                seen.append(int(np.argmin([np.abs(mean - c).max() for c in colours])))
                assert np.abs(mean - colour(seen[-1])).max() <= 12
    finally:
        server.stop()
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_http_mjpeg_stream(mjpeg: MjpegServer) -> None:
    with open_source(mjpeg.url, capture=LIVE) as source:
        frames = [next(source) for _ in range(10)]
        stats = source.stats()
    for frame in frames:
        assert_solid(frame, (120, 160, 3), tolerance=4)
    assert stats.frames_delivered == 10 and stats.camera_fps > 0 and stats.decode_errors == 0


def test_http_camera_that_drops_reconnects(mjpeg: MjpegServer) -> None:
    with open_source(mjpeg.url, capture=LIVE) as source:
        assert isinstance(source, CameraSource)
        next(source)
        mjpeg.stop()
        wait_for_state(source, SourceState.RECONNECTING)
        down = source.stats().downtime_s
        back = MjpegServer(port=mjpeg.port, rgb=SOLID)
        try:
            assert_solid(next(source), (120, 160, 3), tolerance=4)
            stats = source.stats()
        finally:
            back.stop()
    assert stats.reconnects == 1 and stats.downtime_s >= down > 0
    assert back.clients >= 1


def test_corrupt_frames_are_counted_and_skipped() -> None:
    server = MjpegServer(rgb=SOLID, corrupt_every=3)
    try:
        with open_source(server.url, capture=LIVE) as source:
            frames = [next(source) for _ in range(10)]
            wait_for("a decode error", lambda: source.stats().decode_errors > 0, WAIT_S)
            assert source.health().ok
    finally:
        server.stop()
    for frame in frames:
        assert_solid(frame, (120, 160, 3), tolerance=4)


def test_a_wrong_camera_url_is_reported(mjpeg: MjpegServer) -> None:
    quick = CaptureOptions(read_timeout_s=1.0, stall_after_s=0.5, backoff_initial_s=0.05)
    with open_source(mjpeg.url.replace("/video", "/nothing"), capture=quick) as source:
        with pytest.raises(CameraStalledError, match="404"):
            next(source)
        health = source.health()
    assert health.state is SourceState.STALLED and "404" in health.error


def test_a_camera_that_never_answers_stalls_and_closes() -> None:
    # Accepts the TCP connection (the kernel does, from the backlog) and says nothing.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/video"
        quick = CaptureOptions(read_timeout_s=1.0, stall_after_s=0.5, open_timeout_s=1.0,
                               io_timeout_s=1.0, backoff_initial_s=0.05)
        source = open_source(url, capture=quick)
        assert isinstance(source, CameraSource)
        with pytest.raises(CameraStalledError, match="no frame"):
            next(source)
        assert source.health().state is SourceState.STALLED
        source.close()  # must not hang on the blocked read
        name = f"capture {source.description}"
        assert all(t.name != name for t in threading.enumerate())

"""file: and v4l2: sources on PyAV, and what every camera source does with bad input.

Video files are written by the test with PyAV's encoders, one known solid colour
per frame, and read back through the real capture thread.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from camera_helpers import WAIT_S, colour, free_port, write_video
from waiting import wait_for

from agent.common.errors import CameraStalledError, FrameSourceError, SourceOpenError
from agent.inference.capture import CameraSource, CaptureOptions
from agent.inference.capture_stream import parse_target, v4l2_options
from agent.inference.sources import Frame, SourceState, open_source

QUICK = CaptureOptions(stall_after_s=0.5, read_timeout_s=1.0, open_timeout_s=2.0,
                       io_timeout_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.2)


def nearest_colour(frame: Frame, colours: list[tuple[int, int, int]]) -> int:
    mean = frame.reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - np.array(c)).max() for c in colours]))


def capture_threads(source: CameraSource) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"capture {source.description}"]


@pytest.mark.parametrize(("codec", "suffix"), [
    ("libx264", "mp4"), ("mjpeg", "avi"), ("mpeg4", "mkv"),
])
def test_every_frame_mode_gives_the_file_back_in_order(
    tmp_path: Path, codec: str, suffix: str
) -> None:
    path = tmp_path / f"clip.{suffix}"
    colours = write_video(path, 24, codec)
    with open_source(f"file:{path}", (1, 224, 224, 3), every_frame=True) as source:
        frames = list(source)
        stats = source.stats()
    assert len(frames) == 24
    for index, (frame, rgb) in enumerate(zip(frames, colours, strict=True)):
        assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
        assert frame.flags.c_contiguous and not frame.flags.writeable
        # Lossy codecs and YUV round trips move a solid colour by a few levels at most.
        assert np.abs(frame.astype(int) - rgb).max() <= 12, (index, frame[60, 80], rgb)
        assert nearest_colour(frame, colours) == index
    assert stats.state is SourceState.ENDED
    assert (stats.frames_captured, stats.frames_delivered, stats.frames_dropped) == (24, 24, 0)


def test_every_frame_mode_never_drops_for_a_slow_consumer(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    colours = write_video(path, 12)
    options = CaptureOptions(queue_frames=2)
    with open_source(f"file:{path}", every_frame=True, capture=options) as source:
        seen = []
        for frame in source:
            time.sleep(0.05)  # slower than the decoder: it must wait, not drop
            seen.append(nearest_colour(frame, colours))
        assert seen == list(range(12))
        assert source.stats().frames_dropped == 0
        with pytest.raises(StopIteration):
            next(source)


def test_every_frame_mode_can_loop(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    colours = write_video(path, 5)
    with open_source(f"file:{path}", every_frame=True, loop=True) as source:
        seen = [nearest_colour(next(source), colours) for _ in range(12)]
    assert seen == [0, 1, 2, 3, 4] * 2 + [0, 1]


def test_files_play_in_real_time_like_a_camera(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, 10, fps=10)
    with open_source(f"file:{path}") as source:  # the daemon's default: paced and looping
        started = time.monotonic()
        for _ in range(10):
            next(source)
        # A lower bound only: a loaded machine makes this slower, never faster.
        assert time.monotonic() - started >= 0.7
        next(source)  # the file loops: no StopIteration
        assert 0 < source.captured_ns <= time.perf_counter_ns()
        assert source.stats().reconnects == 0


def test_latest_frame_wins_when_the_consumer_is_slow(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    colours = write_video(path, 30, fps=30)
    with open_source(f"file:{path}") as source:
        for _ in range(100):
            frame = next(source)
            assert frame.shape == (120, 160, 3)
            time.sleep(0.15)  # a model at ~6 fps on a 30 fps camera
            if source.stats().frames_dropped >= 10:
                break
        stats = source.stats()
        assert nearest_colour(frame, colours) in range(30)
    assert stats.frames_dropped >= 10
    # Every decoded frame was either delivered, dropped, or is the one waiting.
    assert stats.frames_captured - stats.frames_delivered - stats.frames_dropped in (0, 1)
    assert stats.camera_fps > 0


def test_close_stops_the_capture_thread(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, 10)
    source = open_source(f"file:{path}")
    assert isinstance(source, CameraSource)
    next(source)
    assert capture_threads(source)
    source.close()
    assert not capture_threads(source)
    assert source.stats().state is SourceState.CLOSED
    assert not source.health().ok
    with pytest.raises(FrameSourceError, match="is closed"):
        next(source)


def test_a_forgotten_source_stops_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, 10)
    source = open_source(f"file:{path}")
    name = f"capture {source.description}"
    del source
    gc.collect()
    wait_for("the capture thread to stop",
             lambda: all(t.name != name for t in threading.enumerate()), WAIT_S)


def test_a_silent_camera_stalls_without_blocking_forever() -> None:
    port = free_port()  # nothing listens: every connection is refused
    source = open_source(f"rtsp://admin:secret@127.0.0.1:{port}/cam", capture=QUICK)
    assert source.description == f"rtsp://admin:***@127.0.0.1:{port}/cam"
    with source:
        with pytest.raises(CameraStalledError) as caught:
            next(source)  # bounded by read_timeout_s
        health = source.health()
        stats = source.stats()
    message = str(caught.value)
    assert "Connection refused" in message and "secret" not in message
    assert "\n" not in message
    assert health.state is SourceState.STALLED and not health.ok
    assert "Connection refused" in health.error
    assert stats.state is SourceState.STALLED
    assert stats.frames_captured == 0 and stats.downtime_s > 0 and stats.reconnects == 0


def write_audio(path: Path) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: p.write_bytes(os.urandom(4096)), "cannot be opened"),
    (lambda p: p.write_text("this is a text file, not a video\n" * 20), "cannot be opened"),
    (lambda p: p.write_bytes(b""), "cannot be opened"),
    (write_audio, "has no video stream"),
    (lambda p: p.mkdir(), "is not a file"),
    (lambda p: None, "does not exist"),
])
def test_files_that_are_not_videos(tmp_path: Path, make: object, match: str) -> None:
    path = tmp_path / "input.mp4"
    assert callable(make)
    make(path)
    with pytest.raises(SourceOpenError, match=match) as caught:
        open_source(f"file:{path}")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_video_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "whole.mp4"
    write_video(whole, 30)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:2000])  # the index (moov) is at the end
    with pytest.raises(SourceOpenError, match="cannot be opened"):
        open_source(f"file:{cut}")


@pytest.mark.parametrize(("spec", "match"), [
    ("file:", "needs a path"),
    ("rtsp://", "has no host"),
    ("http:///video", "has no host"),
    ("ftp://camera/video", "unknown frame source"),
    ("file", "unknown frame source"),
    ("v4l2:", "needs a device"),
    ("v4l2:/dev/video0?format=h264", "input format 'h264'"),
    ("v4l2:/dev/video0?size=big", "WIDTHxHEIGHT"),
    ("v4l2:/dev/video0?fps=0", "frame rate"),
    ("v4l2:/dev/video0?fps=fast", "frame rate"),
    ("v4l2:/dev/video0?zoom=2", "unknown V4L2 option 'zoom'"),
    ("v4l2:/dev/video0?format", "not key=value"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(FrameSourceError, match=match) as caught:
        open_source(spec)
    assert "\n" not in str(caught.value)


def test_every_frame_mode_is_for_files() -> None:
    with pytest.raises(FrameSourceError, match="every-frame mode needs a file"):
        open_source("rtsp://127.0.0.1:8554/cam", every_frame=True)


@pytest.mark.parametrize("bad", [
    {"stall_after_s": 0}, {"read_timeout_s": -1}, {"backoff_initial_s": 2, "backoff_max_s": 1},
    {"queue_frames": 0},
])
def test_bad_capture_options(bad: dict[str, Any]) -> None:
    with pytest.raises(FrameSourceError, match="capture"):
        CaptureOptions(**bad)


def test_without_pyav_cameras_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, 2)
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails as if not installed
    for spec in ("rtsp://127.0.0.1:8554/cam", "http://127.0.0.1/video", f"file:{path}"):
        with pytest.raises(SourceOpenError, match=r"pip install 'edgefleet\[camera\]'"):
            open_source(spec)
    assert next(open_source("synthetic")).dtype == np.uint8  # the rest of the agent works


# -- V4L2 without a camera: option building and the library's open path ----------------

def test_v4l2_options_for_mjpeg_and_yuyv() -> None:
    assert v4l2_options() == {"input_format": "mjpeg"}
    assert v4l2_options("YUYV", "1280x720", "15") == {
        "input_format": "yuyv422", "video_size": "1280x720", "framerate": "15"}
    target = parse_target("v4l2:/dev/null?format=yuyv422&size=640x480&fps=30")
    assert (target.kind, target.url, target.format, target.live) == (
        "v4l2", "/dev/null", "v4l2", True)
    assert dict(target.options) == {
        "input_format": "yuyv422", "video_size": "640x480", "framerate": "30"}
    default = parse_target("v4l2:/dev/null", v4l2_format="yuyv")
    assert dict(default.options) == {"input_format": "yuyv422"}


@pytest.mark.parametrize("fmt", ["mjpeg", "yuyv"])
def test_v4l2_open_on_a_device_that_is_no_camera(fmt: str) -> None:
    # /dev/null is a character device, so FFmpeg's v4l2 demuxer really tries it.
    with pytest.raises(SourceOpenError, match="Inappropriate ioctl") as caught:
        open_source(f"v4l2:/dev/null?format={fmt}&size=640x480&fps=30")
    assert str(caught.value).startswith("v4l2:/dev/null cannot be opened")


def test_v4l2_missing_device_and_plain_file(tmp_path: Path) -> None:
    with pytest.raises(SourceOpenError, match="No such file or directory"):
        open_source("v4l2:/dev/video-edgefleet-absent")
    (tmp_path / "video0").write_bytes(b"")
    with pytest.raises(SourceOpenError, match="is not a character device"):
        open_source(f"v4l2:{tmp_path / 'video0'}")


def test_colours_are_rgb_not_bgr(tmp_path: Path) -> None:
    path = tmp_path / "red.mp4"
    write_video(path, 3)
    with open_source(f"file:{path}", every_frame=True) as source:
        first = next(source)
    r, g, b = colour(0)
    assert r < g < b  # colour(0) is blue-ish: a BGR frame would reverse the order
    assert first[..., 0].mean() < first[..., 1].mean() < first[..., 2].mean()

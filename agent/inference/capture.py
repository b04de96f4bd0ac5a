"""Live frame sources: a capture thread per camera, the latest frame wins.

As in Frigate, a thread decodes continuously and keeps only the newest frame,
so inference always sees the present and a slow model drops frames (counted)
instead of falling behind. A broken stream is re-opened with bounded
exponential backoff; a camera that delivers nothing for ``stall_after_s`` is an
error state the daemon reports, and ``next()`` never waits longer than
``read_timeout_s``, so the daemon stays responsive with a dead camera.

``file:`` sources are paced at the file's own frame rate like a camera, unless
``every_frame`` asks for every frame in order (no drops, back-pressure on the
decoder), which is how a file is checked frame by frame.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.common.errors import CameraStalledError, FrameSourceError, SourceOpenError
from agent.inference.capture_stream import (
    StreamTarget,
    decode,
    open_stream,
    parse_target,
    require_av,
)
from agent.inference.sources import (
    Frame,
    FrameSource,
    SourceHealth,
    SourceState,
    SourceStats,
)

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

log = logging.getLogger(__name__)

_RUNNING = (SourceState.STARTING, SourceState.STREAMING, SourceState.RECONNECTING)


@dataclass(frozen=True)
class CaptureOptions:
    """Timing of live sources; every duration is in seconds."""

    stall_after_s: float = 10.0  # no frame for this long: the camera is in error
    read_timeout_s: float = 10.0  # the longest next() waits before CameraStalledError
    open_timeout_s: float = 10.0  # connecting, including FFmpeg's stream probe
    io_timeout_s: float = 5.0  # a read blocked this long is a dropped stream
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    fps_window_s: float = 5.0
    queue_frames: int = 4  # every-frame mode: decoded frames buffered ahead
    max_decode_errors: int = 25  # consecutive undecodable packets before re-opening
    rtsp_transport: str = "tcp"  # TCP: no smeared frames from lost UDP packets
    v4l2_format: str = "mjpeg"  # default V4L2 capture format (spec option format=...)
    realtime: bool = True  # pace file: sources at their frame rate

    def __post_init__(self) -> None:
        durations = (self.stall_after_s, self.read_timeout_s, self.open_timeout_s,
                     self.io_timeout_s, self.backoff_initial_s, self.fps_window_s)
        if min(durations) <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise FrameSourceError(f"capture timings must be positive, backoff_max_s >= "
                                   f"backoff_initial_s: {self}")
        if self.queue_frames < 1 or self.max_decode_errors < 0:
            raise FrameSourceError(f"capture needs queue_frames >= 1 and "
                                   f"max_decode_errors >= 0: {self}")


class _Feed:
    """What a camera source and its capture thread share, under one condition."""

    def __init__(self, options: CaptureOptions, every_frame: bool) -> None:
        self.options = options
        self.every_frame = every_frame
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.frames: deque[tuple[Frame, int]] = deque()  # with perf_counter_ns at decode
        self.state = SourceState.STARTING
        self.error = ""
        self.started_at = time.monotonic()
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.down_since: float | None = None
        self.times: deque[float] = deque(maxlen=8192)
        self.captured = self.delivered = self.dropped = 0
        self.decode_errors = self.reconnects = 0
        self.downtime_s = 0.0

    # -- capture thread ------------------------------------------------------------
    def put(self, frame: Frame) -> bool:
        """Hand over a decoded frame; False once the source is closing."""
        with self.cond:
            if self.every_frame:
                while len(self.frames) >= self.options.queue_frames and not self.stopping.is_set():
                    self.cond.wait()
            elif self.frames:
                self.dropped += len(self.frames)  # nobody took it before the next one came
                self.frames.clear()
            if self.stopping.is_set():
                return False
            now = time.monotonic()
            if self.down_since is not None:
                self.downtime_s += now - self.down_since
                self.down_since = None
                if self.first_frame_at is not None:
                    self.reconnects += 1
            if self.first_frame_at is None:
                self.first_frame_at = now
            self.state = SourceState.STREAMING
            self.captured += 1
            self.last_frame_at = now
            self.times.append(now)
            self.frames.append((frame, time.perf_counter_ns()))
            self.cond.notify_all()
            return True

    def lost(self, reason: str) -> None:
        with self.cond:
            if self.stopping.is_set():
                return
            if self.down_since is None:
                # A camera that never came up has been down since the source opened.
                self.down_since = time.monotonic() if self.first_frame_at else self.started_at
            self.state, self.error = SourceState.RECONNECTING, reason
            self.cond.notify_all()

    def finish(self, state: SourceState, reason: str = "") -> None:
        with self.cond:
            if not self.stopping.is_set():
                self.state, self.error = state, reason or self.error
                self.cond.notify_all()

    def decode_error(self, reason: str) -> None:
        with self.cond:
            self.decode_errors += 1
            self.error = reason

    def got_frames_since(self, captured: int) -> bool:
        with self.cond:
            return self.captured > captured

    def stop(self) -> None:
        with self.cond:
            self.stopping.set()
            self.state = SourceState.CLOSED
            self.frames.clear()
            self.cond.notify_all()

    # -- consumer --------------------------------------------------------------------
    def take(self, description: str) -> tuple[Frame, int]:
        with self.cond:
            deadline = time.monotonic() + self.options.read_timeout_s
            while not self.frames:
                if self.state is SourceState.ENDED:
                    raise StopIteration
                if self.state is SourceState.FAILED:
                    raise SourceOpenError(self.error)
                if self.state is SourceState.CLOSED:
                    raise FrameSourceError(f"{description} is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CameraStalledError(f"{description}: {self._silence(time.monotonic())}")
                self.cond.wait(left)
            self.delivered += 1
            if self.every_frame:
                self.cond.notify_all()  # the capture thread may wait for room
            return self.frames.popleft()

    def _silence(self, now: float) -> str:
        since = now - (self.last_frame_at or self.started_at)
        state = self._state(now).value
        return f"no frame for {since:.1f}s ({state}); last error: {self.error or 'none'}"

    def _state(self, now: float) -> SourceState:
        since = now - (self.last_frame_at or self.started_at)
        if self.state in _RUNNING and since > self.options.stall_after_s:
            return SourceState.STALLED
        return self.state

    def stats(self) -> SourceStats:
        with self.cond:
            now = time.monotonic()
            while self.times and self.times[0] < now - self.options.fps_window_s:
                self.times.popleft()
            fps = 0.0
            if self.first_frame_at is not None:
                span = min(self.options.fps_window_s, now - self.first_frame_at)
                fps = len(self.times) / span if span >= 0.25 else 0.0  # too early to tell
            down = self.downtime_s + (now - self.down_since if self.down_since else 0.0)
            return SourceStats(self._state(now), round(fps, 2), self.captured, self.delivered,
                               self.dropped, self.decode_errors, self.reconnects, down)

    def health(self) -> SourceHealth:
        with self.cond:
            now = time.monotonic()
            state = self._state(now)
            if state is SourceState.STALLED:
                return SourceHealth(state, ok=False, error=self._silence(now))
            if state is SourceState.FAILED:
                return SourceHealth(state, ok=False, error=self.error)
            if state is SourceState.RECONNECTING:
                return SourceHealth(state, ok=True, error=self.error)
            return SourceHealth(state, ok=state is not SourceState.CLOSED)


class _Pacer:
    """Sleeps so a file plays at its own frame rate, as a camera would deliver it."""

    def __init__(self, stop: threading.Event, interval_s: float) -> None:
        self.stop = stop
        self.interval_s = interval_s
        self.origin: float | None = None
        self.last_t = -interval_s

    def wait(self, t: float | None) -> None:
        t = self.last_t + self.interval_s if t is None else t
        self.last_t = t
        now = time.monotonic()
        # Start the clock at the first frame, and again after falling a second behind,
        # so a slow decoder plays on from now instead of rushing to catch up.
        if self.origin is None or self.origin + t < now - 1.0:
            self.origin = now - t
        delay = self.origin + t - now
        if delay > 0:
            self.stop.wait(delay)


def _pump(feed: _Feed, opened: tuple[InputContainer, VideoStream], target: StreamTarget,
          pace: bool) -> None:
    container, stream = opened
    rate = stream.average_rate or stream.guessed_rate
    pacer = _Pacer(feed.stopping, 1.0 / float(rate) if rate else 1 / 30) if pace else None
    frames = decode(container, stream, target, feed.decode_error, feed.options.max_decode_errors)
    for frame, t in frames:
        if pacer is not None:
            pacer.wait(t)
        frame.setflags(write=False)
        if not feed.put(frame):
            return


def _capture(feed: _Feed, target: StreamTarget, loop: bool, pace: bool,
             opened: tuple[InputContainer, VideoStream] | None) -> None:
    """The capture thread: open, decode, hand over; re-open after failures."""
    opts = feed.options
    backoff = opts.backoff_initial_s
    while not feed.stopping.is_set():
        if opened is None:
            try:
                opened = open_stream(target, opts.open_timeout_s, opts.io_timeout_s)
            except SourceOpenError as err:
                log.error("frame source %s failed: %s", target.display, err)
                feed.finish(SourceState.FAILED, str(err))
                return
            except FrameSourceError as err:
                _retry_later(feed, str(err), backoff)
                backoff = min(backoff * 2, opts.backoff_max_s)
                continue
        before = feed.captured
        reason = ""
        try:
            _pump(feed, opened, target, pace)
        except FrameSourceError as err:
            reason = str(err)
        finally:
            opened[0].close()
            opened = None
        if feed.stopping.is_set():
            break
        got_frames = feed.got_frames_since(before)
        if got_frames:
            backoff = opts.backoff_initial_s
        if not reason and not target.live:
            if loop and got_frames:
                continue  # play the file again, without a pause and without a reconnect
            feed.finish(SourceState.ENDED)
            return
        _retry_later(feed, reason or f"{target.display} ended", backoff)
        backoff = min(backoff * 2, opts.backoff_max_s)
    log.debug("capture thread for %s stopped", target.display)


def _capture_thread(feed: _Feed, target: StreamTarget, loop: bool, pace: bool,
                    opened: tuple[InputContainer, VideoStream] | None) -> None:
    try:
        _capture(feed, target, loop, pace, opened)
    except Exception as err:
        # A thread that died quietly would pass for a stalled camera; say what broke.
        log.exception("capture thread for %s crashed", target.display)
        feed.finish(SourceState.FAILED, f"{target.display}: capture failed: {err!r}")


def _retry_later(feed: _Feed, reason: str, backoff: float) -> None:
    # Warn when a working stream drops; repeated failures of a dead one are debug noise.
    level = logging.WARNING if feed.state is not SourceState.RECONNECTING else logging.DEBUG
    log.log(level, "frame source lost: %s; retrying in %.1fs", reason, backoff)
    feed.lost(reason)
    feed.stopping.wait(backoff)


class CameraSource(FrameSource):
    """A live source; ``close()`` it (or use ``with``) to stop its capture thread."""

    def __init__(self, target: StreamTarget, options: CaptureOptions, *,
                 every_frame: bool = False, loop: bool = True) -> None:
        self.description = target.display
        self.target = target
        self.options = options
        self.every_frame = every_frame
        self._feed = _Feed(options, every_frame)
        opened = None
        if target.kind in ("file", "v4l2"):
            # A local file or device that does not open now will not open later either.
            try:
                opened = open_stream(target, options.open_timeout_s, options.io_timeout_s)
            except SourceOpenError:
                raise
            except FrameSourceError as err:
                raise SourceOpenError(str(err)) from err
        pace = options.realtime and not every_frame and not target.live
        self._thread = threading.Thread(
            target=_capture_thread, args=(self._feed, target, loop, pace, opened),
            name=f"capture {target.display}", daemon=True,
        )
        self._thread.start()
        # The thread holds only the feed, so a source dropped without close() still stops it.
        self._finalizer = weakref.finalize(self, self._feed.stop)
        log.info("frame source %s opened (%s)", target.display,
                 "every frame" if every_frame else "latest frame")

    def __next__(self) -> Frame:
        frame, self.captured_ns = self._feed.take(self.description)
        return frame

    def stats(self) -> SourceStats:
        return self._feed.stats()

    def health(self) -> SourceHealth:
        return self._feed.health()

    def close(self) -> None:
        self._finalizer()
        self._thread.join(timeout=max(self.options.open_timeout_s, self.options.io_timeout_s) + 1)
        if self._thread.is_alive():
            log.warning("capture thread for %s did not stop in time", self.description)


def open_camera(spec: str, options: CaptureOptions | None = None, *,
                every_frame: bool = False, loop: bool = True) -> CameraSource:
    """Open ``file:``, ``v4l2:``, ``rtsp(s)://`` or ``http(s)://`` (MJPEG) sources."""
    opts = options or CaptureOptions()
    target = parse_target(spec, rtsp_transport=opts.rtsp_transport, v4l2_format=opts.v4l2_format)
    require_av()
    if every_frame and target.live:
        raise FrameSourceError(f"every-frame mode needs a file: source; {target.display} is a "
                               "live camera, which delivers its latest frame")
    return CameraSource(target, opts, every_frame=every_frame, loop=loop)

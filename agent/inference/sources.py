"""Frame sources: where the inference loop gets its frames, in camera space.

Every source yields C-contiguous, read-only ``uint8`` arrays of shape (H, W, 3)
in RGB order at the camera's own size; turning them into the model's input
tensor is the preprocessing module's job, so no source resizes or normalises.

Specs:
- ``dir:PATH``: PNG/JPEG images (through Pillow, optional) and ``.npy`` arrays,
  sorted by name and cycled (one pass in every-frame mode).
- ``synthetic`` or ``synthetic:SEED``: deterministic pseudo-random frames from a
  small pool generated once, so producing a frame costs nothing.
- ``file:PATH``, ``v4l2:/dev/videoN``, ``rtsp://...``, ``http(s)://...`` (MJPEG):
  live sources on PyAV, in ``agent.inference.capture`` (extra ``camera``).
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import FrameSourceError

if TYPE_CHECKING:
    from agent.inference.capture import CaptureOptions

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_SUFFIXES = frozenset({".npy"})
CAMERA_PREFIXES = ("file:", "v4l2:", "rtsp://", "rtsps://", "http://", "https://")
SYNTHETIC_SIZE = (480, 640)  # HxW of synthetic frames when no shape is given
Frame = npt.NDArray[np.uint8]


class SourceState(str, enum.Enum):
    """Where a source is; the value is what telemetry carries."""

    STARTING = "starting"  # no frame yet, first connection under way
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"  # the stream dropped; retrying with backoff
    STALLED = "stalled"  # nothing delivered for longer than the stall limit: an error
    ENDED = "ended"  # a file (or a directory in every-frame mode) has no more frames
    FAILED = "failed"  # an error no retry can fix
    CLOSED = "closed"


@dataclass(frozen=True)
class SourceStats:
    """Counters since the source was opened, for telemetry windows."""

    state: SourceState
    camera_fps: float  # frames decoded per second over the recent window
    frames_captured: int
    frames_delivered: int
    frames_dropped: int  # replaced by a newer frame before anyone took them
    decode_errors: int
    reconnects: int
    downtime_s: float  # time without a working stream after a failure

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out


@dataclass(frozen=True)
class SourceHealth:
    """What the daemon reports about its camera: ``error`` is empty when ``ok``."""

    state: SourceState
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class FrameConfig:
    """Limits for frame sources."""

    # Decoded frames kept in memory; beyond this a directory is re-read each cycle.
    cache_bytes: int = 64 * 1024 * 1024
    max_files: int = 100_000
    synthetic_pool: int = 8
    # Float .npy frames may stray this far outside [0, 1] (rounding) before refusal.
    range_tolerance: float = 1e-3


def frame_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """HxWxC from a model input shape, with or without a leading batch axis of 1."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 4 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 3 or any(d < 1 for d in dims) or dims[2] not in (1, 3):
        raise FrameSourceError(f"frame shape {tuple(shape)} is not HxWxC with C of 1 or 3")
    return dims[0], dims[1], dims[2]


class FrameSource(abc.ABC):
    """An iterator of camera-space frames; live sources run a thread until closed."""

    description = "frames"
    # time.perf_counter_ns() when the last frame returned was captured (decoded, or
    # read from memory), for capture-to-result latency.
    captured_ns = 0

    def __iter__(self) -> Iterator[Frame]:
        return self

    @abc.abstractmethod
    def __next__(self) -> Frame: ...

    @abc.abstractmethod
    def stats(self) -> SourceStats: ...

    def health(self) -> SourceHealth:
        return SourceHealth(self.stats().state, ok=True)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the camera; a closed source yields no more frames."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _MemorySource(FrameSource):
    """Frames already in memory: nothing is ever dropped, late or reconnected."""

    def __init__(self) -> None:
        self._delivered = 0
        self._state = SourceState.STREAMING

    def _deliver(self, frame: Frame) -> Frame:
        if self._state is SourceState.CLOSED:
            raise FrameSourceError(f"{self.description} is closed")
        self._delivered += 1
        self.captured_ns = time.perf_counter_ns()
        return frame

    def stats(self) -> SourceStats:
        n = self._delivered
        return SourceStats(self._state, 0.0, n, n, 0, 0, 0, 0.0)

    def close(self) -> None:
        self._state = SourceState.CLOSED


class SyntheticSource(_MemorySource):
    def __init__(self, size: tuple[int, int], seed: int, config: FrameConfig) -> None:
        super().__init__()
        self.description = f"synthetic:{seed}"
        rng = np.random.default_rng(seed)
        shape = (size[0], size[1], 3)
        self._pool = [
            _readonly(rng.integers(0, 256, shape, dtype=np.uint8))
            for _ in range(config.synthetic_pool)
        ]
        self._next = 0

    def __next__(self) -> Frame:
        frame = self._pool[self._next]
        self._next = (self._next + 1) % len(self._pool)
        return self._deliver(frame)


class DirSource(_MemorySource):
    def __init__(self, path: Path, config: FrameConfig, *, loop: bool = True) -> None:
        super().__init__()
        self.description = f"dir:{path}"
        self._files = _list_frame_files(path, config)
        self._config = config
        self._loop = loop
        self._cache: dict[Path, list[Frame]] = {}
        self._cached_bytes = 0
        self._pending: list[Frame] = []
        self._file_index = 0
        self._last_error = ""

    @property
    def file_count(self) -> int:
        return len(self._files)

    def __next__(self) -> Frame:
        while not self._pending:
            if not self._files:
                raise FrameSourceError(f"{self.description} has no readable frames left; "
                                       f"last error: {self._last_error}")
            if self._file_index >= len(self._files) and not self._loop:
                self._state = SourceState.ENDED
                raise StopIteration
            self._file_index %= len(self._files)
            path = self._files[self._file_index]
            try:
                frames = self._load(path)
            except FrameSourceError as err:
                # One corrupt file must not stop a camera; drop it and say so.
                log.warning("skipping frame file: %s", err)
                self._last_error = str(err)
                del self._files[self._file_index]
                continue
            self._file_index += 1
            self._pending = list(reversed(frames))
        return self._deliver(self._pending.pop())

    def _load(self, path: Path) -> list[Frame]:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        frames = _read_frames(path, self._config)
        size = sum(f.nbytes for f in frames)
        if self._cached_bytes + size <= self._config.cache_bytes:
            self._cache[path] = frames
            self._cached_bytes += size
        return frames


def _readonly(frame: Frame) -> Frame:
    frame.setflags(write=False)
    return frame


def _list_frame_files(path: Path, config: FrameConfig) -> list[Path]:
    if not path.is_dir():
        raise FrameSourceError(f"frame directory {path} does not exist or is not a directory")
    try:
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".")
            and p.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES
        )
    except OSError as err:
        raise FrameSourceError(f"frame directory {path} cannot be listed: {err}") from err
    if not files:
        raise FrameSourceError(
            f"frame directory {path} holds no .png, .jpg, .jpeg or .npy files"
        )
    if len(files) > config.max_files:
        raise FrameSourceError(f"frame directory {path} has {len(files)} files, over the "
                               f"limit of {config.max_files}")
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files) and not _pillow_available():
        raise FrameSourceError(
            f"frame directory {path} holds images but Pillow is not installed; "
            "install Pillow or convert the frames to .npy"
        )
    return files


def _pillow_available() -> bool:
    try:
        import PIL.Image  # noqa: F401, PLC0415 - optional dependency, checked at open time
    except ImportError:
        return False
    return True


def _read_frames(path: Path, config: FrameConfig) -> list[Frame]:
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return [_readonly(f) for f in _read_npy(path, config)]
    return [_readonly(_read_image(path))]


def _read_image(path: Path) -> Frame:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - optional dependency

    try:
        with Image.open(path) as src:
            return np.ascontiguousarray(np.asarray(src.convert("RGB"), dtype=np.uint8))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise FrameSourceError(f"image {path} cannot be decoded: {err}") from err


def _read_npy(path: Path, config: FrameConfig) -> list[Frame]:
    """One HxW[xC] frame or a batch NxHxWxC, C of 1 or 3; uint8, or legacy floats in [0, 1]."""
    try:
        arr: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise FrameSourceError(f"array {path} cannot be read as .npy: {err}") from err
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[3] not in (1, 3) or min(arr.shape[1:3], default=0) < 1:
        raise FrameSourceError(
            f"array {path} has shape {arr.shape}; expected HxW, HxWx1 or HxWx3, "
            "optionally with a leading batch axis"
        )
    if arr.shape[0] == 0:
        raise FrameSourceError(f"array {path} holds no frames")
    if arr.dtype == np.uint8:
        frames: Frame = arr
    elif np.issubdtype(arr.dtype, np.floating):
        frames = _floats_to_uint8(path, arr, config.range_tolerance)
    else:
        raise FrameSourceError(f"array {path} has dtype {arr.dtype}; expected uint8 or float")
    if frames.shape[3] == 1:
        frames = np.repeat(frames, 3, axis=3)
    return [np.ascontiguousarray(f) for f in frames]


def _floats_to_uint8(path: Path, arr: npt.NDArray[Any], tolerance: float) -> Frame:
    """Legacy [0, 1] frames, mapped to the uint8 values a camera would have given."""
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise FrameSourceError(f"array {path} holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < -tolerance or high > 1.0 + tolerance:
        raise FrameSourceError(
            f"array {path} values span [{low:.3g}, {high:.3g}]; float frames must be in "
            "[0, 1] (store camera frames as uint8)"
        )
    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


def open_source(
    spec: str,
    shape: Sequence[int] | None = None,
    config: FrameConfig | None = None,
    *,
    every_frame: bool = False,
    loop: bool | None = None,
    capture: CaptureOptions | None = None,
) -> FrameSource:
    """Open the frame source described by ``spec``.

    ``shape`` (a model input shape) only sets the size of synthetic frames.
    ``every_frame`` delivers every frame in order instead of the latest one (file
    and directory sources); ``loop`` restarts files and directories at their end,
    by default unless ``every_frame``. ``capture`` tunes live sources.
    """
    cfg = config or FrameConfig()
    repeat = not every_frame if loop is None else loop
    kind, sep, arg = spec.partition(":")
    if kind == "synthetic":
        size = frame_shape(shape)[:2] if shape is not None else SYNTHETIC_SIZE
        return SyntheticSource(size, _seed(arg) if sep else 0, cfg)
    if kind == "dir":
        if not arg:
            raise FrameSourceError("frame source 'dir:' needs a path, as in dir:/var/frames")
        source = DirSource(Path(arg).expanduser(), cfg, loop=repeat)
        log.info("frame source %s: %d files", source.description, source.file_count)
        return source
    if spec.startswith(CAMERA_PREFIXES):
        from agent.inference.capture import open_camera  # noqa: PLC0415 - PyAV only for cameras

        return open_camera(spec, capture, every_frame=every_frame, loop=repeat)
    raise FrameSourceError(
        f"unknown frame source {spec!r}; expected dir:PATH, synthetic[:SEED], file:PATH, "
        "v4l2:/dev/videoN, rtsp://... or http(s)://..."
    )


def _seed(arg: str) -> int:
    try:
        seed = int(arg)
    except ValueError as err:
        raise FrameSourceError(f"synthetic seed {arg!r} is not an integer") from err
    if seed < 0:
        raise FrameSourceError(f"synthetic seed {seed} must not be negative")
    return seed

"""Frame sources: where the inference loop gets its float32 HxWxC frames in [0, 1].

Specs:
- ``dir:PATH``: PNG/JPEG images (through Pillow, optional) and ``.npy`` arrays,
  sorted by name and cycled forever. Images are resized to the model's HxW.
- ``synthetic`` or ``synthetic:SEED``: deterministic pseudo-random frames from a
  small pool generated once, so producing a frame costs nothing.

Frames are returned read-only because cached frames are shared between cycles.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import FrameSourceError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_SUFFIXES = frozenset({".npy"})
Frame = npt.NDArray[np.float32]


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
    """An endless iterator of float32 HxWxC frames."""

    description = "frames"

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __iter__(self) -> Iterator[Frame]:
        return self

    @abc.abstractmethod
    def __next__(self) -> Frame: ...


class SyntheticSource(FrameSource):
    def __init__(self, shape: tuple[int, int, int], seed: int, config: FrameConfig) -> None:
        super().__init__(shape)
        self.description = f"synthetic:{seed}"
        rng = np.random.default_rng(seed)
        self._pool = [
            _readonly(rng.random(shape, dtype=np.float32)) for _ in range(config.synthetic_pool)
        ]
        self._next = 0

    def __next__(self) -> Frame:
        frame = self._pool[self._next]
        self._next = (self._next + 1) % len(self._pool)
        return frame


class DirSource(FrameSource):
    def __init__(self, shape: tuple[int, int, int], path: Path, config: FrameConfig) -> None:
        super().__init__(shape)
        self.description = f"dir:{path}"
        self._files = _list_frame_files(path, config)
        self._config = config
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
        return self._pending.pop()

    def _load(self, path: Path) -> list[Frame]:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        frames = _read_frames(path, self.shape, self._config)
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


def _read_frames(path: Path, shape: tuple[int, int, int], config: FrameConfig) -> list[Frame]:
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return [_readonly(f) for f in _read_npy(path, shape, config)]
    return [_readonly(_read_image(path, shape))]


def _read_image(path: Path, shape: tuple[int, int, int]) -> Frame:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - optional dependency

    height, width, channels = shape
    try:
        with Image.open(path) as src:
            img = src.convert("RGB" if channels == 3 else "L")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise FrameSourceError(f"image {path} cannot be decoded: {err}") from err
    frame = pixels.astype(np.float32) / np.float32(255.0)
    return frame.reshape(shape)


def _read_npy(path: Path, shape: tuple[int, int, int], config: FrameConfig) -> list[Frame]:
    """A .npy holds one HxW[xC] frame or a batch NxHxWxC; uint8 is scaled by 1/255."""
    try:
        arr: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise FrameSourceError(f"array {path} cannot be read as .npy: {err}") from err
    height, width, channels = shape
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:3] != (height, width) or arr.shape[3] not in (1, channels):
        raise FrameSourceError(
            f"array {path} has shape {arr.shape}; expected {height}x{width}x{channels}, "
            "optionally with a leading batch axis"
        )
    if arr.shape[0] == 0:
        raise FrameSourceError(f"array {path} holds no frames")
    if arr.dtype == np.uint8:
        frames = arr.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        frames = arr.astype(np.float32)
        if not np.isfinite(frames).all():
            raise FrameSourceError(f"array {path} holds NaN or infinite values")
        low, high = float(frames.min()), float(frames.max())
        tol = config.range_tolerance
        if low < -tol or high > 1.0 + tol:
            raise FrameSourceError(
                f"array {path} values span [{low:.3g}, {high:.3g}]; frames must be in [0, 1]"
            )
        np.clip(frames, 0.0, 1.0, out=frames)
    else:
        raise FrameSourceError(f"array {path} has dtype {arr.dtype}; expected uint8 or float")
    if frames.shape[3] != channels:
        frames = np.repeat(frames, channels, axis=3)
    return [np.ascontiguousarray(f) for f in frames]


def open_source(spec: str, shape: Sequence[int], config: FrameConfig | None = None) -> FrameSource:
    """Open the frame source described by ``spec`` for frames of ``shape`` (HxWxC)."""
    cfg = config or FrameConfig()
    dims = frame_shape(shape)
    kind, sep, arg = spec.partition(":")
    if kind == "synthetic":
        if not sep:
            return SyntheticSource(dims, 0, cfg)
        try:
            seed = int(arg)
        except ValueError as err:
            raise FrameSourceError(f"synthetic seed {arg!r} is not an integer") from err
        if seed < 0:
            raise FrameSourceError(f"synthetic seed {seed} must not be negative")
        return SyntheticSource(dims, seed, cfg)
    if kind == "dir":
        if not arg:
            raise FrameSourceError("frame source 'dir:' needs a path, as in dir:/var/frames")
        source = DirSource(dims, Path(arg).expanduser(), cfg)
        log.info("frame source %s: %d files", source.description, source.file_count)
        return source
    raise FrameSourceError(
        f"unknown frame source {spec!r}; expected 'dir:PATH', 'synthetic' or 'synthetic:SEED'"
    )

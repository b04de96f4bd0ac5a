"""Golden-set evaluation: a release's small labelled set, scored on the device's own runtime.

The set ships as its own TUF target, an ``.npz`` (format in docs/data-sets.md):

- ``x``: uint8 camera-space images, N x H x W x 3 RGB at any size, preprocessed
  by the release's own input contract, so the set tests the whole pixel path;
- ``y``: integer class ids, one per image.

The older format, float ``x`` in [0, 1] at the model's own H x W x C, is still
read: its pixels are rounded to uint8 (``round(255 x)``) and go through the
same contract. The server scores the set once at publish time as a reference;
each device scores it again after install, on its real runtime and delegate,
and rolls back when the overall accuracy is below the release's minimum.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ModelError, ProtocolError
from agent.inference.classifier import InferenceEngine
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import Model

MAX_SAMPLES = 5000
MAX_SIDE = 4096  # camera-space images larger than this are not a golden set
MAX_PIXEL_BYTES = 512 * 1024 * 1024  # decoded x, whatever the .npz compresses it to
FLOAT_TOLERANCE = 1e-3  # old-format floats may stray this far outside [0, 1] (rounding)


@dataclass(frozen=True)
class GoldenSetSpec:
    """What a model manifest's ``extra["golden_set"]`` says."""

    path: str
    min_accuracy: float
    count: int
    reference_accuracy: float | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> GoldenSetSpec | None:
        raw = extra.get("golden_set")
        if raw is None:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
            raise ProtocolError("golden_set must be an object with a target path")
        minimum, count, ref = (
            raw.get("min_accuracy"),
            raw.get("count"),
            raw.get("reference_accuracy"),
        )
        if not isinstance(minimum, (int, float)) or not 0.0 <= float(minimum) <= 1.0:
            raise ProtocolError("golden_set.min_accuracy must be a number in [0, 1]")
        if not isinstance(count, int) or not 0 < count <= MAX_SAMPLES:
            raise ProtocolError(f"golden_set.count must be 1..{MAX_SAMPLES}")
        if ref is not None and not isinstance(ref, (int, float)):
            raise ProtocolError("golden_set.reference_accuracy must be a number")
        return cls(raw["path"], float(minimum), count, None if ref is None else float(ref))

    def to_extra(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "min_accuracy": self.min_accuracy,
            "count": self.count,
            "reference_accuracy": self.reference_accuracy,
        }


@dataclass(frozen=True)
class GoldenSetResult:
    accuracy: float
    count: int
    per_class: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": round(self.accuracy, 4),
            "count": self.count,
            "per_class": {k: round(v, 4) for k, v in self.per_class.items()},
        }


def _array_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of one .npy member, read from its header before any data is inflated."""
    try:
        with zf.open(name) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except KeyError:
        raise ProtocolError(f"golden set has no array {name[:-4]!r}; it needs x and y") from None
    return tuple(shape), dtype


def _check_headers(data: bytes) -> None:
    """Refuse oversized or malformed arrays before np.load inflates them."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            x_shape, x_dtype = _array_header(zf, "x.npy")
            y_shape, _ = _array_header(zf, "y.npy")
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ProtocolError(f"golden set is not an .npz with arrays x and y: {err}") from err
    if len(x_shape) != 4:
        raise ProtocolError(
            f"golden set x has shape {list(x_shape)}; camera-space images are N x H x W x 3"
        )
    if max(x_shape[1:3]) > MAX_SIDE:
        raise ProtocolError(f"golden set images are {x_shape[1]}x{x_shape[2]}; at most {MAX_SIDE}")
    size = int(np.prod(x_shape, dtype=np.int64)) * x_dtype.itemsize
    if size > MAX_PIXEL_BYTES:
        raise ProtocolError(f"golden set x holds {size} bytes; the limit is {MAX_PIXEL_BYTES}")
    if not 0 < x_shape[0] <= MAX_SAMPLES:
        raise ProtocolError(f"golden set must hold 1..{MAX_SAMPLES} images, has {x_shape[0]}")
    if y_shape != (x_shape[0],):
        raise ProtocolError(
            f"golden set y has shape {list(y_shape)}; it needs one class id per image "
            f"({x_shape[0]})"
        )


def _floats_to_pixels(x: npt.NDArray[Any], frame: tuple[int, ...]) -> npt.NDArray[np.uint8]:
    """The old format: float frames in [0, 1] at the model's own H x W x C."""
    if tuple(x.shape[1:]) != frame:
        raise ProtocolError(
            f"golden set x is float {list(x.shape)}: float sets must be in [0, 1] at the "
            f"model's size {list(frame)}; camera-space sets are uint8 N x H x W x 3"
        )
    if not np.all(np.isfinite(x)) or x.min() < -FLOAT_TOLERANCE or x.max() > 1 + FLOAT_TOLERANCE:
        raise ProtocolError("golden set x is float but not finite values in [0, 1]")
    pixels = np.clip(np.rint(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 1:  # a grey model's frames: luma of (g, g, g) is g again
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels


def load_set(
    data: bytes, input_shape: tuple[int, ...], classes: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Parse and check an ``.npz`` golden set (never unpickles): uint8 images and labels."""
    _check_headers(data)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise ProtocolError(f"golden set is not an .npz with arrays x and y: {err}") from err
    if not np.issubdtype(y.dtype, np.integer):
        raise ProtocolError(f"golden set y is {y.dtype}; it must hold integer class ids")
    if y.min() < 0 or y.max() >= classes:
        raise ProtocolError(
            f"golden set labels must be in 0..{classes - 1}; found {int(y.min())}..{int(y.max())}"
        )
    frame = tuple(int(d) for d in input_shape[1:])
    if np.issubdtype(x.dtype, np.floating):
        pixels = _floats_to_pixels(x, frame)
    elif x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] == 3 and min(x.shape[1:3]) >= 1:
        pixels = x
    else:
        raise ProtocolError(
            f"golden set x is {x.dtype} {list(x.shape)}; it must be uint8 N x H x W x 3 RGB "
            "images (or, in the old format, floats in [0, 1] at the model's size)"
        )
    return np.ascontiguousarray(pixels), y.astype(np.int64, copy=False)


def evaluate(
    model: Model,
    labels: tuple[str, ...],
    x: npt.NDArray[np.uint8],
    y: npt.NDArray[Any],
    preprocess: Preprocessor,
) -> GoldenSetResult:
    """Accuracy overall and per class, on ``model`` as loaded (its runtime and delegate)."""
    engine = InferenceEngine(model, preprocess, labels, top_k=1)
    predicted = np.empty(len(y), dtype=np.int64)
    for i, frame in enumerate(x):
        predicted[i] = engine.run(frame).class_index
    names = engine.labels
    per_class: dict[str, float] = {}
    for cls in np.unique(y):
        mask = y == cls
        per_class[names[int(cls)]] = float(np.mean(predicted[mask] == cls))
    return GoldenSetResult(float(np.mean(predicted == y)), len(y), per_class)


def evaluate_file(
    model: Model, labels: tuple[str, ...], path: Path, preprocess: Preprocessor
) -> GoldenSetResult:
    classes = int(np.prod(model.output.shape))
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelError(f"cannot read golden set {path}: {err}") from err
    x, y = load_set(data, model.input.shape, classes)
    return evaluate(model, labels, x, y, preprocess)

"""Golden-set evaluation: a release's small labelled set, scored on the device's own runtime.

The set ships as its own TUF target (an ``.npz`` with ``x``: float frames in
[0, 1] shaped like the model input without the batch axis, and ``y``: integer
class ids). The server scores it once at publish time as a reference; each
device scores it again after install, on its real runtime and delegate, and
rolls back when the overall accuracy is below the release's minimum.
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
from agent.inference.runtime import Model

MAX_SAMPLES = 5000


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


def load_set(data: bytes, input_shape: tuple[int, ...], classes: int) -> tuple[Any, Any]:
    """Parse and check an ``.npz`` golden set; never unpickles."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise ProtocolError(f"golden set is not an .npz with arrays x and y: {err}") from err
    frame = tuple(input_shape[1:]) if len(input_shape) == 4 else tuple(input_shape)
    if x.ndim != len(frame) + 1 or tuple(x.shape[1:]) != frame:
        raise ProtocolError(f"golden set x has shape {x.shape}; frames must be {frame}")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ProtocolError("golden set y must be one integer class id per frame")
    if not 0 < len(y) <= MAX_SAMPLES:
        raise ProtocolError(f"golden set must hold 1..{MAX_SAMPLES} samples, has {len(y)}")
    if y.min() < 0 or y.max() >= classes:
        raise ProtocolError(f"golden set labels must be in 0..{classes - 1}")
    if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise ProtocolError("golden set x must be finite floats in [0, 1]")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def evaluate(
    model: Model, labels: tuple[str, ...], x: npt.NDArray[Any], y: npt.NDArray[Any]
) -> GoldenSetResult:
    """Accuracy overall and per class, on ``model`` as loaded (its runtime and delegate)."""
    engine = InferenceEngine(model, labels, top_k=1)
    predicted = np.empty(len(y), dtype=np.int64)
    for i, frame in enumerate(x):
        predicted[i] = engine.run(frame).class_index
    names = engine.labels
    per_class: dict[str, float] = {}
    for cls in np.unique(y):
        mask = y == cls
        per_class[names[int(cls)]] = float(np.mean(predicted[mask] == cls))
    return GoldenSetResult(float(np.mean(predicted == y)), len(y), per_class)


def evaluate_file(model: Model, labels: tuple[str, ...], path: Path) -> GoldenSetResult:
    classes = int(np.prod(model.output.shape))
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelError(f"cannot read golden set {path}: {err}") from err
    x, y = load_set(data, model.input.shape, classes)
    return evaluate(model, labels, x, y)

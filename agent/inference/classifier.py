"""One frame in, one classification out, with each stage timed separately.

Latency statistics live elsewhere (a fixed-memory histogram); the engine only
reports per-frame timings in each Result and keeps per-class counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ConfigError, ModelError
from agent.inference.runtime import Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """The outcome of one frame; scores are the model's dequantized outputs."""

    class_index: int
    label: str
    score: float
    top_k: tuple[tuple[str, float], ...]
    pre_ns: int
    invoke_ns: int
    post_ns: int

    @property
    def total_ns(self) -> int:
        return self.pre_ns + self.invoke_ns + self.post_ns


def load_labels(path: str | Path) -> tuple[str, ...]:
    """One label per line; blank trailing lines are ignored, blank inner lines are not."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"labels file {path} cannot be read: {err}") from err
    labels = text.rstrip("\n").split("\n")
    labels = [label.strip() for label in labels]
    if not labels or any(not label for label in labels):
        raise ConfigError(f"labels file {path} has an empty label")
    return tuple(labels)


class InferenceEngine:
    """Runs a classifier Model on float frames in [0, 1] and counts the classes it sees.

    ``input_range`` maps the [0, 1] frame onto the range the model was trained on,
    for example (-1, 1) for MobileNet-style preprocessing.
    """

    def __init__(
        self,
        model: Model,
        labels: Sequence[str] = (),
        top_k: int = 3,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        classes = int(np.prod(model.output.shape))
        if classes < 1:
            raise ModelError(f"model {model.path} output {model.output.shape} holds no classes")
        if labels and len(labels) != classes:
            raise ModelError(
                f"model {model.path} has {classes} output classes but {len(labels)} labels"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        low, high = input_range
        if not high > low:
            raise ConfigError(f"input_range {input_range} must be increasing")
        self.model = model
        self.labels = tuple(labels) if labels else tuple(str(i) for i in range(classes))
        self.top_k = min(top_k, classes)
        self._affine = None if (low, high) == (0.0, 1.0) else (np.float32(high - low),
                                                              np.float32(low))
        self._counts = np.zeros(classes, dtype=np.int64)

    @property
    def inference_count(self) -> int:
        return int(self._counts.sum())

    def class_counts(self) -> dict[str, int]:
        """Counts per label since the last reset; labels never seen are left out."""
        return {self.labels[i]: int(n) for i, n in enumerate(self._counts) if n}

    def reset_counts(self) -> None:
        self._counts[:] = 0

    def run(self, frame: npt.NDArray[Any]) -> Result:
        t0 = time.perf_counter_ns()
        if self._affine is not None:
            span, low = self._affine
            frame = np.asarray(frame, dtype=np.float32) * span + low
        tensor = self.model.quantize_input(frame)
        t1 = time.perf_counter_ns()
        raw = self.model.invoke_raw(tensor)
        t2 = time.perf_counter_ns()
        scores = self.model.dequantize_output(raw).reshape(-1)
        top = _top_k(scores, self.top_k)
        best = int(top[0])
        self._counts[best] += 1
        result_top = tuple((self.labels[int(i)], float(scores[i])) for i in top)
        t3 = time.perf_counter_ns()
        return Result(
            class_index=best,
            label=self.labels[best],
            score=float(scores[best]),
            top_k=result_top,
            pre_ns=t1 - t0,
            invoke_ns=t2 - t1,
            post_ns=t3 - t2,
        )


def _top_k(scores: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    """Indices of the k highest scores, highest first; ties go to the lower index.

    A stable full sort rather than argpartition: INT8 outputs tie often, and
    argpartition would pick among tied classes arbitrarily at the cut.
    """
    return np.argsort(-scores, kind="stable")[:k]

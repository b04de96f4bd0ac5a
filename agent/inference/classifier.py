"""One camera frame in, one classification out, with each stage timed separately.

Frames are uint8 RGB arrays of any size (camera space); the release's input
contract turns them into the input tensor (``agent.inference.preprocess``).
Latency statistics live elsewhere (a fixed-memory histogram); the engine only
reports per-frame timings in each Result and keeps per-class counts.

The per-frame path after the invoke is kept to a handful of numpy calls: right
after an invoke each one costs ~10 us of cold caches, which is several percent
of a 2 ms model. The class is one ``argmax``; the top-k ranking, which telemetry
needs once per window, is computed only when a Result's ``top_k`` is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ConfigError, ModelError
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import Model
from agent.protocol.input_contract import InputContract

log = logging.getLogger(__name__)

TopK = tuple[tuple[str, float], ...]
_NO_FRAME: npt.NDArray[np.uint8] = np.empty((0, 0, 3), np.uint8)

CONFIDENCE_BINS = 10  # top-1 score histogram bins per telemetry window


@dataclass(frozen=True)
class Ranking:
    """How one model's raw outputs become labelled scores, shared by its Results."""

    labels: tuple[str, ...]
    k: int
    zero_point: int
    scale: float  # 0.0 for float outputs, which pass through

    def score(self, raw: float) -> float:
        return float(raw) if self.scale == 0.0 else (raw - self.zero_point) * self.scale

    def top_k(self, raw: npt.NDArray[Any]) -> TopK:
        """The k best classes, best first; ties go to the lower index (a stable sort).

        INT8 outputs tie often, so argpartition, which picks among tied classes
        arbitrarily at the cut, would not do. Integer outputs rank by ``~q``: q
        descending without overflow at the type's minimum.
        """
        flat = raw.reshape(-1)
        rank = np.invert(flat) if flat.dtype.kind in "iu" else np.negative(flat)
        top = np.argsort(rank, kind="stable")[: self.k]
        return tuple(
            (self.labels[i], self.score(v))
            for i, v in zip(top.tolist(), flat[top].tolist(), strict=True)
        )


@dataclass(frozen=True)
class Result:
    """The outcome of one frame; scores are the model's dequantized outputs."""

    class_index: int
    label: str
    score: float
    pre_ns: int
    invoke_ns: int
    post_ns: int
    raw: npt.NDArray[Any] = field(repr=False, compare=False)  # output 0, a private copy
    ranking: Ranking = field(repr=False, compare=False)

    @property
    def total_ns(self) -> int:
        return self.pre_ns + self.invoke_ns + self.post_ns

    @cached_property
    def top_k(self) -> TopK:
        """The k best (label, score) pairs, best first; computed on first read."""
        return self.ranking.top_k(self.raw)


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
    """Runs a classifier Model on uint8 camera frames and counts the classes it sees.

    ``preprocess`` is the release's input contract, or a Preprocessor already
    built for this model's input tensor.
    """

    def __init__(
        self,
        model: Model,
        preprocess: InputContract | Preprocessor,
        labels: Sequence[str] = (),
        top_k: int = 3,
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
        if isinstance(preprocess, InputContract):
            preprocess = Preprocessor(preprocess, model.input)
        elif preprocess.tensor != model.input:
            raise ModelError(f"preprocessor was built for another input than {model.path}'s")
        self.model = model
        self.preprocess = preprocess
        self.labels = tuple(labels) if labels else tuple(str(i) for i in range(classes))
        self.top_k = min(top_k, classes)
        self._counts = [0] * classes
        self._confidence = [0] * CONFIDENCE_BINS
        out = model.output
        scale = out.scale if out.is_quantized else 0.0
        self._ranking = Ranking(self.labels, self.top_k, out.zero_point, scale)
        self._frame = _NO_FRAME  # the frame being run, for _fill
        self._filled_ns = 0

    @property
    def inference_count(self) -> int:
        return sum(self._counts)

    def class_counts(self) -> dict[str, int]:
        """Counts per label since the last reset; labels never seen are left out."""
        return {self.labels[i]: n for i, n in enumerate(self._counts) if n}

    def confidence_histogram(self) -> list[int]:
        """Top-1 scores since the last reset in bins of 0.1 (the last one holds 1.0).

        With the class counts, the label-free view of accuracy in the field: a
        fogged lens or a wrong delegate shifts these before anyone has labels.
        """
        return list(self._confidence)

    def reset_counts(self) -> None:
        self._counts = [0] * len(self._counts)
        self._confidence = [0] * CONFIDENCE_BINS

    def _fill(self, buffer: npt.NDArray[Any]) -> None:
        # Straight into the interpreter's input buffer: no set_tensor copy.
        self.preprocess(self._frame, buffer)
        self._filled_ns = time.perf_counter_ns()

    def run(self, frame: npt.NDArray[np.uint8]) -> Result:
        """Classify one uint8 (H, W, 3) RGB frame; ``pre_ns`` covers all preprocessing."""
        self._frame = frame
        t0 = time.perf_counter_ns()
        try:
            raw = self.model.fill_and_invoke(self._fill)
        finally:
            self._frame = _NO_FRAME
        t2 = time.perf_counter_ns()
        t1 = self._filled_ns
        best = int(raw.argmax())  # the first maximum: ties go to the lower index
        self._counts[best] += 1
        ranking = self._ranking
        score = ranking.score(raw.item(best))
        self._confidence[min(max(int(score * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)] += 1
        t3 = time.perf_counter_ns()
        return Result(best, ranking.labels[best], score, t1 - t0, t2 - t1, t3 - t2, raw, ranking)

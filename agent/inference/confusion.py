"""Confusion matrices and what changed between two of them: pure numpy, no IO.

Rows are the true class (or, for shadow evaluation, the serving model's
prediction), columns the predicted class. The same functions serve the
publish-time accuracy gate (reference FP32 against INT8 candidate, each against
the labels) and shadow evaluation on a device (serving model against
candidate, with no labels at all), so they live in the agent's public
inference package and know nothing of the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def confusion_matrix(truth: npt.ArrayLike, predicted: npt.ArrayLike, classes: int) -> IntArray:
    """``classes`` x ``classes`` counts: ``m[t, p]`` samples of class ``t`` predicted ``p``."""
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes must be a positive integer, got {classes!r}")
    t = np.asarray(truth)
    p = np.asarray(predicted)
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(
            f"truth and predictions must be 1-D and of one length, got {t.shape} and {p.shape}"
        )
    for name, values in (("truth", t), ("predictions", p)):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must be integer class ids, got {values.dtype}")
        if values.size and (int(values.min()) < 0 or int(values.max()) >= classes):
            raise ValueError(f"{name} must be class ids in 0..{classes - 1}")
    flat = t.astype(np.int64) * classes + p.astype(np.int64)
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def class_totals(matrix: IntArray) -> tuple[IntArray, IntArray]:
    """(samples per class, correctly predicted per class): row sums and the diagonal."""
    m = _square(matrix)
    return m.sum(axis=1), np.diagonal(m).copy()


def per_class_accuracy(matrix: IntArray) -> FloatArray:
    """Recall of each class (agreement, in shadow mode); NaN for a class with no samples."""
    n, correct = class_totals(matrix)
    out = np.full(n.shape, np.nan, dtype=np.float64)
    seen = n > 0
    out[seen] = correct[seen] / n[seen]
    return out


def overall_accuracy(matrix: IntArray) -> float:
    """Fraction on the diagonal; NaN for an empty matrix."""
    m = _square(matrix)
    total = int(m.sum())
    return float(np.trace(m)) / total if total else float("nan")


@dataclass(frozen=True)
class CellChange:
    """One cell of the confusion matrix whose count differs between two matrices."""

    true_index: int
    predicted_index: int
    before: int
    after: int

    @property
    def delta(self) -> int:
        return self.after - self.before

    def to_json(self, labels: tuple[str, ...] | None = None) -> dict[str, Any]:
        def name(i: int) -> str | int:
            return labels[i] if labels is not None else i

        return {
            "true": name(self.true_index),
            "predicted": name(self.predicted_index),
            "before": self.before,
            "after": self.after,
            "delta": self.delta,
        }


def confusion_changes(
    before: IntArray, after: IntArray, limit: int | None = None
) -> list[CellChange]:
    """Cells whose counts differ: new confusions first, the largest first.

    New confusions (an ``after`` count above ``before`` off the diagonal) say
    where a candidate goes wrong, so they lead; then cells that improved, then
    diagonal cells. Ties keep row-major order, so the list is deterministic.
    """
    a, b = _square(before), _square(after)
    if a.shape != b.shape:
        raise ValueError(f"confusion matrices differ in shape: {a.shape} and {b.shape}")
    changes = [
        CellChange(int(t), int(p), int(a[t, p]), int(b[t, p]))
        for t, p in zip(*np.nonzero(a != b), strict=True)
    ]
    changes.sort(key=lambda c: (c.true_index == c.predicted_index, -c.delta, c.true_index,
                                c.predicted_index))  # fmt: skip
    return changes if limit is None else changes[:limit]


def _square(matrix: npt.ArrayLike) -> IntArray:
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {m.shape}")
    return m.astype(np.int64, copy=False)

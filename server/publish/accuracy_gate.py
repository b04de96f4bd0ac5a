"""The accuracy gate: may a quantized candidate replace its FP32 reference? Pure, no IO.

The rule our users work by, overall and per class:

- overall drop (reference minus candidate top-1, in points) up to ``max_drop``
  (1 point): ship; up to ``keep_float_drop`` (3 points): mixed precision or
  quantization-aware training; beyond: keep the float model;
- every class is judged on its own, so a rare class that collapses cannot hide
  in the average. A drop in points is meaningless for a small class (one sample
  of three is 33 points), so a class is judged in samples: it may lose
  ``max_class_drop`` percent of its samples, rounded down, but never fewer than
  ``class_tolerance`` (one flip is noise at any size); and a class that loses
  every sample the reference got right has collapsed, whatever its size.

A failed class makes the decision at least ``mixed-precision-or-qat``.
``validate`` and ``quantize`` use this module, and publish will.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.inference.confusion import class_totals

SHIP = "ship"
MIXED_OR_QAT = "mixed-precision-or-qat"
KEEP_FLOAT = "keep-float"
WRONG_VARIANT = "wrong-variant"  # validate: the file is not what its variant promises
DECISIONS = (SHIP, MIXED_OR_QAT, KEEP_FLOAT, WRONG_VARIANT)
_EPS = 1e-9  # drops come from integer counts; keep 1.0000000001 from failing a 1.0 limit


@dataclass(frozen=True)
class GateConfig:
    """The limits, in accuracy points (0-100) and samples."""

    max_drop: float = 1.0
    max_class_drop: float = 3.0
    keep_float_drop: float = 3.0
    class_tolerance: int = 1

    def __post_init__(self) -> None:
        for name in ("max_drop", "max_class_drop", "keep_float_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number of points, got {value!r}")
            if not math.isfinite(value) or not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must be 0..100 points, got {value}")
        if self.keep_float_drop < self.max_drop:
            raise ValueError(
                f"keep_float_drop ({self.keep_float_drop}) is below max_drop ({self.max_drop})"
            )
        tolerance = self.class_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
            raise ValueError(f"class_tolerance must be whole samples, got {tolerance!r}")

    def allowed_loss(self, n: int) -> int:
        """Samples a class of ``n`` may lose: its ``max_class_drop`` share, at least tolerance."""
        return max(math.floor(n * self.max_class_drop / 100.0 + _EPS), self.class_tolerance)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_drop": self.max_drop,
            "max_class_drop": self.max_class_drop,
            "keep_float_drop": self.keep_float_drop,
            "class_tolerance": self.class_tolerance,
        }


def _pct(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else float("nan")


class _Scores:
    """Accuracy in percent of the reference and the candidate, from their correct counts."""

    n: int
    reference_correct: int
    candidate_correct: int

    @property
    def reference(self) -> float:
        return _pct(self.reference_correct, self.n)

    @property
    def candidate(self) -> float:
        return _pct(self.candidate_correct, self.n)

    @property
    def drop(self) -> float:
        return self.reference - self.candidate


@dataclass(frozen=True)
class ClassResult(_Scores):
    index: int
    label: str
    n: int
    reference_correct: int
    candidate_correct: int
    allowed_loss: int
    failure: str | None = None  # why it failed, None when it passed

    @property
    def lost(self) -> int:
        return self.reference_correct - self.candidate_correct

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n": self.n,
            "reference": round(self.reference, 3),
            "candidate": round(self.candidate, 3),
            "drop": round(self.drop, 3),
            "lost": self.lost,
            "allowed_loss": self.allowed_loss,
            "failed": self.failure is not None,
            "reason": self.failure,
        }


@dataclass(frozen=True)
class GateVerdict(_Scores):
    config: GateConfig
    n: int
    reference_correct: int
    candidate_correct: int
    per_class: tuple[ClassResult, ...]  # every class with samples in the set
    untested: tuple[str, ...]  # labels with no sample in the set: the gate cannot vouch for them
    decision: str
    reasons: tuple[str, ...]

    @property
    def failed_classes(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.per_class if c.failure is not None)

    @property
    def passed(self) -> bool:
        return self.decision == SHIP

    @property
    def worst_class(self) -> ClassResult | None:
        """The class that dropped the most points; of equals, the least accurate candidate."""
        return max(self.per_class, key=lambda c: (c.drop, -c.candidate), default=None)

    def rank_key(self) -> tuple[int, int, float, float]:
        """Sort key among candidates, best first: passing, fewest failed classes, least drop."""
        worst = self.worst_class
        return (
            DECISIONS.index(self.decision), len(self.failed_classes), round(self.drop, 9),
            round(worst.drop, 9) if worst is not None else 0.0,
        )  # fmt: skip

    def summary(self) -> str:
        head = (
            f"{self.decision}: {self.candidate:.2f}% vs {self.reference:.2f}% FP32 "
            f"(drop {self.drop:.2f} points on {self.n} samples)"
        )
        return "; ".join((head, *self.reasons))

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": {
                "n": self.n,
                "reference": round(self.reference, 3),
                "candidate": round(self.candidate, 3),
                "drop": round(self.drop, 3),
            },
            "per_class": [c.to_json() for c in self.per_class],
            "failed_classes": list(self.failed_classes),
            "untested_classes": list(self.untested),
            "decision": self.decision,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "limits": self.config.to_json(),
        }


def _judge_class(cfg: GateConfig, index: int, label: str, *, n: int, ref: int, cand: int) -> (
    ClassResult
):  # fmt: skip
    allowed = cfg.allowed_loss(n)
    lost = ref - cand
    failure = None
    if cand == 0 and ref > 0:
        failure = f"class {label!r} collapsed: 0 of {n} right, FP32 had {ref}"
    elif lost > allowed:
        failure = (
            f"class {label!r} lost {lost} of {n} samples ({_pct(ref, n):.1f}% -> "
            f"{_pct(cand, n):.1f}%); at most {allowed} may be lost"
        )
    return ClassResult(index, label, n, ref, cand, allowed, failure)


def judge_counts(
    labels: Sequence[str],
    n: Sequence[int] | npt.NDArray[np.int64],
    reference_correct: Sequence[int] | npt.NDArray[np.int64],
    candidate_correct: Sequence[int] | npt.NDArray[np.int64],
    config: GateConfig | None = None,
) -> GateVerdict:
    """The verdict from per-class sample counts and correct predictions of both models."""
    cfg = config or GateConfig()
    counts = [np.asarray(a, dtype=np.int64).reshape(-1) for a in (n, reference_correct,
                                                                 candidate_correct)]  # fmt: skip
    if any(len(a) != len(labels) for a in counts):
        raise ValueError(f"need one count per label ({len(labels)})")
    sizes, ref, cand = counts
    if (
        np.any(sizes < 0)
        or np.any(ref < 0)
        or np.any(cand < 0)
        or np.any(ref > sizes)
        or np.any(cand > sizes)
    ):
        raise ValueError("correct counts must be within 0..n for every class")
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("the validation set holds no samples")
    per_class = tuple(
        _judge_class(cfg, i, str(labels[i]), n=int(sizes[i]), ref=int(ref[i]), cand=int(cand[i]))
        for i in range(len(labels))
        if sizes[i] > 0
    )
    untested = tuple(str(labels[i]) for i in range(len(labels)) if sizes[i] == 0)
    drop = _pct(int(ref.sum()), total) - _pct(int(cand.sum()), total)
    reasons: list[str] = []
    decision = SHIP
    if drop > cfg.keep_float_drop + _EPS:
        decision = KEEP_FLOAT
        reasons.append(f"overall drop {drop:.2f} points is over {cfg.keep_float_drop:g}")
    elif drop > cfg.max_drop + _EPS:
        decision = MIXED_OR_QAT
        reasons.append(f"overall drop {drop:.2f} points is over {cfg.max_drop:g}")
    failures = [c.failure for c in per_class if c.failure is not None]
    if failures and decision == SHIP:
        decision = MIXED_OR_QAT
    reasons.extend(failures)
    return GateVerdict(cfg, total, int(ref.sum()), int(cand.sum()), per_class, untested, decision,
                       tuple(reasons))  # fmt: skip


def judge_matrices(
    labels: Sequence[str],
    reference: npt.NDArray[np.int64],
    candidate: npt.NDArray[np.int64],
    config: GateConfig | None = None,
) -> GateVerdict:
    """The verdict from the two models' confusion matrices on the same labelled set."""
    ref_n, ref_correct = class_totals(reference)
    cand_n, cand_correct = class_totals(candidate)
    if not np.array_equal(ref_n, cand_n):
        raise ValueError("the two confusion matrices count different samples per class")
    return judge_counts(labels, ref_n, ref_correct, cand_correct, config)

"""Field accuracy without labels: parse ``results`` windows and measure drift (pure, no IO).

Each device sends, per telemetry window, how often it predicted each class and
a histogram of its top-1 confidence (10 bins of 0.1, the last holding 1.0).
The release's report from publish holds the same two distributions measured on
its validation set (``reference``). Drift is the population stability index
(PSI) of the field distribution against that reference:

    PSI = sum_i (o_i - r_i) * ln(o_i / r_i)

over the union of the classes in both, where ``o_i`` and ``r_i`` are the field
and reference fractions. Every term is >= 0, so each class's term is its
contribution and the largest names the class that drifts. Empty bins are
smoothed: the field fractions get a pseudo-count of ``SMOOTHING_COUNT`` per bin,
and a reference fraction below ``REFERENCE_FLOOR`` is raised to it, so a class
the reference never predicted still counts, finitely. Thresholds are the usual
ones: under 0.1 stable, 0.1 to 0.25 watch, 0.25 and over drift. Below
``MIN_INFERENCES`` inferences nothing is judged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONFIDENCE_BINS = 10
MAX_LABELS = 4096  # above ImageNet-style 1001-class heads
MAX_LABEL_CHARS = 64
MAX_COUNT = 10**9  # per window: far above any camera's frames in a window
PSI_WATCH = 0.1
PSI_DRIFT = 0.25
MIN_INFERENCES = 200
SMOOTHING_COUNT = 0.5
REFERENCE_FLOOR = 1e-4
TOP_CONTRIBUTIONS = 5


class ResultsError(ValueError):
    """A ``results`` payload that is not a well-formed window."""


@dataclass(frozen=True)
class ResultsWindow:
    """One device window of predictions: what the ingest stores."""

    model: str
    release: int
    class_counts: dict[str, int]
    confidence_hist: list[int]

    @property
    def inferences(self) -> int:
        return sum(self.class_counts.values())


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        raise ResultsError(f"{what} must be an integer from 0 to {MAX_COUNT}")
    return value


def parse_results(payload: Any) -> ResultsWindow:
    """The window in a ``results`` payload; ResultsError for anything else."""
    if not isinstance(payload, dict):
        raise ResultsError("results payload is not an object")
    model, release = payload.get("model"), payload.get("release")
    if not isinstance(model, str) or not 0 < len(model) <= 64:
        raise ResultsError("results field 'model' must be a name of 1 to 64 characters")
    if not isinstance(release, int) or isinstance(release, bool) or release <= 0:
        raise ResultsError("results field 'release' must be a positive integer")
    counts = payload.get("class_counts")
    if not isinstance(counts, dict) or len(counts) > MAX_LABELS:
        raise ResultsError(f"results field 'class_counts' must be an object of <= {MAX_LABELS}")
    for label in counts:
        if not 0 < len(label) <= MAX_LABEL_CHARS or not label.isprintable():
            raise ResultsError(f"class label of {len(label)} characters or unprintable")
    class_counts = {str(k): _count(v, "a class count") for k, v in counts.items()}
    hist = payload.get("confidence_hist")
    if not isinstance(hist, list) or len(hist) != CONFIDENCE_BINS:
        raise ResultsError(f"results field 'confidence_hist' must be {CONFIDENCE_BINS} integers")
    bins = [_count(v, "a confidence bin") for v in hist]
    if sum(bins) > sum(class_counts.values()):
        raise ResultsError("confidence histogram holds more inferences than the class counts")
    return ResultsWindow(model, release, {k: v for k, v in class_counts.items() if v}, bins)


def merge_counts(total: Mapping[str, int], add: Mapping[str, int]) -> dict[str, int]:
    """Summed counts; new labels beyond ``MAX_LABELS`` are left out, so a row stays bounded."""
    out = dict(total)
    for label, n in add.items():
        if label in out:
            out[label] += n
        elif len(out) < MAX_LABELS:
            out[label] = n
    return out


def merge_hist(total: Sequence[int], add: Sequence[int]) -> list[int]:
    return [a + b for a, b in zip(total, add, strict=True)]


def mean_confidence(hist: Sequence[int]) -> float | None:
    """Mean top-1 confidence from bin midpoints (0.05 ... 0.95); None without inferences."""
    n = sum(hist)
    if not n:
        return None
    width = 1.0 / CONFIDENCE_BINS
    return round(sum(c * (i + 0.5) * width for i, c in enumerate(hist)) / n, 4)


@dataclass(frozen=True)
class Psi:
    """A PSI and each bin's share of it (largest first)."""

    value: float
    contributions: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> str | None:
        return next(iter(self.contributions), None)


def psi(observed: Mapping[str, int], reference: Mapping[str, float]) -> Psi:
    """PSI of observed counts against reference fractions (see the module docstring)."""
    bins = sorted(set(reference) | set(observed))
    n = sum(observed.values())
    ref_total = sum(max(float(v), 0.0) for v in reference.values())
    if not bins or n <= 0 or ref_total <= 0:
        return Psi(0.0)
    denominator = n + SMOOTHING_COUNT * len(bins)
    floored = {b: max(max(float(reference.get(b, 0.0)), 0.0) / ref_total, REFERENCE_FLOOR)
               for b in bins}  # fmt: skip
    ref_sum = sum(floored.values())
    terms: dict[str, float] = {}
    for b in bins:
        o = (observed.get(b, 0) + SMOOTHING_COUNT) / denominator
        r = floored[b] / ref_sum
        terms[b] = (o - r) * math.log(o / r)
    ordered = sorted(terms.items(), key=lambda kv: (-kv[1], kv[0]))
    return Psi(round(sum(terms.values()), 6), {k: round(v, 6) for k, v in ordered})


def hist_psi(observed: Sequence[int], reference: Sequence[float]) -> Psi:
    """PSI of a confidence histogram; bins are named by their lower edge ("0.9")."""
    names = [f"{i / CONFIDENCE_BINS:.1f}" for i in range(CONFIDENCE_BINS)]
    return psi(dict(zip(names, observed, strict=True)), dict(zip(names, reference, strict=True)))


def status(value: float | None, inferences: int, min_inferences: int = MIN_INFERENCES) -> str:
    """The verdict: insufficient (too few inferences), stable, watch or drift."""
    if value is None or inferences < min_inferences:
        return "insufficient"
    if value >= PSI_DRIFT:
        return "drift"
    return "watch" if value >= PSI_WATCH else "stable"


def _reference_parts(reference: Any) -> tuple[dict[str, float], list[float]] | None:
    if not isinstance(reference, dict):
        return None
    freq, hist = reference.get("class_freq"), reference.get("confidence_hist")
    if not isinstance(freq, dict) or not isinstance(hist, list) or len(hist) != CONFIDENCE_BINS:
        return None
    if not all(isinstance(v, int | float) for v in (*freq.values(), *hist)):
        return None
    return {str(k): float(v) for k, v in freq.items()}, [float(v) for v in hist]


def drift(
    class_counts: Mapping[str, int], confidence_hist: Sequence[int], reference: Any,
    min_inferences: int = MIN_INFERENCES,
) -> tuple[dict[str, Any] | None, str | None]:  # fmt: skip
    """(drift report, None), or (None, why there is none) for a release without a reference."""
    parts = _reference_parts(reference)
    if parts is None:
        return None, "the release has no reference distributions (publish it with --validation)"
    freq, ref_hist = parts
    n = sum(class_counts.values())
    classes = psi(class_counts, freq)
    confidence = hist_psi(confidence_hist, ref_hist)
    judged = n >= min_inferences
    return {
        "inferences": n,
        "psi": classes.value,
        "status": status(classes.value, n, min_inferences),
        "worst_class": classes.worst if judged else None,
        "contributions": dict(list(classes.contributions.items())[:TOP_CONTRIBUTIONS]),
        "confidence_psi": confidence.value,
        "confidence_status": status(confidence.value, n, min_inferences),
    }, None


def thresholds() -> dict[str, Any]:
    return {"watch": PSI_WATCH, "drift": PSI_DRIFT, "min_inferences": MIN_INFERENCES}

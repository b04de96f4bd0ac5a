"""Shadow evaluation: a candidate judged on live frames before any device installs it.

Pure: no IO. While a stage is in its shadow phase its devices keep serving the
current model and also run the candidate on 1 frame in ``every_n`` (inside a
CPU budget). Each device reports, per telemetry window, a sparse confusion
matrix of the two models' top-1 classes (rows: serving, columns: candidate).

``ShadowLimits`` is what the operator set, ``parse_window`` checks one reported
block, and ``ShadowReport`` is a device's sum over the rollout;
``shadow_judge`` turns reports into gate results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from typing import Any

from server.errors import InvalidInputError
from server.rollout.core.units import (
    HUNDRED,
    format_duration,
    format_number,
    parse_duration,
    parse_fraction,
    parse_whole,
)

SHADOW_AGREEMENT = "shadow_agreement"
SHADOW_CLASS_AGREEMENT = "shadow_class_agreement"
SHADOW_ERROR = "shadow_error"
SHADOW_GATES = frozenset({SHADOW_AGREEMENT, SHADOW_CLASS_AGREEMENT, SHADOW_ERROR})

MAX_EVERY_N = 10_000
MAX_LABELS = 10_000
MAX_COUNT = 10**12


@dataclass(frozen=True)
class ShadowLimits:
    """How a rollout shadows each stage's devices before installing on them."""

    every_n: int = 10  # the candidate runs on 1 frame in every_n
    min_agreement: Fraction = Fraction(95, 100)  # overall and per class, 0..1
    min_class_frames: int = 30  # frames before a class (or the whole profile) is judged
    cpu_budget: Fraction = Fraction(1, 4)  # share of one core the candidate may use
    # The phase lasts at least this long, so rarer classes gather frames; a trip ends it sooner.
    duration: timedelta = timedelta(minutes=30)

    def to_json(self) -> dict[str, Any]:
        return {
            "duration": format_duration(self.duration),
            "every_n": self.every_n,
            "min_agreement": f"{format_number(self.min_agreement * HUNDRED)}%",
            "min_class_frames": self.min_class_frames,
            "cpu_budget": f"{format_number(self.cpu_budget * HUNDRED)}%",
        }

    @classmethod
    def from_json(cls, data: object) -> ShadowLimits:
        if not isinstance(data, Mapping):
            raise InvalidInputError("shadow must be an object")
        every_n = parse_whole(data.get("every_n", cls.every_n), "shadow-every", minimum=1)
        if every_n > MAX_EVERY_N:
            raise InvalidInputError(f"shadow-every {every_n} is above {MAX_EVERY_N}")
        budget = parse_fraction(data.get("cpu_budget", "25%"), "shadow-cpu-budget")
        if budget <= 0:
            raise InvalidInputError("shadow-cpu-budget must be more than 0%")
        return cls(
            every_n=every_n,
            min_agreement=parse_fraction(data.get("min_agreement", "95%"), "min-shadow-agreement"),
            min_class_frames=parse_whole(
                data.get("min_class_frames", cls.min_class_frames), "shadow-min-frames", minimum=1
            ),
            cpu_budget=budget,
            duration=parse_duration(
                data.get("duration", "30m"), "shadow-duration", allow_zero=True
            ),
        )


Pairs = Mapping[tuple[int, int], int]


@dataclass(frozen=True)
class ShadowWindow:
    """One window's shadow block, as a device sent it, checked."""

    rollout_id: str
    shadowed: int
    skipped: int
    agreed: int
    pairs: Pairs
    labels: tuple[str, ...]
    candidate_p95_ms: float | None
    serving_p95_ms: float | None
    candidate_mj: float | None
    error: str | None


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        raise InvalidInputError(f"shadow {key} must be a whole number >= 0")
    return value


def _ms(data: Mapping[str, Any], key: str, field_name: str) -> float | None:
    block = data.get(key)
    if not isinstance(block, Mapping):
        return None
    value = block.get(field_name)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e7:
        return None
    return float(value)


def parse_window(data: object) -> ShadowWindow:
    """A ``results`` message's ``shadow`` block; InvalidInputError when it is not one."""
    if not isinstance(data, Mapping):
        raise InvalidInputError("shadow must be an object")
    rollout_id = data.get("rollout_id")
    if not isinstance(rollout_id, str) or not 0 < len(rollout_id) <= 32:
        raise InvalidInputError("shadow rollout_id must be a rollout id")
    labels = data.get("labels", [])
    if (
        not isinstance(labels, list)
        or len(labels) > MAX_LABELS
        or not all(isinstance(x, str) for x in labels)
    ):
        raise InvalidInputError(f"shadow labels must be a list of at most {MAX_LABELS} strings")
    raw = data.get("pairs", [])
    if not isinstance(raw, list) or len(raw) > MAX_LABELS * 4:
        raise InvalidInputError("shadow pairs must be a list of [serving, candidate, count]")
    pairs: dict[tuple[int, int], int] = {}
    bound = max(len(labels), 1)
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            or not (0 <= item[0] < bound and 0 <= item[1] < bound and 0 < item[2] <= MAX_COUNT)
        ):
            raise InvalidInputError(
                "each shadow pair must be [serving index, candidate index, count] within labels"
            )
        key = (item[0], item[1])
        pairs[key] = pairs.get(key, 0) + item[2]
    shadowed, agreed = _count(data, "shadowed"), _count(data, "agreed")
    if sum(pairs.values()) != shadowed or sum(n for (i, j), n in pairs.items() if i == j) != agreed:
        raise InvalidInputError("shadow pairs do not add up to shadowed and agreed")
    error = data.get("error")
    mj = data.get("candidate_mj")
    return ShadowWindow(
        rollout_id=rollout_id,
        shadowed=shadowed,
        skipped=_count(data, "skipped"),
        agreed=agreed,
        pairs=pairs,
        labels=tuple(labels),
        candidate_p95_ms=_ms(data, "candidate_latency_ms", "p95"),
        serving_p95_ms=_ms(data, "serving_latency_ms", "p95"),
        candidate_mj=float(mj) if isinstance(mj, int | float) and 0 <= mj < 1e6 else None,
        error=str(error)[:200] if error else None,
    )


@dataclass(frozen=True)
class ShadowReport:
    """One device's shadow results for one rollout, summed over its windows."""

    shadowed: int = 0
    skipped: int = 0
    agreed: int = 0
    pairs: Pairs = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    candidate_p95_ms: float | None = None  # the latest window's
    serving_p95_ms: float | None = None
    candidate_mj: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, w: ShadowWindow) -> ShadowReport:
        return cls(
            w.shadowed, w.skipped, w.agreed, dict(w.pairs), w.labels,
            w.candidate_p95_ms, w.serving_p95_ms, w.candidate_mj, w.error,
        )  # fmt: skip

    def merge(self, later: ShadowReport) -> ShadowReport:
        """Counts add up; latency, energy and labels are the later report's when it has them."""
        pairs = dict(self.pairs)
        for key, n in later.pairs.items():
            pairs[key] = pairs.get(key, 0) + n
        return ShadowReport(
            shadowed=self.shadowed + later.shadowed,
            skipped=self.skipped + later.skipped,
            agreed=self.agreed + later.agreed,
            pairs=pairs,
            labels=later.labels or self.labels,
            candidate_p95_ms=later.candidate_p95_ms or self.candidate_p95_ms,
            serving_p95_ms=later.serving_p95_ms or self.serving_p95_ms,
            candidate_mj=later.candidate_mj
            if later.candidate_mj is not None
            else self.candidate_mj,
            error=later.error or self.error,
        )

    def add(self, w: ShadowWindow) -> ShadowReport:
        return self.merge(ShadowReport.of(w))

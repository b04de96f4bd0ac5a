"""Shadow evaluation: a candidate judged on live frames before any device installs it.

Pure: no IO. While a stage is in its shadow phase its devices keep serving the
current model and also run the candidate on 1 frame in ``every_n`` (inside a
CPU budget). Each device reports, per telemetry window, a sparse confusion
matrix of the two models' top-1 classes (rows: serving, columns: candidate).

``parse_window`` checks one reported block; ``ShadowReport`` is a device's sum
over the rollout; ``judge_shadow`` turns one profile's reports into gate
results: overall agreement, and agreement per class, where a class's
agreement is the share of the frames the serving model called that class on
which the candidate agreed. A class is judged only once it has
``min_class_frames`` frames, so a handful of frames cannot trip or pass it;
the classes still under that floor are named in the detail. A device whose
candidate could not run (load or invoke error, class count mismatch) trips
its own gate: a candidate that cannot run on a board must not install there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from typing import Any

from server.errors import InvalidInputError
from server.rollout.core.gates import GateResult
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


@dataclass(frozen=True)
class ClassAgreement:
    index: int
    label: str
    frames: int  # frames the serving model called this class
    agreed: int
    confused_with: str | None  # the candidate's most frequent other answer
    confused_count: int

    @property
    def agreement(self) -> float:
        return self.agreed / self.frames if self.frames else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "class": self.label,
            "frames": self.frames,
            "agreed": self.agreed,
            "agreement": round(self.agreement, 6),
            "confused_with": self.confused_with,
            "confused_count": self.confused_count,
        }


@dataclass(frozen=True)
class ProfileShadow:
    """A profile's reports, folded: the overall figure, one row per class, the costs."""

    devices: int
    shadowed: int
    skipped: int
    agreed: int
    classes: tuple[ClassAgreement, ...]  # by class index
    candidate_p95_ms: float | None  # mean over devices
    serving_p95_ms: float | None
    candidate_mj: float | None
    errors: tuple[tuple[str, str], ...]  # (device, error)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.shadowed if self.shadowed else None

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "shadowed": self.shadowed,
            "skipped": self.skipped,
            "agreed": self.agreed,
            "agreement": None if self.agreement is None else round(self.agreement, 6),
            "candidate_p95_ms": self.candidate_p95_ms,
            "serving_p95_ms": self.serving_p95_ms,
            "candidate_mj": self.candidate_mj,
            "classes": [c.to_json() for c in self.classes],
            "errors": [{"device": d, "error": e} for d, e in self.errors],
        }


def _mean(values: Iterable[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(sum(got) / len(got), 3) if got else None


def fold(reports: Mapping[str, ShadowReport]) -> ProfileShadow:
    """Sum one profile's device reports (device id -> report) into per-class rows."""
    matrix: dict[tuple[int, int], int] = {}
    labels: tuple[str, ...] = ()
    for report in reports.values():
        labels = labels or report.labels
        for key, n in report.pairs.items():
            matrix[key] = matrix.get(key, 0) + n
    rows: dict[int, dict[int, int]] = {}
    for (i, j), n in matrix.items():
        rows.setdefault(i, {})[j] = n
    classes = []
    for i in sorted(rows):
        row = rows[i]
        others = sorted(((n, j) for j, n in row.items() if j != i), reverse=True)
        top = others[0] if others else None
        classes.append(
            ClassAgreement(
                index=i,
                label=labels[i] if i < len(labels) else str(i),
                frames=sum(row.values()),
                agreed=row.get(i, 0),
                confused_with=None
                if top is None
                else (labels[top[1]] if top[1] < len(labels) else str(top[1])),
                confused_count=0 if top is None else top[0],
            )
        )
    active = [r for r in reports.values() if r.shadowed]
    return ProfileShadow(
        devices=len(active),
        shadowed=sum(r.shadowed for r in reports.values()),
        skipped=sum(r.skipped for r in reports.values()),
        agreed=sum(r.agreed for r in reports.values()),
        classes=tuple(classes),
        candidate_p95_ms=_mean(r.candidate_p95_ms for r in active),
        serving_p95_ms=_mean(r.serving_p95_ms for r in active),
        candidate_mj=_mean(r.candidate_mj for r in active),
        errors=tuple(sorted((d, r.error) for d, r in reports.items() if r.error)),
    )


def _gate(name: str, profile: str, value: float | None, limit: float, **kw: Any) -> GateResult:
    defaults: dict[str, Any] = {"unit": "%", "bound": "min", "tripped": False}
    return GateResult(name=name, profile=profile, value=value, limit=limit, **(defaults | kw))


def judge_shadow(
    profile: str,
    reports: Mapping[str, ShadowReport],
    expected: int,
    limits: ShadowLimits,
    min_sample: int,
) -> list[GateResult]:
    """The shadow gates of one profile: errors, overall agreement, and per class the
    tripped classes (or, when none tripped, the weakest one judged, to show the margin).

    ``expected`` is how many of the stage's devices in this profile could report
    (those heard from lately); the gates wait for ``min(min_sample, expected)``.
    """
    folded = fold(reports)
    limit = float(limits.min_agreement * HUNDRED)
    needed = max(1, min(min_sample, expected))
    results: list[GateResult] = []
    if folded.errors:
        devices = tuple(d for d, _ in folded.errors)
        first = folded.errors[0][1]
        results.append(
            _gate(SHADOW_ERROR, profile, float(len(devices)), 0.0, unit="devices", bound="max",
                  tripped=True, sample=len(reports), needed=0, devices=devices,
                  detail=f"the candidate could not run: {first}")
        )  # fmt: skip
    sample = folded.devices
    floor = limits.min_class_frames
    if sample < needed or folded.shadowed < floor:
        wait = (
            f"waiting for shadow results from {needed - sample} more devices"
            if sample < needed
            else f"waiting for {floor - folded.shadowed} more shadow frames"
        )
        # Too few frames holds the gate like a missing device: one more report needed.
        results.append(
            _gate(SHADOW_AGREEMENT, profile, None, limit, sample=sample,
                  needed=max(needed, sample + 1), detail=wait)
        )  # fmt: skip
        return results
    overall = folded.agreed / folded.shadowed
    latency = ""
    if folded.candidate_p95_ms is not None and folded.serving_p95_ms is not None:
        latency = (
            f"; candidate p95 {folded.candidate_p95_ms:.1f} ms against "
            f"{folded.serving_p95_ms:.1f} ms serving"
        )
    results.append(
        _gate(SHADOW_AGREEMENT, profile, overall * 100.0, limit,
              tripped=Fraction(folded.agreed) < limits.min_agreement * folded.shadowed,
              sample=sample, needed=needed,
              detail=f"{folded.agreed} of {folded.shadowed} frames agree on {sample} devices"
              + latency)
    )  # fmt: skip
    judged = [c for c in folded.classes if c.frames >= floor]
    rare = [c.label for c in folded.classes if c.frames < floor]
    tripped = [c for c in judged if Fraction(c.agreed) < limits.min_agreement * c.frames]
    shown = tripped or sorted(judged, key=lambda c: (c.agreement, c.index))[:1]
    for c in shown:
        detail = f"{c.agreed} of {c.frames} frames agree"
        if c.confused_with is not None and c.confused_count:
            detail += f"; the candidate said {c.confused_with!r} on {c.confused_count}"
        if rare:
            detail += f"; {len(rare)} classes under {floor} frames not judged"
        results.append(
            _gate(SHADOW_CLASS_AGREEMENT, profile, c.agreement * 100.0, limit,
                  tripped=c in tripped, sample=sample, needed=needed, detail=detail,
                  subject=f"class {c.label!r}")
        )  # fmt: skip
    return results


def devices_by_profile(
    devices: Sequence[tuple[str, str]], reports: Mapping[str, ShadowReport]
) -> dict[str, dict[str, ShadowReport]]:
    """(device, profile) pairs of a stage and the reports -> profile -> device -> report."""
    grouped: dict[str, dict[str, ShadowReport]] = {}
    for device_id, profile in devices:
        report = reports.get(device_id)
        bucket = grouped.setdefault(profile, {})
        if report is not None:
            bucket[device_id] = report
    return grouped

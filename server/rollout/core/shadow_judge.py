"""Shadow results judged: per-class agreement folded from device reports, and the gates.

Pure: no IO. A class's agreement is the share of the frames the serving model
called that class on which the candidate agreed. A class is judged on its
point estimate once it has ``min_class_frames`` frames. Under that floor a
class still trips when the evidence is overwhelming: from 5 frames on, if even
the optimistic bound of its agreement (Wilson score, 99.9% one-sided) is below
the minimum. So a rare class that the candidate collapsed cannot hide behind
the floor, while a handful of unlucky frames cannot trip a healthy one. A
device whose candidate could not run (load or invoke error, class count
mismatch) trips its own gate: a candidate that cannot run on a board must not
install there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from server.rollout.core.gates import GateResult
from server.rollout.core.shadow import (
    SHADOW_AGREEMENT,
    SHADOW_CLASS_AGREEMENT,
    SHADOW_ERROR,
    ShadowLimits,
    ShadowReport,
)
from server.rollout.core.units import HUNDRED

MIN_EVIDENCE_FRAMES = 5  # below the floor, fewer frames than this never trip a class
EVIDENCE_Z = 3.09  # one-sided 99.9%


def agreement_upper_bound(agreed: int, frames: int, z: float = EVIDENCE_Z) -> float:
    """The Wilson score upper bound of an agreement seen as ``agreed`` of ``frames``."""
    if frames <= 0:
        return 1.0
    p = agreed / frames
    z2n = z * z / frames
    centre = p + z2n / 2
    spread = z * math.sqrt(p * (1 - p) / frames + z2n / (4 * frames))
    return min(1.0, (centre + spread) / (1 + z2n))


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
    *,
    over: bool = False,
) -> list[GateResult]:
    """The shadow gates of one profile: errors, overall agreement, and per class the
    tripped classes (or, when none tripped, the weakest one judged, to show the margin).

    ``expected`` is how many of the stage's devices in this profile could report
    (those heard from lately); the gates wait for ``min(min_sample, expected)`` until
    the stage's timeout is ``over``. After that the profile is judged on the devices
    that did report, and a profile where none did (agents too old to shadow, or no
    telemetry link) is named as not judged rather than holding the stage for ever.
    """
    folded = fold(reports)
    limit = float(limits.min_agreement * HUNDRED)
    needed = max(1, min(min_sample, expected))
    if over and folded.devices:
        needed = min(needed, folded.devices)
    results: list[GateResult] = []
    if over and not folded.devices and not folded.errors:
        return [
            _gate(SHADOW_AGREEMENT, profile, None, limit, sample=0, needed=0,
                  detail=f"not judged: none of {expected} devices reported shadow results")
        ]  # fmt: skip
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
    rare = [c for c in folded.classes if c.frames < floor]
    minimum = float(limits.min_agreement)
    tripped = [c for c in judged if Fraction(c.agreed) < limits.min_agreement * c.frames]
    # Under the floor, only overwhelming evidence trips a class (see the module docstring).
    tripped += [
        c
        for c in rare
        if c.frames >= MIN_EVIDENCE_FRAMES and agreement_upper_bound(c.agreed, c.frames) < minimum
    ]
    shown = tripped or sorted(judged, key=lambda c: (c.agreement, c.index))[:1]
    for c in shown:
        detail = f"{c.agreed} of {c.frames} frames agree"
        if c.frames < floor:
            bound = 100.0 * agreement_upper_bound(c.agreed, c.frames)
            detail += f" (under {floor} frames, but at most {bound:.1f}% at 99.9% confidence)"
        if c.confused_with is not None and c.confused_count:
            detail += f"; the candidate said {c.confused_with!r} on {c.confused_count}"
        unjudged = [r for r in rare if r not in tripped]
        if unjudged:
            detail += f"; {len(unjudged)} classes under {floor} frames not judged"
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

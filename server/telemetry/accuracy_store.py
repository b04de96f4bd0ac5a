"""Field accuracy windows in the database, and the summaries the API and /metrics show.

``accuracy_windows`` holds, per device, model release and hour, the summed
class counts and top-1 confidence histogram of the device's ``results``
messages (``server.telemetry.accuracy`` parses and judges them). Summaries
merge the hours of a lookback window per device and per release x board
profile, compare them with the release's reference distributions from its
publish report (``server.publish.reports``), and add the newest golden-set
score each device reported for the release (``golden_set`` events).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db.tables import Base, Device, Event, _BigId, utcnow
from server.publish.reports import ModelReport
from server.telemetry import accuracy
from server.telemetry.accuracy import ResultsWindow

log = logging.getLogger(__name__)

BUCKET = timedelta(hours=1)
DEFAULT_LOOKBACK_HOURS = 24
RETENTION = timedelta(days=30)
MAX_GOLDEN_EVENTS = 100_000


class AccuracyWindow(Base):
    """One hour of one device's predictions with one model release."""

    __tablename__ = "accuracy_windows"
    __table_args__ = (
        UniqueConstraint("device_id", "model", "release", "bucket", name="uq_accuracy_windows"),
        Index("ix_accuracy_windows_bucket", "bucket"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    bucket: Mapped[datetime]
    windows: Mapped[int]
    inferences: Mapped[int] = mapped_column(BigInteger)
    class_counts: Mapped[dict[str, int]] = mapped_column(JSON)
    confidence_hist: Mapped[list[int]] = mapped_column(JSON)
    updated_at: Mapped[datetime]


def bucket_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def record_results(
    s: Session, device_id: str, window: ResultsWindow, at: datetime, windows: int = 1
) -> bool:
    """Add ``windows`` summed windows to their hour; False when the device is unknown."""
    if s.get(Device, device_id) is None:
        return False
    key = (
        AccuracyWindow.device_id == device_id, AccuracyWindow.model == window.model,
        AccuracyWindow.release == window.release, AccuracyWindow.bucket == bucket_of(at),
    )  # fmt: skip
    for _ in range(2):
        row = s.scalars(select(AccuracyWindow).where(*key).with_for_update()).first()
        if row is not None:
            s.execute(
                update(AccuracyWindow).where(AccuracyWindow.id == row.id).values(
                    windows=row.windows + windows,
                    inferences=row.inferences + window.inferences,
                    class_counts=accuracy.merge_counts(row.class_counts, window.class_counts),
                    confidence_hist=accuracy.merge_hist(row.confidence_hist,
                                                        window.confidence_hist),
                    updated_at=at,
                )
            )  # fmt: skip
            return True
        try:
            with s.begin_nested():
                s.add(AccuracyWindow(
                    device_id=device_id, model=window.model, release=window.release,
                    bucket=bucket_of(at), windows=windows, inferences=window.inferences,
                    class_counts=dict(window.class_counts),
                    confidence_hist=list(window.confidence_hist), updated_at=at,
                ))  # fmt: skip
            return True
        except IntegrityError:
            continue  # another writer made the hour's row first: add to it
    raise RuntimeError(f"accuracy window of {device_id} could not be stored")


def prune(s: Session, before: datetime) -> int:
    """Delete the hours that ended before ``before``; how many rows went."""
    result = s.execute(delete(AccuracyWindow).where(AccuracyWindow.bucket < bucket_of(before)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]  # a CursorResult for DELETE


def reference_of(s: Session, model: str, release: int) -> dict[str, Any] | None:
    """The reference distributions of a release's report (int8-cpu first), or None."""
    rows = s.execute(
        select(ModelReport.variant, ModelReport.report).where(
            ModelReport.name == model, ModelReport.release == release
        )
    ).all()
    for _variant, report in sorted(rows, key=lambda r: (r[0] != "int8-cpu", r[0])):
        reference = report.get("reference") if isinstance(report, dict) else None
        if isinstance(reference, dict):
            return reference
    return None


def _golden_accuracy(detail: Any) -> tuple[int, float] | None:
    if isinstance(detail, dict) and isinstance(detail.get("detail"), dict):
        detail = detail["detail"]  # MQTT events carry the report one level down
    if not isinstance(detail, dict):
        return None
    release, value = detail.get("release"), detail.get("accuracy")
    if not isinstance(release, int) or isinstance(release, bool):
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        return None
    return release, float(value)


def golden_scores(
    s: Session, since: datetime, device_id: str | None = None
) -> dict[tuple[str, int], float]:
    """(device, release) -> the newest golden-set accuracy reported since ``since``."""
    query = select(Event.device_id, Event.detail).where(
        Event.type == "golden_set", Event.time >= since
    )
    if device_id is not None:
        query = query.where(Event.device_id == device_id)
    out: dict[tuple[str, int], float] = {}
    newest = s.execute(query.order_by(Event.id.desc()).limit(MAX_GOLDEN_EVENTS)).all()
    for device, detail in reversed(newest):  # oldest first: the newest score wins
        scored = _golden_accuracy(detail)
        if scored is not None:
            out[(device, scored[0])] = scored[1]
    return out


@dataclass
class _Totals:
    counts: dict[str, int] = field(default_factory=dict)
    hist: list[int] = field(default_factory=lambda: [0] * accuracy.CONFIDENCE_BINS)

    def add(self, counts: dict[str, int], hist: list[int]) -> None:
        self.counts = accuracy.merge_counts(self.counts, counts)
        if len(hist) == accuracy.CONFIDENCE_BINS:
            self.hist = accuracy.merge_hist(self.hist, hist)

    def to_json(self, reference: Any, min_inferences: int) -> dict[str, Any]:
        report, reason = accuracy.drift(self.counts, self.hist, reference, min_inferences)
        return {
            "inferences": sum(self.counts.values()),
            "mean_confidence": accuracy.mean_confidence(self.hist),
            "drift": report,
            "drift_reason": reason,
        }


def _since(hours: float) -> datetime:
    return bucket_of(utcnow() - timedelta(hours=hours))


def _per_device(
    s: Session, since: datetime, device_id: str | None = None
) -> dict[tuple[str, str, int], tuple[str, _Totals]]:
    query = (
        select(AccuracyWindow.device_id, AccuracyWindow.model, AccuracyWindow.release,
               AccuracyWindow.class_counts, AccuracyWindow.confidence_hist, Device.profile)
        .join(Device, Device.id == AccuracyWindow.device_id)
        .where(AccuracyWindow.bucket >= since)
    )  # fmt: skip
    if device_id is not None:
        query = query.where(AccuracyWindow.device_id == device_id)
    out: dict[tuple[str, str, int], tuple[str, _Totals]] = {}
    for device, model, release, counts, hist, profile in s.execute(query):
        out.setdefault((device, model, release), (profile, _Totals()))[1].add(counts, hist)
    return out


def fleet_accuracy(
    s: Session, hours: float = DEFAULT_LOOKBACK_HOURS,
    min_inferences: int = accuracy.MIN_INFERENCES,
) -> dict[str, Any]:  # fmt: skip
    """Release x profile rows: inferences, confidence, drift, golden sets, drifting devices."""
    since = _since(hours)
    devices = _per_device(s, since)
    golden = golden_scores(s, since)
    references: dict[tuple[str, int], Any] = {}
    groups: dict[tuple[str, int, str], dict[str, Any]] = {}
    for (device, model, release), (profile, totals) in sorted(devices.items()):
        if (model, release) not in references:
            references[(model, release)] = reference_of(s, model, release)
        reference = references[(model, release)]
        group = groups.setdefault((model, release, profile), {
            "totals": _Totals(), "devices": 0, "drifting": [], "golden": [],
        })  # fmt: skip
        group["totals"].add(totals.counts, totals.hist)
        group["devices"] += 1
        own, _ = accuracy.drift(totals.counts, totals.hist, reference, min_inferences)
        if own is not None and own["status"] == "drift":
            group["drifting"].append(
                {"device_id": device, "psi": own["psi"], "worst_class": own["worst_class"]}
            )
        if (device, release) in golden:
            group["golden"].append(golden[(device, release)])
    rows = []
    for (model, release, profile), group in groups.items():
        scores: list[float] = group["golden"]
        rows.append({
            "model": model, "release": release, "profile": profile, "devices": group["devices"],
            **group["totals"].to_json(references[(model, release)], min_inferences),
            "golden_set_accuracy": round(sum(scores) / len(scores), 4) if scores else None,
            "golden_set_devices": len(scores),
            "drifting_devices": sorted(group["drifting"], key=lambda d: -d["psi"]),
        })  # fmt: skip
    return {
        "since": since.isoformat(),
        "thresholds": {**accuracy.thresholds(), "min_inferences": min_inferences},
        "releases": rows,
    }


def device_accuracy(
    s: Session, device_id: str, hours: float = DEFAULT_LOOKBACK_HOURS,
    min_inferences: int = accuracy.MIN_INFERENCES,
) -> dict[str, Any] | None:  # fmt: skip
    """One device's releases with their counts, histograms and drift; None if unknown."""
    device = s.get(Device, device_id)
    if device is None:
        return None
    since = _since(hours)
    golden = golden_scores(s, since, device_id)
    releases = []
    for (_, model, release), (_, totals) in sorted(_per_device(s, since, device_id).items()):
        releases.append({
            "model": model, "release": release,
            **totals.to_json(reference_of(s, model, release), min_inferences),
            "class_counts": dict(sorted(totals.counts.items())),
            "confidence_hist": totals.hist,
            "golden_set_accuracy": golden.get((device_id, release)),
        })  # fmt: skip
    return {
        "device_id": device_id, "profile": device.profile, "since": since.isoformat(),
        "thresholds": {**accuracy.thresholds(), "min_inferences": min_inferences},
        "releases": releases,
    }  # fmt: skip

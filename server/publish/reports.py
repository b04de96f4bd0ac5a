"""What is shown of a published release beyond its row: its validation report, its deltas.

A release published with its FP32 original and a validation set keeps the
gate's full report (per-class accuracy, confusion changes, the reference
distributions the field-accuracy work compares devices with) and any override.
The report lives in its own table rather than in new columns of ``models``, so
reading a list of releases never drags the reports along.
Lists read only the small columns (decision, summary, override); the full
JSON is read one release at a time. ``choose_variant`` says which variant a
request for "the report of release N" means; ``signed_deltas`` finds the
deltas signed into a release in the TUF targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Boolean, String, Text, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from agent.protocol.custom_fields import TargetInfo
from server.db.tables import Base, Model, _BigId, as_utc, utcnow
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.publish.deltas import BuiltDelta

OVERRIDE_BY = "operator"  # one operator token today: the override names the role


class ModelReport(Base):
    """The validation report of one published release variant (at most one)."""

    __tablename__ = "model_reports"
    __table_args__ = (UniqueConstraint("name", "release", "variant", name="uq_model_reports"),)

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    variant: Mapped[str] = mapped_column(String(32))
    decision: Mapped[str] = mapped_column(String(32))
    passed: Mapped[bool] = mapped_column(Boolean)
    summary: Mapped[dict[str, Any]]  # decision, failed classes, overall: what lists show
    override_reason: Mapped[str | None] = mapped_column(Text)
    override_by: Mapped[str | None] = mapped_column(String(64))
    report: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


@dataclass(frozen=True)
class Override:
    """Who shipped a release the gate refused, why, and when."""

    reason: str
    by: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        at = self.at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")  # as the API
        return {"reason": self.reason, "by": self.by, "at": at}


@dataclass(frozen=True)
class GateSummary:
    """What a release listing shows of its report."""

    decision: str
    passed: bool
    failed_classes: tuple[str, ...]
    overall: dict[str, Any] | None
    text: str
    override: Override | None

    @classmethod
    def from_report(cls, report: dict[str, Any], text: str, override: Override | None) -> (
        GateSummary
    ):  # fmt: skip
        return cls(
            decision=str(report["decision"]),
            passed=bool(report["passed"]),
            failed_classes=tuple(report.get("failed_classes", ())),
            overall=report.get("overall"),
            text=text,
            override=override,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "passed": self.passed,
            "failed_classes": list(self.failed_classes),
            "overall": self.overall,
            "summary": self.text,
            "override": None if self.override is None else self.override.to_json(),
        }


def _summary(row: Any) -> GateSummary:
    """From a ModelReport or a row of its columns (lists select no report JSON)."""
    data = row.summary
    override = None
    if row.override_reason is not None:
        at = as_utc(row.created_at)
        assert at is not None
        override = Override(row.override_reason, row.override_by or OVERRIDE_BY, at)
    return GateSummary(
        decision=row.decision,
        passed=row.passed,
        failed_classes=tuple(data.get("failed_classes", ())),
        overall=data.get("overall"),
        text=str(data.get("summary", "")),
        override=override,
    )


def add_report(
    s: Session, name: str, release: int, variant: str, *, report: dict[str, Any],
    summary: GateSummary,
) -> ModelReport:  # fmt: skip
    """Store a release's report; the override, if any, is in ``summary``."""
    override = summary.override
    row = ModelReport(
        name=name, release=release, variant=variant, decision=summary.decision,
        passed=summary.passed,
        summary={k: v for k, v in summary.to_json().items() if k != "override"},
        override_reason=None if override is None else override.reason,
        override_by=None if override is None else override.by,
        report=report,
        created_at=utcnow() if override is None else override.at,
    )  # fmt: skip
    s.add(row)
    try:
        s.flush()
    except IntegrityError as err:
        raise ConflictError(f"model {name} release {release} variant {variant} has a report") from (
            err
        )
    return row


def get_report(s: Session, name: str, release: int, variant: str) -> dict[str, Any] | None:
    row = s.scalars(
        select(ModelReport).where(
            ModelReport.name == name, ModelReport.release == release, ModelReport.variant == variant
        )
    ).first()
    return None if row is None else dict(row.report)


def gate_summaries(s: Session, name: str | None = None, release: int | None = None) -> (
    dict[tuple[str, int, str], GateSummary]
):  # fmt: skip
    """(name, release, variant) -> summary, for the releases that have a report."""
    cols = (
        ModelReport.name, ModelReport.release, ModelReport.variant, ModelReport.decision,
        ModelReport.passed, ModelReport.summary, ModelReport.override_reason,
        ModelReport.override_by, ModelReport.created_at,
    )  # fmt: skip
    query = select(*cols)
    if name is not None:
        query = query.where(ModelReport.name == name)
    if release is not None:
        query = query.where(ModelReport.release == release)
    return {(r.name, r.release, r.variant): _summary(r) for r in s.execute(query)}


def choose_variant(name: str, release: int, variants: Sequence[str], wanted: str | None) -> str:
    """The variant asked for; else the only one, else int8-cpu; else ask the caller to choose."""
    if not variants:
        raise NotFoundError(f"model {name} release {release} is not published")
    if wanted is not None:
        if wanted not in variants:
            raise NotFoundError(
                f"model {name} release {release} has no variant {wanted!r} "
                f"(published: {', '.join(variants)})"
            )
        return wanted
    if len(variants) == 1:
        return variants[0]
    if "int8-cpu" in variants:
        return "int8-cpu"
    raise InvalidInputError(
        f"model {name} release {release} has variants {', '.join(variants)}; choose one with "
        "?variant="
    )


def signed_deltas(targets: Mapping[str, TargetInfo], rows: Sequence[Model],
                  every: Sequence[Model]) -> dict[str, list[BuiltDelta]]:  # fmt: skip
    """Variant of ``rows`` -> the deltas signed into it; ``every`` names their base releases.

    The patch method is not signed, so it is left empty; 0 is a base no longer published.
    One per base: the smallest signed patch (the ANS-coded one when it is signed beside
    the version 1 patch; its ``method`` then says ``format v2``).
    """
    releases = {(m.variant, m.sha256): m.release for m in every}
    into = {f"deltas/{m.name}/{m.release}/{m.variant}": m for m in rows}
    out: dict[str, list[BuiltDelta]] = {}
    for path, info in targets.items():
        row = into.get(path.rpartition("/")[0])
        if row is None:
            continue
        base = str(info.custom.get("base_sha256", ""))
        method = "format v2" if info.custom.get("format_version", 1) == 2 else ""
        out.setdefault(row.variant, []).append(BuiltDelta(
            releases.get((row.variant, base), 0), base, path, info.length, method, row.length,
        ))  # fmt: skip
    smallest = {v: {d.base_sha256: d for d in sorted(ds, key=lambda x: -x.length)}
                for v, ds in out.items()}  # fmt: skip
    return {v: sorted(d.values(), key=lambda x: x.base_release) for v, d in smallest.items()}

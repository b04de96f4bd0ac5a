"""Bandwidth accounting: what each update cost, against full INT8 and FP32 files.

Devices report one ``download`` event per update (over MQTT and HTTP, so it
may arrive twice); rows are keyed by (device, update id) and a repeat is
ignored. A second report with ``via`` = ``aux`` counts what else the update
cost: its golden set (0 when the device already held that content) and the TUF
metadata it fetched; those bytes are sent bytes, but not an update of their
own. The summary is computed in SQL so it stays cheap for a large fleet.

A full download of a release whose delta from the device's installed base was
still queued or building (``server.publish.delta_jobs``) is counted on that job
(``full_before_delta``): what building deltas after publish costs the network.
The report arrives before the device installs, so the device row still names its base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, String, UniqueConstraint, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db.tables import Base, DeltaJob, Device, _BigId, utcnow

log = logging.getLogger(__name__)

GB = 1e9
# ``delta-ans``: a format version 2 (ANS-coded) delta; it counts as a delta too.
DELTA_VIAS = ("delta", "delta-ans")
VIAS = (*DELTA_VIAS, "full", "aux")
DEFAULT_PRICE_PER_GB = 0.09


class Download(Base):
    __tablename__ = "downloads"
    __table_args__ = (
        UniqueConstraint("device_id", "update_id", name="uq_downloads_update"),
        Index("ix_downloads_release", "name", "release", "variant"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    update_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    variant: Mapped[str] = mapped_column(String(32))
    via: Mapped[str] = mapped_column(String(16))
    bytes_downloaded: Mapped[int] = mapped_column(BigInteger)
    target_bytes: Mapped[int] = mapped_column(BigInteger)
    fp32_bytes: Mapped[int | None] = mapped_column(BigInteger)
    fallback: Mapped[str | None] = mapped_column(String(300))
    at: Mapped[datetime]


def _int(detail: dict[str, Any], key: str, required: bool = True) -> int | None:
    value = detail.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"download report field {key!r} must be a non-negative integer")
    return value


def parse_report(detail: Any) -> dict[str, Any] | None:
    """The accounting row for a ``download`` event, or None when it is not one we can count."""
    if not isinstance(detail, dict):
        return None
    if isinstance(detail.get("detail"), dict) and "update_id" not in detail:
        detail = detail["detail"]  # MQTT events carry the report one level down
    update_id, via = detail.get("update_id"), detail.get("via")
    if not isinstance(update_id, str) or via not in VIAS:
        return None
    name, variant = detail.get("name"), detail.get("variant")
    if not isinstance(name, str) or not isinstance(variant, str):
        return None
    try:
        row = {
            "update_id": update_id[:64],
            "name": name[:64],
            "variant": variant[:32],
            "release": _int(detail, "release"),
            "via": via,
            "bytes_downloaded": _int(detail, "bytes_downloaded"),
            "target_bytes": _int(detail, "target_bytes"),
            "fp32_bytes": _int(detail, "fp32_bytes", required=False),
        }
    except ValueError as err:
        log.warning("ignored malformed download report: %s", err)
        return None
    fallback = detail.get("fallback")
    row["fallback"] = fallback[:300] if isinstance(fallback, str) else None
    return row


def record_download(s: Session, device_id: str, detail: Any) -> bool:
    """Store one report; False when it is malformed or already counted."""
    row = parse_report(detail)
    if row is None:
        return False
    dialect = s.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # The same report arrives on MQTT and HTTP, possibly at once: let the unique key decide.
    stmt = insert(Download).values(device_id=device_id, at=utcnow(), **row)
    stmt = stmt.on_conflict_do_nothing(index_elements=["device_id", "update_id"])
    # RETURNING, not rowcount: psycopg reports a row for an INSERT that did nothing.
    added = s.execute(stmt.returning(Download.id)).first() is not None
    if added and row["via"] == "full":
        _count_full_before_delta(s, device_id, row)
    return added


def _count_full_before_delta(s: Session, device_id: str, row: dict[str, Any]) -> None:
    """Count a full download on the pending delta job from the device's installed base."""
    base = select(Device.installed_sha256).where(Device.id == device_id).scalar_subquery()
    s.execute(
        update(DeltaJob)
        .where(
            DeltaJob.name == row["name"],
            DeltaJob.release == row["release"],
            DeltaJob.variant == row["variant"],
            DeltaJob.base_sha256 == base,
            DeltaJob.state.in_(("queued", "building")),
        )
        .values(full_downloads=DeltaJob.full_downloads + 1)
        .execution_options(synchronize_session=False)
    )


def _full_before_delta(s: Session) -> dict[tuple[str, int, str], int]:
    """(name, release, variant) -> full downloads made while its delta was not built."""
    rows = s.execute(
        select(DeltaJob.name, DeltaJob.release, DeltaJob.variant, func.sum(DeltaJob.full_downloads))
        .where(DeltaJob.full_downloads > 0)
        .group_by(DeltaJob.name, DeltaJob.release, DeltaJob.variant)
    )
    return {(str(n), int(r), str(v)): int(c or 0) for n, r, v, c in rows}


@dataclass(frozen=True)
class Totals:
    updates: int
    deltas: int
    fallbacks: int
    bytes_sent: int  # model bytes and aux bytes
    full_int8_bytes: int
    fp32_bytes: int | None
    aux_bytes: int = 0  # golden sets and TUF metadata
    deltas_ans: int = 0  # of ``deltas``, those through an ANS-coded (version 2) patch

    def to_json(self, price_per_gb: float) -> dict[str, Any]:
        # Full files would have needed the same golden sets and metadata: the references
        # include the aux bytes, so a saving compares like with like.
        def saving(reference: int | None) -> float | None:
            if not reference:
                return None
            return round(1.0 - self.bytes_sent / (reference + self.aux_bytes), 4)

        full_cost = (self.full_int8_bytes + self.aux_bytes) / GB * price_per_gb
        sent_cost = self.bytes_sent / GB * price_per_gb
        return {
            "updates": self.updates,
            "deltas": self.deltas,
            "deltas_ans": self.deltas_ans,
            "fallbacks": self.fallbacks,
            "bytes_sent": self.bytes_sent,
            "aux_bytes": self.aux_bytes,
            "full_int8_bytes": self.full_int8_bytes,
            "fp32_bytes": self.fp32_bytes,
            "saving_vs_int8": saving(self.full_int8_bytes),
            "saving_vs_fp32": saving(self.fp32_bytes),
            "ratio_fp32_to_sent": (
                round((self.fp32_bytes + self.aux_bytes) / self.bytes_sent, 1)
                if self.fp32_bytes and self.bytes_sent
                else None
            ),
            "cost_sent": round(sent_cost, 6),
            "cost_full_int8": round(full_cost, 6),
            "cost_saved": round(full_cost - sent_cost, 6),
        }


def _totals_query(*group: Any) -> Any:
    fp32_known = func.sum(Download.fp32_bytes)
    aux = Download.via == "aux"
    return select(
        *group,
        func.sum(case((aux, 0), else_=1)),
        func.sum(case((Download.via.in_(DELTA_VIAS), 1), else_=0)),
        func.count(Download.fallback),
        func.sum(Download.bytes_downloaded),
        func.sum(Download.target_bytes),
        fp32_known,
        func.sum(case((aux, Download.bytes_downloaded), else_=0)),
        func.sum(case((Download.via == "delta-ans", 1), else_=0)),
    )


def _totals(row: Any, offset: int) -> Totals:
    values = tuple(row)[offset:]
    return Totals(
        updates=int(values[0] or 0),
        deltas=int(values[1] or 0),
        fallbacks=int(values[2] or 0),
        bytes_sent=int(values[3] or 0),
        full_int8_bytes=int(values[4] or 0),
        fp32_bytes=int(values[5]) if values[5] is not None else None,
        aux_bytes=int(values[6] or 0),
        deltas_ans=int(values[7] or 0),
    )


def summary(
    s: Session, price_per_gb: float = DEFAULT_PRICE_PER_GB, top: int = 50
) -> dict[str, Any]:
    """Fleet totals, per release, and the ``top`` devices by bytes received."""
    fleet = _totals(s.execute(_totals_query()).one(), 0)
    before = _full_before_delta(s)
    releases = [
        {
            "name": r[0],
            "release": r[1],
            "variant": r[2],
            **_totals(r, 3).to_json(price_per_gb),
            "full_before_delta": before.get((r[0], r[1], r[2]), 0),
        }
        for r in s.execute(
            _totals_query(Download.name, Download.release, Download.variant)
            .group_by(Download.name, Download.release, Download.variant)
            .order_by(Download.name, Download.release, Download.variant)
        )
    ]
    devices = [
        {"device_id": r[0], **_totals(r, 1).to_json(price_per_gb)}
        for r in s.execute(
            _totals_query(Download.device_id)
            .group_by(Download.device_id)
            .order_by(func.sum(Download.bytes_downloaded).desc())
            .limit(top)
        )
    ]
    return {
        "price_per_gb": price_per_gb,
        "fleet": {**fleet.to_json(price_per_gb), "full_before_delta": sum(before.values())},
        "releases": releases,
        "devices": devices,
    }

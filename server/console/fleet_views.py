"""Read models behind the console: the fleet at a glance and telemetry over time.

``overview`` counts in SQL (devices by profile, region and online; releases
in use; device states), so it costs the same at 65,000 devices as at six.
``series`` merges the stored rollups into at most ``MAX_POINTS`` steps per
profile and release with ``RollupValues.merge``: latency percentiles come from
the merged sketches, power and energy from sums, exactly as ``/metrics`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from server.db.tables import Device, DeviceTag, TelemetryLatest, TelemetryRollup, as_utc, utcnow
from server.telemetry.windows import RollupValues

MAX_POINTS = 120
MAX_ROWS = 200_000  # rollup rows read for one series answer; beyond it, "truncated"
REGION_TAG = "region"
HEALTH_WINDOW = timedelta(minutes=15)


def online_since(now: datetime, presence_window_s: float) -> datetime:
    """As ``/metrics``: seen within ``ServerConfig.presence_window_s`` and not offline."""
    return now - timedelta(seconds=presence_window_s)


def overview(s: Session, since_online: datetime) -> dict[str, Any]:
    """Devices by profile/region/online, releases in use, device states, recent health."""
    state = aliased(TelemetryLatest)
    region = aliased(DeviceTag)
    status = state.payload["status"].as_string()
    online = case(
        (and_(Device.last_seen >= since_online, or_(status.is_(None), status != "offline")), 1),
        else_=0,
    )
    rows = s.execute(
        select(Device.profile, region.value, online.label("online"), func.count())
        .select_from(Device)
        .outerjoin(state, and_(state.device_id == Device.id, state.channel == "state"))
        .outerjoin(region, and_(region.device_id == Device.id, region.key == REGION_TAG))
        .group_by(Device.profile, region.value, online)
    )
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for profile, region_value, is_online, n in rows:
        key = (profile, region_value or "")
        group = groups.setdefault(key, {"profile": key[0], "region": key[1], "online": 0,
                                        "offline": 0})
        group["online" if is_online else "offline"] += int(n)
    installed = list(s.execute(
        select(Device.installed_name, Device.installed_release, Device.installed_variant,
               func.count())
        .group_by(Device.installed_name, Device.installed_release, Device.installed_variant)
    ))
    states = s.execute(select(Device.state, func.count()).group_by(Device.state))
    devices = [groups[k] for k in sorted(groups)]
    return {
        "devices": {
            "total": sum(g["online"] + g["offline"] for g in devices),
            "online": sum(g["online"] for g in devices),
            "groups": devices,
        },
        "releases": [
            {"model": name, "release": release, "variant": variant, "devices": int(n)}
            for name, release, variant, n in installed
            if name is not None
        ],
        "no_model": sum(int(n) for name, _r, _v, n in installed if name is None),
        "states": {str(st): int(n) for st, n in states},
        "health": _health(s, utcnow() - HEALTH_WINDOW),
    }


def _health(s: Session, since: datetime) -> dict[str, Any]:
    t = TelemetryRollup
    row = s.execute(
        select(
            func.coalesce(func.sum(t.windows), 0),
            func.coalesce(func.sum(t.inferences), 0),
            func.coalesce(func.sum(t.errors), 0),
            func.coalesce(func.sum(t.throttled_windows), 0),
            func.coalesce(func.sum(t.outbox_dropped), 0),
            func.count(func.distinct(t.device_id)),
        ).where(t.bucket >= since)
    ).one()
    windows, inferences, errors, throttled, dropped, reporting = (int(v) for v in row)
    return {
        "minutes": int(HEALTH_WINDOW.total_seconds() // 60),
        "devices_reporting": reporting,
        "windows": windows,
        "inferences": inferences,
        "errors": errors,
        "throttled_windows": throttled,
        "outbox_dropped": dropped,
    }


@dataclass(frozen=True)
class SeriesQuery:
    since: datetime
    until: datetime
    bucket_s: int  # the stored rollup bucket
    device_id: str | None = None


def step_for(span_s: float, bucket_s: int) -> int:
    """A multiple of the rollup bucket giving at most ``MAX_POINTS`` steps."""
    return bucket_s * max(1, math.ceil(span_s / MAX_POINTS / bucket_s))


def series(s: Session, q: SeriesQuery) -> dict[str, Any]:
    """Per (profile, model, release): points of power, energy, latency and throughput."""
    step = step_for((q.until - q.since).total_seconds(), q.bucket_s)
    table = TelemetryRollup.__table__
    stmt = select(table).where(table.c.bucket >= q.since, table.c.bucket < q.until)
    if q.device_id is not None:
        stmt = stmt.where(table.c.device_id == q.device_id)
    merged: dict[tuple[str, str, int], dict[int, tuple[RollupValues, set[str]]]] = {}
    truncated = False
    for n, row in enumerate(s.execute(stmt.order_by(table.c.bucket).limit(MAX_ROWS + 1))):
        if n == MAX_ROWS:
            truncated = True
            break
        when = (as_utc(row.bucket) or row.bucket).timestamp()
        slot = int(when // step * step)
        points = merged.setdefault((row.profile, row.model, row.release), {})
        values, devices = points.setdefault(slot, (RollupValues(), set()))
        values.merge(RollupValues.from_row(row))
        devices.add(row.device_id)
    return {
        "since": q.since.isoformat(),
        "until": q.until.isoformat(),
        "step_s": step,
        "truncated": truncated,
        "series": [
            {
                "profile": profile,
                "model": model or None,
                "release": release or None,
                "points": [_point(slot, *points[slot]) for slot in sorted(points)],
            }
            for (profile, model, release), points in sorted(merged.items())
        ],
    }


def _point(slot: int, v: RollupValues, devices: set[str]) -> dict[str, Any]:
    def rounded(x: float | None, digits: int = 3) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "t": datetime.fromtimestamp(slot, timezone.utc).isoformat(),
        "devices": len(devices),
        "inferences": v.inferences,
        "errors": v.errors,
        "fps": rounded(v.fps_mean, 2),
        "power_mw": rounded(v.power_mw_mean, 1),
        "mj_per_inference": rounded(v.mj_per_inference, 4),
        "invoke_p95_ms": rounded(v.invoke_p95_ms()),
        "e2e_p95_ms": rounded(v.e2e_p95_ms()),
        "temp_max_c": v.temp_max_c,
        "throttled_windows": v.throttled_windows,
    }

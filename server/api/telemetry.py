"""Telemetry rollups (``GET /api/v1/telemetry``) and Prometheus (``GET /metrics``).

Rollups need the operator token. ``/metrics`` takes ``Authorization: Bearer``
with either the operator token or the read-only metrics token
(``metrics_token`` / ``$EDGEFLEET_METRICS_TOKEN``), which is what a
Prometheus ``authorization`` block should carry: a leaked scrape config then
exposes fleet gauges, not fleet control. It is never served anonymously.
"""

from __future__ import annotations

import hmac
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import select

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme, bearer_token
from server.api.schemas import DEVICE_ID, MODEL_NAME, ErrorOut, UtcTime
from server.db.tables import Device, TelemetryRollup
from server.errors import AuthError, InvalidInputError, NotFoundError
from server.telemetry import latency_sketch
from server.telemetry.metrics import CONTENT_TYPE, FleetMetrics
from server.telemetry.storage import RollupQuery, query_rollups
from server.telemetry.windows import MAX_RELEASE, RollupValues, bucket_start

router = APIRouter(
    prefix="/api/v1",
    tags=["telemetry"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={code: {"model": ErrorOut} for code in (401, 422)},
)
metrics_router = APIRouter(tags=["metrics"], dependencies=[Depends(bearer_scheme)])
State = Annotated[AppState, Depends(app_state)]

PROFILE = r"^[a-z0-9][a-z0-9_-]{0,63}$"
RELEASE = r"^(?:([a-z0-9][a-z0-9_-]{0,63})@)?([0-9]{1,10})$"
DEFAULT_SPAN = timedelta(hours=1)
_RELEASE = re.compile(RELEASE)


class PowerOut(BaseModel):
    source: str  # sensor | estimate | unknown
    windows: int
    mw_mean: float | None
    mw_max: float | None
    mj_per_inference: float | None
    mj_per_inference_above_idle: float | None


class RollupOut(BaseModel):
    bucket: UtcTime
    device_id: str
    profile: str
    model: str | None
    release: int | None
    windows: int
    inferences: int
    errors: int
    fps_mean: float | None
    cpu_percent_mean: float | None
    rss_mb_max: float | None
    power: PowerOut | None
    thermal_windows: int
    throttled_windows: int
    temp_max_c: float | None
    invoke_p95_ms: float | None
    invoke_max_ms: float | None
    e2e_p95_ms: float | None
    outbox_dropped: int


class TelemetryPage(BaseModel):
    since: UtcTime
    until: UtcTime
    bucket_s: int
    count: int
    truncated: bool
    rollups: list[RollupOut]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def rollup_out(row: Any) -> RollupOut:
    v = RollupValues.from_row(row)
    power = None
    if row.power_source:
        power = PowerOut(
            source=row.power_source,
            windows=v.power_windows,
            mw_mean=_round(v.power_mw_mean, 1),
            mw_max=v.power_mw_max,
            mj_per_inference=_round(v.mj_per_inference, 4),
            mj_per_inference_above_idle=_round(v.mj_per_inference_above_idle, 4),
        )
    return RollupOut(
        bucket=row.bucket,
        device_id=row.device_id,
        profile=row.profile,
        model=row.model or None,
        release=row.release or None,
        windows=v.windows,
        inferences=v.inferences,
        errors=v.errors,
        fps_mean=_round(v.fps_mean, 2),
        cpu_percent_mean=_round(v.cpu_percent_sum / v.cpu_windows if v.cpu_windows else None, 1),
        rss_mb_max=v.rss_mb_max,
        power=power,
        thermal_windows=v.thermal_windows,
        throttled_windows=v.throttled_windows,
        temp_max_c=v.temp_max_c,
        invoke_p95_ms=row.invoke_p95_ms,
        invoke_max_ms=v.invoke_max_ms,
        e2e_p95_ms=row.e2e_p95_ms,
        outbox_dropped=v.outbox_dropped,
    )


def _utc(value: datetime) -> datetime:
    """Naive means UTC; an offset is converted (SQLite compares the stored UTC text)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_release(text: str, model: str | None) -> tuple[str | None, int]:
    """``"2"`` or ``"digits@2"`` -> (model, release); a conflicting ``model`` is an error."""
    match = _RELEASE.match(text)
    if match is None:
        raise InvalidInputError("release must look like 2 or NAME@2")
    name, number = match.group(1), int(match.group(2))
    if not 1 <= number <= MAX_RELEASE:
        raise InvalidInputError(f"release must be between 1 and {MAX_RELEASE}")
    if name is not None and model is not None and name != model:
        raise InvalidInputError(f"release {text!r} names another model than model={model!r}")
    return name or model, number


@router.get("/telemetry", response_model=TelemetryPage)
def query_telemetry(
    *,
    st: State,
    device: Annotated[str | None, Query(pattern=DEVICE_ID, description="device id")] = None,
    profile: Annotated[str | None, Query(pattern=PROFILE, description="board profile")] = None,
    model: Annotated[str | None, Query(pattern=MODEL_NAME, description="model name")] = None,
    release: Annotated[
        str | None, Query(max_length=80, description="release counter, or NAME@RELEASE")
    ] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 or Unix time")] = None,
    until: Annotated[datetime | None, Query(description="default: now")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> TelemetryPage:
    """Rollups (one per bucket, device, profile, release and power source) in a time range."""
    end = _utc(until) if until is not None else datetime.now(timezone.utc)
    start = _utc(since) if since is not None else end - DEFAULT_SPAN
    if start >= end:
        raise InvalidInputError("since must be before until")
    number = None
    if release is not None:
        model, number = parse_release(release, model)
    query = RollupQuery(
        since=bucket_start(start, st.config.rollup_bucket_s),
        until=end,
        device_id=device,
        profile=profile,
        model=model,
        release=number,
        limit=min(limit, st.config.list_limit),
    )
    with st.db.session() as s:
        rows, truncated = query_rollups(s, query)
        items = [rollup_out(r) for r in rows]
    return TelemetryPage(
        since=query.since,
        until=end,
        bucket_s=st.config.rollup_bucket_s,
        count=len(items),
        truncated=truncated,
        rollups=items,
    )


# The summary merges rollups newest first; beyond this many it leaves older buckets out
# and says so (``truncated``), so one request on a huge fleet stays bounded.
SUMMARY_MAX_ROLLUPS = 200_000


class SummaryRow(BaseModel):
    device_id: str | None  # set in a device's summary
    profile: str | None  # None on the total row when profiles are mixed
    model: str | None
    release: int | None
    devices: int
    windows: int
    inferences: int
    errors: int
    fps_mean: float | None
    invoke_p50_ms: float | None
    invoke_p95_ms: float | None
    e2e_p95_ms: float | None
    power_mw_mean: float | None
    mj_per_inference: float | None
    power_sources: dict[str, int]  # source (sensor, estimate, unknown) -> windows with power
    temp_max_c: float | None
    throttled_windows: int


class TelemetrySummary(BaseModel):
    since: UtcTime
    until: UtcTime
    device_id: str | None
    truncated: bool
    rows: list[SummaryRow]
    total: SummaryRow | None


class _Group:
    """Merged rollups of one row: exact sums, and a merged latency sketch for percentiles."""

    def __init__(self) -> None:
        self.values = RollupValues()
        self.devices: set[str] = set()
        self.profiles: set[str] = set()
        self.sources: dict[str, int] = {}

    def add(self, row: Any, values: RollupValues) -> None:
        self.values.merge(values)
        self.devices.add(row.device_id)
        self.profiles.add(row.profile)
        if row.power_source and values.power_windows:
            self.sources[row.power_source] = (
                self.sources.get(row.power_source, 0) + values.power_windows
            )

    def out(self, device_id: str | None, model: str | None, release: int | None) -> SummaryRow:
        v = self.values
        return SummaryRow(
            device_id=device_id,
            profile=next(iter(self.profiles)) if len(self.profiles) == 1 else None,
            model=model or None,
            release=release or None,
            devices=len(self.devices),
            windows=v.windows,
            inferences=v.inferences,
            errors=v.errors,
            fps_mean=_round(v.fps_mean, 2),
            invoke_p50_ms=_round(latency_sketch.quantile(v.invoke, 0.5)),
            invoke_p95_ms=_round(v.invoke_p95_ms()),
            e2e_p95_ms=_round(v.e2e_p95_ms()),
            power_mw_mean=_round(v.power_mw_mean, 1),
            mj_per_inference=_round(v.mj_per_inference, 4),
            power_sources=dict(sorted(self.sources.items())),
            temp_max_c=v.temp_max_c,
            throttled_windows=v.throttled_windows,
        )


@router.get("/telemetry/summary", response_model=TelemetrySummary)
def telemetry_summary(
    *,
    st: State,
    device: Annotated[str | None, Query(pattern=DEVICE_ID, description="one device")] = None,
    profile: Annotated[str | None, Query(pattern=PROFILE, description="board profile")] = None,
    hours: Annotated[float, Query(gt=0, le=24 * 90, description="lookback in hours")] = 1.0,
) -> TelemetrySummary:
    """Latency p50/p95, power and energy per release and profile (or for one device, per
    release), merged exactly from the rollups of the last ``hours``, and their total."""
    until = datetime.now(timezone.utc)
    since = bucket_start(until - timedelta(hours=hours), st.config.rollup_bucket_s)
    table = TelemetryRollup.__table__
    stmt = select(table).where(table.c.bucket >= since)
    if device is not None:
        stmt = stmt.where(table.c.device_id == device)
    if profile is not None:
        stmt = stmt.where(table.c.profile == profile)
    stmt = stmt.order_by(table.c.bucket.desc()).limit(SUMMARY_MAX_ROLLUPS + 1)
    groups: dict[tuple[str, str, int], _Group] = {}
    total = _Group()
    seen = 0
    with st.db.session() as s:
        if device is not None and s.get(Device, device) is None:
            raise NotFoundError(f"no device {device!r}")
        for row in s.execute(stmt):
            seen += 1
            if seen > SUMMARY_MAX_ROLLUPS:
                break
            values = RollupValues.from_row(row)
            key = ("" if device is not None else row.profile, row.model, row.release)
            groups.setdefault(key, _Group()).add(row, values)
            total.add(row, values)  # merging reads `values`, never changes it
    rows = [g.out(device, model, release) for (_, model, release), g in sorted(groups.items())]
    return TelemetrySummary(
        since=since,
        until=until,
        device_id=device,
        truncated=seen > SUMMARY_MAX_ROLLUPS,
        rows=rows,
        total=total.out(device, None, None) if seen else None,
    )


def check_metrics_reader(request: Request) -> None:
    """The operator token or the metrics token, constant-time; anything else is 401."""
    token = bearer_token(request).encode()
    state = app_state(request)
    accepted = [state.operator_token, state.config.metrics_token]
    if not any(t and hmac.compare_digest(token, t.encode()) for t in accepted):
        raise AuthError("metrics token is invalid")


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}, 401: {"model": ErrorOut}},
)
def metrics(request: Request) -> Response:
    """Prometheus exposition of the fleet gauges and this server's ingest counters."""
    check_metrics_reader(request)
    registry: FleetMetrics = request.app.state.edgefleet_metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)

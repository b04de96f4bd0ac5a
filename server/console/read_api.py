"""Small read endpoints the console needs and the REST API lacked (viewer or operator).

``GET /api/v1/fleet``: devices online and offline by profile and region,
releases in use, device states and the last 15 minutes' health.
``GET /api/v1/telemetry/series``: power, energy per inference, latency and
throughput over time per profile and release (one device with ``device``).
``GET /api/v1/devices/{id}/history``: a device's events, newest first.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.schemas import DEVICE_ID, ErrorOut, EventOut
from server.console import fleet_views
from server.db import queries
from server.db.tables import utcnow

router = APIRouter(
    prefix="/api/v1",
    tags=["console"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={code: {"model": ErrorOut} for code in (401, 403, 404, 422)},
)
State = Annotated[AppState, Depends(app_state)]
DeviceId = Annotated[str, Path(pattern=DEVICE_ID)]


@router.get("/fleet")
def fleet(st: State) -> dict[str, Any]:
    """The fleet at a glance: who is online where, what runs, how healthy it is."""
    cfg = st.config
    since = fleet_views.online_since(utcnow(), cfg.presence_window_s)
    with st.db.session() as s:
        return fleet_views.overview(s, since)


@router.get("/telemetry/series")
def telemetry_series(
    st: State,
    hours: Annotated[float, Query(gt=0, le=24 * 90, description="lookback in hours")] = 1.0,
    device: Annotated[str | None, Query(pattern=DEVICE_ID, description="one device")] = None,
) -> dict[str, Any]:
    """Per profile and release, at most 120 points: mW, mJ/inference, p95 latency, fps."""
    until = utcnow()
    query = fleet_views.SeriesQuery(
        since=until - timedelta(hours=hours),
        until=until + timedelta(seconds=st.config.rollup_bucket_s),  # the current bucket too
        bucket_s=st.config.rollup_bucket_s,
        device_id=device,
    )
    with st.db.session() as s:
        if device is not None:
            queries.get_device(s, device)  # 404 for an unknown device, not an empty chart
        return fleet_views.series(s, query)


@router.get("/devices/{device_id}/history")
def device_history(
    device_id: DeviceId,
    st: State,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> dict[str, Any]:
    """The device's events (updates, golden sets, errors), newest first."""
    with st.db.session() as s:
        queries.get_device(s, device_id)
        events = queries.recent_events(s, device_id, min(limit, st.config.list_limit))
        return {
            "device_id": device_id,
            "events": [EventOut.model_validate(e).model_dump(mode="json") for e in events],
        }

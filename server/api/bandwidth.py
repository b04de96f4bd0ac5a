"""``GET /api/v1/bandwidth``: bytes sent versus full INT8 and FP32 files, and their cost."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.schemas import ErrorOut
from server.telemetry import bandwidth

router = APIRouter(
    prefix="/api/v1",
    tags=["operator"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={code: {"model": ErrorOut} for code in (401, 422)},
)


@router.get("/bandwidth")
def get_bandwidth(
    st: Annotated[AppState, Depends(app_state)],
    price_per_gb: Annotated[float, Query(ge=0, le=1000)] = bandwidth.DEFAULT_PRICE_PER_GB,
    top: Annotated[int, Query(ge=0, le=10_000)] = 50,
) -> dict[str, Any]:
    """Fleet, per-release and per-device totals of update downloads."""
    with st.db.session() as s:
        return bandwidth.summary(s, price_per_gb, top)

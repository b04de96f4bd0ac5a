"""Field accuracy: ``GET /api/v1/accuracy`` (release x profile) and per device.

Both read the hourly ``accuracy_windows`` of the last ``hours`` and compare
them with each release's reference distributions from validation at publish
(``server.telemetry.accuracy`` says how drift is judged). A release published
without a validation set has ``drift: null`` and a ``drift_reason``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.schemas import DEVICE_ID, ErrorOut
from server.errors import NotFoundError
from server.rollout.service import shadow_store
from server.telemetry import accuracy, accuracy_store

router = APIRouter(
    prefix="/api/v1",
    tags=["operator"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={code: {"model": ErrorOut} for code in (401, 404, 422)},
)
State = Annotated[AppState, Depends(app_state)]
Hours = Annotated[float, Query(gt=0, le=24 * 90, description="lookback in hours")]
MinInferences = Annotated[
    int, Query(ge=1, le=10**9, description="inferences needed before drift is judged")
]


@router.get("/accuracy")
def get_accuracy(
    st: State,
    hours: Hours = accuracy_store.DEFAULT_LOOKBACK_HOURS,
    min_inferences: MinInferences = accuracy.MIN_INFERENCES,
) -> dict[str, Any]:
    """Per release and board profile: inferences, mean confidence, drift, golden sets; and
    ``shadow``: the candidates rollouts are shadowing now, their agreement per profile."""
    with st.db.session() as s:
        data = accuracy_store.fleet_accuracy(s, hours, min_inferences)
        data["shadow"] = shadow_store.live(s)
        return data


@router.get("/devices/{device_id}/accuracy")
def get_device_accuracy(
    st: State,
    device_id: Annotated[str, Path(pattern=DEVICE_ID)],
    hours: Hours = accuracy_store.DEFAULT_LOOKBACK_HOURS,
    min_inferences: MinInferences = accuracy.MIN_INFERENCES,
) -> dict[str, Any]:
    """One device's predictions per release, with their drift against the reference."""
    with st.db.session() as s:
        found = accuracy_store.device_accuracy(s, device_id, hours, min_inferences)
    if found is None:
        raise NotFoundError(f"no device {device_id!r}")
    return found

"""Operator routes for staged rollouts (Bearer operator token).

``POST /api/v1/rollouts`` takes the same options as ``edgefleet rollout
create`` (or a whole stored-form ``spec`` for per-stage settings) and answers
with the rollout's detail view; ``POST /api/v1/rollouts/{id}/{action}``
starts, pauses, resumes, approves, aborts or reverts it. Refusals are 4xx
with a message: 422 bad input, 404 unknown release, device or rollout, 409 a
transition the state does not allow, devices held by another rollout, or a
revert to a release that is no longer a signed target.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import Field, StringConstraints, model_validator

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.limits import Offset
from server.api.schemas import ErrorOut, _OperatorInput
from server.rollout.core.options import build_spec
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import Action, RolloutState
from server.rollout.service import (
    ServiceConfig,
    create_rollout,
    get_rollout,
    perform,
    shadow_store,
    views,
)
from server.rollout.service import history as load_history

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/api/v1",
    tags=["rollouts"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={code: {"model": ErrorOut} for code in (401, 404, 409, 422)},
)
State = Annotated[AppState, Depends(app_state)]
RolloutId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
Text = Annotated[str, StringConstraints(max_length=200)]
Item = Annotated[str, StringConstraints(max_length=200)]
_SPEC_FIELDS_EXEMPT = frozenset({"spec", "start"})
_SHADOW_PREFIXES = ("shadow_", "min_shadow_")


class RolloutIn(_OperatorInput):
    """The options of ``edgefleet rollout create``; every stage shares them."""

    release: Text | None = None
    select: Annotated[list[Item], Field(max_length=64)] = Field(default_factory=list)
    profiles: Annotated[list[Item], Field(max_length=64)] = Field(default_factory=list)
    devices: Annotated[list[Item], Field(max_length=100_000)] = Field(default_factory=list)
    all_devices: bool = False
    stages: Text = "1%,10%,50%,100%"
    soak: Text = "30m"
    timeout: Text = "1h"
    success: Text | None = None
    max_failure: Text = "2%"
    max_install_failure: Text | None = "5%"
    max_latency_regression: Text | None = "10%"
    max_power_regression: Text | None = "10%"
    min_golden_accuracy: Text | None = None
    max_device_errors: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    min_sample: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    latency_floor_ms: Text = "0.5"
    power_floor_mw: Text = "100"
    gate_estimated_power: bool = False
    max_concurrent_downloads: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    window_cron: Text | None = None
    window_duration: Text | None = None
    window_timezone: Text = "UTC"
    approval: bool = False
    variants: Annotated[dict[Item, Item], Field(max_length=64)] = Field(default_factory=dict)
    shadow_every: Annotated[int, Field(ge=1, le=10_000)] | None = Field(
        default=None, description="shadow the candidate on 1 frame in N before each stage installs"
    )
    min_shadow_agreement: Text = "95%"
    shadow_min_frames: Annotated[int, Field(ge=1, le=1_000_000)] = 30
    shadow_cpu_budget: Text = "25%"
    shadow_duration: Text = "30m"
    spec: dict[str, Any] | None = Field(
        default=None, description="a whole spec in stored form (per-stage settings)"
    )
    start: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> RolloutIn:
        if self.spec is not None and self.model_fields_set - _SPEC_FIELDS_EXEMPT:
            raise ValueError("give either a whole spec or the individual options, not both")
        if self.spec is None and self.release is None:
            raise ValueError("release is required (NAME@RELEASE, e.g. digits@2)")
        shadow_options = {f for f in self.model_fields_set if f.startswith(_SHADOW_PREFIXES)}
        if self.shadow_every is None and shadow_options - {"shadow_every"}:
            raise ValueError(
                f"{', '.join(sorted(shadow_options))} need shadow_every (1 frame in N) to be set"
            )
        return self

    def to_spec(self) -> RolloutSpec:
        if self.spec is not None:
            return RolloutSpec.from_json(self.spec)
        assert self.release is not None
        options = self.model_dump(exclude={"spec", "start", "release"})
        return build_spec(release=self.release, **options)


def _service(st: AppState) -> ServiceConfig:
    return ServiceConfig.from_server(st.config)


def _detail(st: AppState, rollout_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        return views.detail(s, get_rollout(s, rollout_id))


@router.post("/rollouts", status_code=201)
def create(body: RolloutIn, st: State) -> dict[str, Any]:
    """Create a rollout (a draft, or running at once with ``"start": true``)."""
    spec = body.to_spec()
    result = create_rollout(st.db, spec, start=body.start, cfg=_service(st))
    log.info("created rollout %s of %s (%s)", result.rollout_id, spec.release, result.state)
    return _detail(st, result.rollout_id)


@router.get("/rollouts")
def list_rollouts(
    st: State,
    state: Annotated[RolloutState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    with st.db.session() as s:
        rows = views.list_rows(s, state=state.value if state else None, limit=limit, offset=offset)
        return [views.summary(row) for row in rows]


@router.get("/rollouts/{rollout_id}")
def show(rollout_id: RolloutId, st: State) -> dict[str, Any]:
    """Per-stage progress, every gate against its limit, the last decision, why it paused."""
    return _detail(st, rollout_id)


@router.get("/rollouts/{rollout_id}/history")
def show_history(
    rollout_id: RolloutId, st: State, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> list[dict[str, Any]]:
    """Every state and stage change, oldest first, with who made it."""
    with st.db.session() as s:
        get_rollout(s, rollout_id)
        return views.history(load_history(s, rollout_id, limit))


@router.get("/rollouts/{rollout_id}/devices")
def show_devices(
    rollout_id: RolloutId,
    st: State,
    *,
    stage: Annotated[int | None, Query(ge=1, le=1000, description="1-based")] = None,
    status: Annotated[str | None, Query(pattern=r"^[a-z_]{1,16}$")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """The rollout's devices in cohort order: stage, status, previous release, measurements."""
    with st.db.session() as s:
        row = get_rollout(s, rollout_id)
        return views.devices(
            s,
            row,
            stage=None if stage is None else stage - 1,
            status=status,
            limit=limit,
            offset=offset,
        )


@router.get("/rollouts/{rollout_id}/shadow")
def show_shadow(rollout_id: RolloutId, st: State) -> dict[str, Any]:
    """Shadow agreement per profile: overall, per class (with the candidate's most
    frequent other answer), the candidate's latency and energy against the serving model."""
    with st.db.session() as s:
        row = get_rollout(s, rollout_id)
        data = shadow_store.report(s, rollout_id)
        data["settings"] = row.spec.get("shadow")
        return data


@router.post("/rollouts/{rollout_id}/{action}")
def act(rollout_id: RolloutId, action: Action, st: State) -> dict[str, Any]:
    """start | pause | resume | approve | abort | revert."""
    result = perform(st.db, rollout_id, action, repo=st.repo, cfg=_service(st))
    log.info("rollout %s: %s -> %s", rollout_id, action.value, result.state)
    return {
        "action": result.action,
        "devices": result.devices,
        "skipped": list(result.skipped),
        "rollout": _detail(st, rollout_id),
    }

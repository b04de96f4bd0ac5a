"""Delta builds after publish (``server.publish.delta_jobs``): state and progress per base.

``GET /api/v1/models/{name}/{release}/deltas``: one release's jobs (``edgefleet
model show``, ``edgefleet model publish --wait``). ``GET /api/v1/models/delta-jobs``:
the pending and most recent jobs of every release (the console).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.schemas import ErrorOut, ModelName, Release
from server.db import queries
from server.errors import NotFoundError
from server.publish import delta_jobs

router = APIRouter(
    prefix="/api/v1",
    tags=["operator"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={code: {"model": ErrorOut} for code in (401, 404, 422)},
)
State = Annotated[AppState, Depends(app_state)]


@router.get("/models/delta-jobs")
def recent_delta_jobs(
    st: State, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """Pending delta builds first, then the newest finished ones."""
    with st.db.session() as s:
        return {"pending": delta_jobs.pending_count(s), "jobs": delta_jobs.recent_jobs(s, limit)}


@router.get("/models/{name}/{release}/deltas")
def release_delta_jobs(
    name: Annotated[ModelName, Path()],
    release: Annotated[Release, Path(description="the release counter")],
    st: State,
) -> dict[str, Any]:
    """Each base's delta of one release: queued, building (with progress), done, skipped
    (not smaller than the file) or failed (with the reason); sizes and ratio when built."""
    with st.db.session() as s:
        if not queries.release_variants(s, name, release):
            raise NotFoundError(f"model {name} release {release} is not published")
        jobs = delta_jobs.release_jobs(s, name, release)
    pending = sum(1 for j in jobs if j["state"] in delta_jobs.PENDING)
    return {"name": name, "release": release, "pending": pending, "jobs": jobs}

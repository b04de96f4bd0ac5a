"""Device-facing routes: enrollment, check-in and event reports.

Check-ins and events are the fleet's steady load: they run on ``server.db.hot_path``
(SQLAlchemy Core, one connection and one transaction each), not on ORM sessions.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from agent.protocol.api import (
    CHECKIN_PATH,
    ENROLL_PATH,
    EVENTS_BATCH_PATH,
    EVENTS_PATH,
    InstalledModel,
)
from server.api.deps import AppState, app_state, bearer_token
from server.api.schemas import (
    DEVICE_ID,
    CheckinIn,
    CheckinOut,
    EnrollIn,
    EnrollOut,
    ErrorOut,
    EventBatchIn,
    EventIn,
    MqttOut,
)
from server.db import hot_path, queries
from server.errors import ServerError

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (401, 403, 409, 413, 422)
}
router = APIRouter(tags=["devices"], responses=_ERRORS)
DeviceId = Annotated[str, Path(pattern=DEVICE_ID)]
State = Annotated[AppState, Depends(app_state)]


@router.post(ENROLL_PATH, response_model=EnrollOut)
def enroll(body: EnrollIn, st: State) -> EnrollOut:
    """Trade an enrollment token for a device id, a device token and MQTT credentials.

    An enrolled hardware id is refused (409) unless ``replace`` is true: then the same
    device keeps its id and gets new credentials, profile and tags.
    """
    tags = queries.check_tags(body.tags, st.config.max_tags)
    try:
        tuf_root = json.loads(st.repo.root_bytes())
    except (OSError, ValueError) as err:
        raise ServerError(f"TUF root metadata is unavailable: {err}") from err
    with st.db.session() as s:
        queries.consume_enrollment_token(s, body.token, st.config.enrollment_tokens)
        creds = queries.enroll_device(
            s,
            hardware_id=body.hardware_id,
            profile=body.profile,
            variant_preference=body.variant_preference,
            tags=tags,
            agent_version=body.agent_version,
            replace=body.replace,
        )
    log.info(
        "%s device %s (profile %s)",
        "re-enrolled" if creds.reenrolled else "enrolled",
        creds.device_id,
        body.profile,
    )
    mqtt = st.mqtt_public
    return EnrollOut(
        device_id=creds.device_id,
        device_token=creds.device_token,
        mqtt=MqttOut(
            host=mqtt.host,
            port=mqtt.port,
            username=creds.device_id,
            password=creds.mqtt_password,
            tls=mqtt.tls,
        ),
        tuf_root=tuf_root,
    )


# The bearer scheme is declared for the OpenAPI document only: a dependency per request
# costs more on the hot device routes than the check itself (``bearer_token``).
_DEVICE_AUTH: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


@router.post(CHECKIN_PATH, response_model=CheckinOut, openapi_extra=_DEVICE_AUTH)
def checkin(device_id: DeviceId, body: CheckinIn, request: Request) -> JSONResponse:
    """Report state and the installed model; learn which signed target to run."""
    st = app_state(request)
    token_hash = queries.hash_secret(bearer_token(request))
    installed = (
        InstalledModel(**body.installed.model_dump()) if body.installed is not None else None
    )
    with st.db.engine.begin() as conn:
        answer = hot_path.checkin(
            conn,
            device_id,
            token_hash,
            state=body.state,
            installed=installed,
            agent_version=body.agent_version,
        )
    # The CheckinOut shape, built directly: re-validating our own answer on every
    # check-in costs more than the database work.
    out: dict[str, Any] = {
        "desired": answer.desired.to_json() if answer.desired is not None else None,
        "poll_interval_s": float(st.config.poll_interval_s),
    }
    if answer.shadow is not None:  # absent, not null: the common answer stays as small as before
        out["shadow"] = answer.shadow
    return JSONResponse(out)


def _store_events(st: AppState, device_id: str, token: str, events: list[EventIn]) -> int:
    reports = [hot_path.EventReport(e.type, e.state, e.detail) for e in events]
    with st.db.engine.begin() as conn:
        hot_path.authenticate(conn, device_id, queries.hash_secret(token))
        return hot_path.add_events(conn, device_id, reports)


@router.post(EVENTS_PATH, status_code=201, openapi_extra=_DEVICE_AUTH)
def report_event(device_id: DeviceId, body: EventIn, request: Request) -> dict[str, bool]:
    """Record one update-step event (download, verify, install, smoke test, commit, rollback)."""
    _store_events(app_state(request), device_id, bearer_token(request), [body])
    return {"stored": True}


@router.post(EVENTS_BATCH_PATH, status_code=201, openapi_extra=_DEVICE_AUTH)
def report_events(device_id: DeviceId, body: EventBatchIn, request: Request) -> dict[str, int]:
    """Record 1..MAX_EVENT_BATCH events at once, in the order given (one insert)."""
    st = app_state(request)
    return {"stored": _store_events(st, device_id, bearer_token(request), body.events)}

"""Device-facing routes: enrollment, check-in and event reports."""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from agent.protocol.api import CHECKIN_PATH, ENROLL_PATH, EVENTS_PATH, InstalledModel
from server import store
from server.api.deps import AppState, app_state, bearer_scheme, bearer_token
from server.api.schemas import (
    DEVICE_ID,
    CheckinIn,
    CheckinOut,
    DesiredOut,
    EnrollIn,
    EnrollOut,
    ErrorOut,
    EventIn,
    MqttOut,
)
from server.errors import ServerError

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (401, 403, 413, 422)
}
router = APIRouter(tags=["devices"], responses=_ERRORS)
DeviceId = Annotated[str, Path(pattern=DEVICE_ID)]
State = Annotated[AppState, Depends(app_state)]


@router.post(ENROLL_PATH, response_model=EnrollOut)
def enroll(body: EnrollIn, st: State) -> EnrollOut:
    """Trade an enrollment token for a device id, a device token and MQTT credentials.

    Enrolling the same hardware id again rotates every credential of the same device.
    """
    tags = store.check_tags(body.tags, st.config.max_tags)
    try:
        tuf_root = json.loads(st.repo.root_bytes())
    except (OSError, ValueError) as err:
        raise ServerError(f"TUF root metadata is unavailable: {err}") from err
    with st.db.session() as s:
        store.consume_enrollment_token(s, body.token, st.config.enrollment_tokens)
        creds = store.enroll_device(
            s,
            hardware_id=body.hardware_id,
            profile=body.profile,
            variant_preference=body.variant_preference,
            tags=tags,
            agent_version=body.agent_version,
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


@router.post(CHECKIN_PATH, response_model=CheckinOut, dependencies=[Depends(bearer_scheme)])
def checkin(device_id: DeviceId, body: CheckinIn, request: Request, st: State) -> CheckinOut:
    """Report state and the installed model; learn which signed target to run."""
    token = bearer_token(request)
    installed = (
        InstalledModel(**body.installed.model_dump()) if body.installed is not None else None
    )
    with st.db.session() as s:
        device = store.authenticate_device(s, device_id, token)
        store.record_checkin(s, device, body.state, installed, body.agent_version)
        desired = store.resolve_desired(s, device)
    return CheckinOut(
        desired=DesiredOut(**desired.to_json()) if desired is not None else None,
        poll_interval_s=st.config.poll_interval_s,
    )


@router.post(EVENTS_PATH, status_code=201, dependencies=[Depends(bearer_scheme)])
def report_event(
    device_id: DeviceId, body: EventIn, request: Request, st: State
) -> dict[str, bool]:
    """Record one update-step event (download, verify, install, smoke test, commit, rollback)."""
    token = bearer_token(request)
    with st.db.session() as s:
        store.authenticate_device(s, device_id, token)
        store.add_event(
            s, device_id, body.type, state=body.state, detail=body.detail, source="http"
        )
    return {"stored": True}

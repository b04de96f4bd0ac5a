"""Device credentials: rotation by the device, and operator approval of a re-enrollment.

``POST /api/v1/devices/{id}/credentials`` (the device's current token) answers with
a new device token and MQTT password; the old ones stop working at once. An
operator who must re-enroll a device that lost its token (a reflashed board)
opens a one-time window with ``POST /api/v1/devices/{id}/reenroll-approval``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from agent.protocol.api import CREDENTIALS_PATH
from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme, bearer_token
from server.api.rate_limit import rate_limits
from server.api.schemas import DEVICE_ID, ErrorOut, MqttOut
from server.db import device_credentials, queries

log = logging.getLogger(__name__)

DeviceId = Annotated[str, Path(pattern=DEVICE_ID)]
State = Annotated[AppState, Depends(app_state)]
_DEVICE_AUTH: dict[str, Any] = {"security": [{"HTTPBearer": []}]}
DEFAULT_APPROVAL_TTL_S = 3600.0

router = APIRouter(
    tags=["devices"], responses={c: {"model": ErrorOut} for c in (401, 403, 422, 429)}
)
operator_router = APIRouter(
    prefix="/api/v1",
    tags=["operator"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={c: {"model": ErrorOut} for c in (401, 403, 404, 422)},
)


class CredentialsOut(BaseModel):
    device_id: str
    device_token: str
    mqtt: MqttOut


class ApprovalIn(BaseModel):
    ttl_s: float = Field(
        DEFAULT_APPROVAL_TTL_S,
        gt=0,
        le=device_credentials.MAX_APPROVAL_TTL_S,
        description="how long the one-time re-enrollment window stays open",
    )


class ApprovalOut(BaseModel):
    device_id: str
    expires_at: datetime


@router.post(CREDENTIALS_PATH, response_model=CredentialsOut, openapi_extra=_DEVICE_AUTH)
def rotate_credentials(device_id: DeviceId, request: Request) -> CredentialsOut:
    """Trade the device's current token for a new device token and MQTT password.

    The old token answers 401 and the old MQTT password is refused from now on; an
    MQTT session already open stays up until it reconnects.
    """
    st = app_state(request)
    token_hash = queries.hash_secret(bearer_token(request))
    rate_limits(request).checkin.check(token_hash, "credential requests from this device")
    with st.db.session() as s:
        creds = device_credentials.rotate_credentials(s, device_id, token_hash)
    log.info("rotated the credentials of device %s", device_id)
    return CredentialsOut(
        device_id=creds.device_id,
        device_token=creds.device_token,
        mqtt=MqttOut.login(st.mqtt_public, creds.device_id, creds.mqtt_password),
    )


@operator_router.post("/devices/{device_id}/reenroll-approval", response_model=ApprovalOut)
def approve_reenroll(device_id: DeviceId, st: State, body: ApprovalIn | None = None) -> ApprovalOut:
    """Let the next ``replace`` enrollment of this device's hardware id through without its
    device token, once, within ``ttl_s`` (default an hour)."""
    ttl = body.ttl_s if body is not None else DEFAULT_APPROVAL_TTL_S
    with st.db.session() as s:
        approval = device_credentials.approve_reenroll(s, device_id, ttl)
    log.info("re-enrollment of device %s approved until %s", device_id, approval.expires_at)
    return ApprovalOut(device_id=approval.device_id, expires_at=approval.expires_at)

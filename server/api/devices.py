"""Device-facing routes: enrollment, check-in and event reports.

Check-ins and events are the fleet's steady load: they run on ``server.db.hot_path``
(SQLAlchemy Core, one connection and one transaction each), not on ORM sessions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from agent.protocol.api import (
    CHECKIN_PATH,
    ENROLL_PATH,
    EVENTS_BATCH_PATH,
    EVENTS_PATH,
    InstalledModel,
)
from server.api.deps import AppState, app_state, bearer_token
from server.api.rate_limit import rate_limits
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
from server.db import device_credentials, hot_path, queries
from server.errors import ServerError

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (401, 403, 409, 413, 422, 429)
}
router = APIRouter(tags=["devices"], responses=_ERRORS)
DeviceId = Annotated[str, Path(pattern=DEVICE_ID)]
State = Annotated[AppState, Depends(app_state)]


@router.post(
    ENROLL_PATH,
    response_model=EnrollOut,
    openapi_extra={"security": [{}, {"HTTPBearer": []}]},  # the bearer is optional
)
def enroll(body: EnrollIn, request: Request) -> EnrollOut:
    """Trade an enrollment token for a device id, a device token and MQTT credentials.

    An enrolled hardware id is refused (409) unless ``replace`` is true: then the same
    device keeps its id and gets new credentials (the old ones stop working), profile
    and tags. Taking a device over needs proof that the caller is that device: its
    current device token as ``Authorization: Bearer``, or an operator's one-time
    approval (``POST /api/v1/devices/{id}/reenroll-approval``); else 409.
    """
    st = app_state(request)
    rate_limits(request).enroll.check(
        queries.hash_secret(body.token), "enrollments with this token"
    )
    tags = queries.check_tags(body.tags, st.config.max_tags)
    proof = (
        queries.hash_secret(bearer_token(request)) if "authorization" in request.headers else None
    )
    try:
        tuf_root = json.loads(st.repo.root_bytes())
    except (OSError, ValueError) as err:
        raise ServerError(f"TUF root metadata is unavailable: {err}") from err
    with st.db.session() as s:
        queries.consume_enrollment_token(s, body.token, st.config.enrollment_tokens)
        device_credentials.admit_reenroll(s, body.hardware_id, proof, replace=body.replace)
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
    return EnrollOut(
        device_id=creds.device_id,
        device_token=creds.device_token,
        mqtt=MqttOut.login(st.mqtt_public, creds.device_id, creds.mqtt_password),
        tuf_root=tuf_root,
        tuf_url=st.config.targets_url,
    )


# The bearer scheme is declared for the OpenAPI document only: a dependency per request
# costs more on the hot device routes than the check itself (``bearer_token``).
_DEVICE_AUTH: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not Modified: the answer is the one whose ETag was sent"}
}


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison against an ``If-None-Match`` list (or ``*``)."""
    if if_none_match == etag:  # the agent's case: exactly the ETag it was given
        return True
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _conditional(out: dict[str, Any], if_none_match: str | None) -> Response:
    """The answer with its ETag, or an empty 304 when the device already holds it.

    The canonical JSON (sorted keys, no spaces) is both the body and what is hashed,
    so the answer is serialised once and equal answers have equal ETags on every replica.
    """
    body = json.dumps(out, sort_keys=True, separators=(",", ":")).encode()
    headers = {"ETag": f'"{hashlib.sha256(body).hexdigest()[:32]}"'}
    if if_none_match is not None and _etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.post(
    CHECKIN_PATH, response_model=CheckinOut, openapi_extra=_DEVICE_AUTH, responses=_NOT_MODIFIED
)
def checkin(device_id: DeviceId, body: CheckinIn, request: Request) -> Response:
    """Report state and the installed model; learn which signed target to run.

    Conditional: with ``If-None-Match`` holding the ETag of the current answer, a 304
    without a body (the check-in is recorded all the same).
    """
    st = app_state(request)
    token_hash = queries.hash_secret(bearer_token(request))
    rate_limits(request).checkin.check(token_hash, "check-ins from this device")
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
    return _conditional(out, request.headers.get("if-none-match"))


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

"""Who may take over an enrolled device, operator approvals, and credential rotation.

A multi-use enrollment token plus a device's hardware id (often printed on the
box) must not be enough to re-key that device and lock the real one out. A
re-enrollment with ``replace`` is admitted only with proof: the device's current
token, or an operator's one-time approval (``reenroll_approvals``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from server.db.queries import (
    Credentials,
    add_event,
    get_device,
    hash_secret,
    mosquitto_hash,
    new_secret,
)
from server.db.tables import Device, ReenrollApproval, as_utc, utcnow
from server.errors import AuthError, ConflictError, ForbiddenError, InvalidInputError

MAX_APPROVAL_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Approval:
    device_id: str
    expires_at: datetime


def admit_reenroll(
    s: Session, hardware_id: str, proof_token_hash: str | None, *, replace: bool
) -> None:
    """Check that a ``replace`` enrollment of an enrolled ``hardware_id`` is entitled to it.

    Proof is the device's current token (its digest, from the request's bearer
    header) or an unexpired operator approval, which this consumes. Anything else
    is a ConflictError naming both ways. A new hardware id, or no ``replace`` (the
    plain "already enrolled" refusal comes later), passes. The device row is
    locked so two re-enrollments cannot both use the same proof.
    """
    if not replace:
        return
    query = select(Device).where(Device.hardware_id == hardware_id).with_for_update()
    device = s.scalars(query).one_or_none()
    if device is None:
        return
    if proof_token_hash is not None and hmac.compare_digest(
        proof_token_hash.encode(), device.token_hash.encode()
    ):
        return
    if _consume_approval(s, device.id):
        add_event(s, device.id, "reenroll_approval_used", source="http")
        return
    wrong = (
        f"the bearer token is not {device.id}'s current device token; "
        if proof_token_hash is not None
        else ""
    )
    # Short enough to survive the agent's 300-character error excerpt whole.
    raise ConflictError(
        f"{wrong}this hardware id is enrolled as {device.id}; taking it over needs its current "
        f"device token as Authorization: Bearer (edgefleet-agent sends its own) or an "
        f"operator's approval: edgefleet device approve-reenroll {device.id}"
    )


def _consume_approval(s: Session, device_id: str) -> bool:
    """Delete the device's unexpired approval; whether there was one. One DELETE, so two
    concurrent enrollments cannot both use it (PostgreSQL: the second finds no row)."""
    gone = s.execute(
        delete(ReenrollApproval)
        .where(ReenrollApproval.device_id == device_id, ReenrollApproval.expires_at > utcnow())
        .returning(ReenrollApproval.device_id)
    ).all()
    return bool(gone)


def approve_reenroll(s: Session, device_id: str, ttl_s: float) -> Approval:
    """Open (or reopen) a one-time window in which ``device_id`` may be re-enrolled."""
    if not 0 < ttl_s <= MAX_APPROVAL_TTL_S:
        raise InvalidInputError(f"ttl must be within (0, {MAX_APPROVAL_TTL_S:.0f}] seconds")
    get_device(s, device_id)  # NotFoundError
    now = utcnow()
    row = s.get(ReenrollApproval, device_id, with_for_update=True)
    if row is None:
        row = ReenrollApproval(device_id=device_id, created_at=now, expires_at=now)
        s.add(row)
    row.created_at, row.expires_at = now, now + timedelta(seconds=ttl_s)
    add_event(s, device_id, "reenroll_approved", source="http")
    s.flush()
    expires = as_utc(row.expires_at)
    assert expires is not None
    return Approval(device_id, expires)


def rotate_credentials(s: Session, device_id: str, token_hash: str) -> Credentials:
    """New device token and MQTT password for the device that presents its current token.

    The old ones stop working when this commits: HTTP and MQTT logins check the
    stored digests. AuthError for an unknown token, ForbiddenError for another
    device's.
    """
    query = select(Device).where(Device.token_hash == token_hash).with_for_update()
    device = s.scalars(query).one_or_none()
    if device is None:
        raise AuthError("device token is invalid")
    if not hmac.compare_digest(device.id.encode(), device_id.encode()):
        raise ForbiddenError("this device token belongs to another device")
    token, mqtt_password = new_secret(), new_secret()
    device.token_hash = hash_secret(token)
    device.mqtt_password_hash = mosquitto_hash(mqtt_password)
    add_event(s, device.id, "credentials_rotated", source="http")
    s.flush()
    return Credentials(device.id, token, mqtt_password, reenrolled=False)

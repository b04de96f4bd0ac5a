"""Data access: every query the server runs, as functions over a SQLAlchemy session.

No HTTP and no MQTT here; callers open the session (``Database.session()``),
which commits on success. Secrets are random 32-byte tokens stored only as
digests: device tokens as sha256 hex, MQTT passwords in Mosquitto's ``$7$``
PBKDF2 format (so an external Mosquitto can be given the same credentials);
both are compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol.api import DesiredTarget, InstalledModel
from agent.protocol.manifest import ModelManifest, model_target_path
from server.db import hot_path
from server.db.tables import (
    Assignment,
    Device,
    DeviceTag,
    EnrollmentToken,
    Event,
    Model,
    ShadowAssignment,
    TelemetryLatest,
    as_utc,
    utcnow,
)
from server.errors import AuthError, ConflictError, InvalidInputError, NotFoundError
from server.telemetry.bandwidth import record_download

TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TAG_VALUE = re.compile(r"^[\w.:/@+-]{1,128}$")
MOSQUITTO_ITERATIONS = 101  # mosquitto_passwd's default
_MAX_PBKDF2_ITERATIONS = 1_000_000


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` PBKDF2-SHA512 format, so a Mosquitto password file can be exported."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_ITERATIONS, 64)
    b64 = base64.b64encode
    return f"$7${MOSQUITTO_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def mosquitto_verify(password: str, stored: str) -> bool:
    parts = stored.split("$")  # "", "7", iterations, salt, digest
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except (ValueError, binascii.Error):
        return False
    if not 1 <= iterations <= _MAX_PBKDF2_ITERATIONS or not expected:
        return False
    actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(actual, expected)


def parse_tag(selector: str) -> tuple[str, str]:
    """``"store=17"`` -> ``("store", "17")``, or a clear InvalidInputError."""
    key, sep, value = selector.partition("=")
    if not sep or not TAG_KEY.match(key) or not TAG_VALUE.match(value):
        raise InvalidInputError(
            f"tag selector {selector[:80]!r} must look like key=value "
            f"(key {TAG_KEY.pattern}, value {TAG_VALUE.pattern})"
        )
    return key, value


def check_tags(tags: dict[str, str], max_tags: int) -> dict[str, str]:
    if len(tags) > max_tags:
        raise InvalidInputError(f"at most {max_tags} tags are allowed, got {len(tags)}")
    for key, value in tags.items():
        parse_tag(f"{key}={value}")
    return tags


# --- enrollment and credentials ---------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    device_id: str
    device_token: str
    mqtt_password: str
    reenrolled: bool


def create_enrollment_token(
    s: Session, max_uses: int | None, expires_in_s: float | None, note: str
) -> tuple[str, EnrollmentToken]:
    token = new_secret()
    now = utcnow()
    row = EnrollmentToken(
        token_hash=hash_secret(token),
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s else None,
        max_uses=max_uses,
        uses=0,
        note=note,
    )
    s.add(row)
    s.flush()
    return token, row


def consume_enrollment_token(s: Session, token: str, static_tokens: Iterable[str]) -> None:
    """Accept a configured token or a stored, unexpired one with uses left (counting this use)."""
    if any(hmac.compare_digest(token.encode(), t.encode()) for t in static_tokens):
        return
    row = s.get(EnrollmentToken, hash_secret(token), with_for_update=True)
    expires = as_utc(row.expires_at) if row else None
    if (
        row is None
        or (expires is not None and expires <= utcnow())
        or (row.max_uses is not None and row.uses >= row.max_uses)
    ):
        raise AuthError("enrollment token is invalid, expired or used up")
    row.uses += 1


def enroll_device(
    s: Session,
    *,
    hardware_id: str,
    profile: str,
    variant_preference: Sequence[str],
    tags: dict[str, str],
    agent_version: str,
    replace: bool = False,
) -> Credentials:
    """Create the device; with ``replace``, take over the one with this hardware id instead
    (same id, every credential rotated, profile and tags overwritten)."""
    token, mqtt_password = new_secret(), new_secret()
    device = s.scalars(select(Device).where(Device.hardware_id == hardware_id)).one_or_none()
    reenrolled = device is not None
    if device is not None and not replace:
        # Two agents on one host share a hardware id: the second must not silently
        # take over the first's record.
        raise ConflictError(
            f"hardware id {hardware_id!r} is already enrolled as {device.id} "
            f"(profile {device.profile}); enroll with --replace to take over that device, "
            f"or give this agent its own --hardware-id"
        )
    if device is None:
        device = Device(
            id=f"dev-{secrets.token_hex(8)}", hardware_id=hardware_id, created_at=utcnow()
        )
        s.add(device)
    device.profile = profile
    device.variant_preference = list(variant_preference)
    device.tags = dict(tags)
    device.token_hash = hash_secret(token)
    device.mqtt_password_hash = mosquitto_hash(mqtt_password)
    device.agent_version = agent_version
    device.state = "enrolled"
    device.last_seen = utcnow()
    try:
        s.flush()
    except IntegrityError as err:
        raise ConflictError(f"hardware id {hardware_id!r} is enrolling concurrently") from err
    s.execute(delete(DeviceTag).where(DeviceTag.device_id == device.id))
    s.add_all(DeviceTag(device_id=device.id, key=k, value=v) for k, v in tags.items())
    add_event(s, device.id, "reenrolled" if reenrolled else "enrolled", source="http")
    return Credentials(device.id, token, mqtt_password, reenrolled)


def check_mqtt_password(s: Session, device_id: str, password: str) -> bool:
    stored = s.scalar(select(Device.mqtt_password_hash).where(Device.id == device_id))
    return stored is not None and mosquitto_verify(password, stored)


# --- check-in and events ---------------------------------------------------------------


def record_checkin(
    s: Session, device: Device, state: str, installed: InstalledModel | None, agent_version: str
) -> None:
    device.state = state
    device.agent_version = agent_version
    device.last_seen = utcnow()
    device.installed_name = installed.name if installed else None
    device.installed_release = installed.release if installed else None
    device.installed_variant = installed.variant if installed else None
    device.installed_sha256 = installed.sha256 if installed else None
    device.installed_slot = installed.slot if installed else None


def add_event(
    s: Session,
    device_id: str,
    type_: str,
    *,
    state: str | None = None,
    detail: dict[str, Any] | None = None,
    source: str,
) -> None:
    s.add(
        Event(
            device_id=device_id,
            time=utcnow(),
            type=type_,
            state=state,
            source=source,
            detail=detail or {},
        )
    )
    if type_ == "download":
        record_download(s, device_id, detail)


def resolve_desired(s: Session, device: Device) -> DesiredTarget | None:
    """Newest device assignment, else newest assignment to one of its tags; then the variant.

    The same query as the check-in's (``hot_path.resolve``), so both always agree.
    """
    s.flush()
    return hot_path.resolve(
        s.connection(), device.id, device.tags, device.variant_preference, device.profile
    )


# --- operator views ----------------------------------------------------------------------


def list_devices(
    s: Session, tag: tuple[str, str] | None = None, limit: int = 1000, offset: int = 0
) -> list[Device]:
    query = select(Device).order_by(Device.created_at, Device.id).limit(limit).offset(offset)
    if tag is not None:
        query = query.join(DeviceTag).where(DeviceTag.key == tag[0], DeviceTag.value == tag[1])
    return list(s.scalars(query))


def get_device(s: Session, device_id: str) -> Device:
    device = s.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device


def delete_device(s: Session, device_id: str) -> Device:
    """Remove a device: its token and MQTT password go with its row; tags, events, telemetry
    and rollout facts cascade; its own assignments and shadow candidate are removed here.

    Download accounting is kept: those bytes were spent, and bandwidth totals must not shrink.
    """
    device = get_device(s, device_id)
    s.execute(
        delete(Assignment).where(
            Assignment.target_kind == "device", Assignment.target_value == device_id
        )
    )
    s.execute(delete(ShadowAssignment).where(ShadowAssignment.device_id == device_id))
    s.delete(device)
    s.flush()
    return device


def recent_events(s: Session, device_id: str, limit: int) -> list[Event]:
    query = select(Event).where(Event.device_id == device_id).order_by(Event.id.desc()).limit(limit)
    return list(s.scalars(query))


def latest_telemetry(s: Session, device_id: str) -> list[TelemetryLatest]:
    query = select(TelemetryLatest).where(TelemetryLatest.device_id == device_id)
    return list(s.scalars(query.order_by(TelemetryLatest.channel)))


def model_exists(s: Session, name: str, release: int, variant: str | None = None) -> bool:
    query = select(func.count()).select_from(Model)
    query = query.where(Model.name == name, Model.release == release)
    if variant is not None:
        query = query.where(Model.variant == variant)
    return bool(s.scalar(query))


def add_model(s: Session, manifest: ModelManifest) -> Model:
    row = Model(
        name=manifest.name,
        release=manifest.release,
        variant=manifest.variant,
        sha256=manifest.sha256,
        length=manifest.length,
        target_path=model_target_path(manifest.name, manifest.release, manifest.variant),
        fp32_length=manifest.fp32_length,
        labels=list(manifest.labels),
        manifest=manifest.to_custom(),
        created_at=utcnow(),
    )
    s.add(row)
    try:
        s.flush()
    except IntegrityError as err:
        raise ConflictError(
            f"model {manifest.name} release {manifest.release} variant {manifest.variant} "
            "is already published"
        ) from err
    return row


def list_models(s: Session, name: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.name, Model.release, Model.variant)
    if name is not None:
        query = query.where(Model.name == name)
    return list(s.scalars(query))


def release_variants(s: Session, name: str, release: int) -> list[Model]:
    """The published variants of one release, by variant name."""
    query = select(Model).where(Model.name == name, Model.release == release)
    return list(s.scalars(query.order_by(Model.variant)))


def create_assignment(
    s: Session, name: str, release: int, device_id: str | None, tag: str | None
) -> Assignment:
    if (device_id is None) == (tag is None):
        raise InvalidInputError("give exactly one of device_id or tag")
    if not model_exists(s, name, release):
        raise NotFoundError(f"no published release {name}@{release}")
    if device_id is not None:
        get_device(s, device_id)
        kind, value = "device", device_id
    else:
        assert tag is not None
        key, val = parse_tag(tag)
        kind, value = "tag", f"{key}={val}"
    row = Assignment(
        target_kind=kind, target_value=value, name=name, release=release, created_at=utcnow()
    )
    s.add(row)
    s.flush()
    return row


# --- telemetry ------------------------------------------------------------------------------


def _upsert_latest(s: Session, values: dict[str, Any]) -> None:
    dialect = s.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(TelemetryLatest).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["device_id", "channel"],
        set_={"received_at": stmt.excluded.received_at, "payload": stmt.excluded.payload},
    )
    s.execute(stmt)


def store_telemetry(
    s: Session, device_id: str, channel: str, payload: dict[str, Any], now: datetime | None = None
) -> bool:
    """Keep the newest payload per device and channel; False when the device is unknown."""
    now = now or utcnow()
    result = s.execute(update(Device).where(Device.id == device_id).values(last_seen=now))
    if not result.rowcount:  # type: ignore[attr-defined]  # a CursorResult for UPDATE
        return False
    _upsert_latest(
        s, {"device_id": device_id, "channel": channel, "received_at": now, "payload": payload}
    )
    if channel == "events":
        type_ = payload.get("type")
        state = payload.get("state")
        add_event(
            s,
            device_id,
            type_[:64] if isinstance(type_, str) and type_ else "mqtt",
            state=state[:32] if isinstance(state, str) else None,
            detail=payload,
            source="mqtt",
        )
    return True

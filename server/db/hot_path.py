"""The device-facing hot paths (check-in, event reports) in SQLAlchemy Core.

Every device checks in once a poll interval (a 60 s poll from 65,000 devices is
about 1,100 check-ins a second; with pushes, ``server.push``, the 900 s fallback
poll is about 72 a second, plus one per pushed device). A check-in is one transaction
on one connection with two statements: an ``UPDATE ... RETURNING`` that both
authenticates (token digest and device id in its WHERE) and records the
check-in, then one ``SELECT`` that finds the assignment and the published
variants of its release together. Only a failed check-in pays a third query, to
tell an unknown token (401) from another device's token (403).

A third statement reads the device's shadow assignment by primary key (a
candidate to run beside its model during a rollout's shadow phase), with the
variants that release publishes, so the device gets the variant it would install.

Callers pass the token's digest (``store.hash_secret``), not the token: only
digests are stored, and a lookup by digest reveals nothing about the secret.
``store.resolve_desired`` (the operator's view) uses the same resolution, so a
device and its operator always see the same target.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    insert,
    literal_column,
    select,
    union_all,
)
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from agent.protocol.api import DesiredTarget, InstalledModel
from agent.protocol.manifest import model_target_path
from server.db.tables import (
    Assignment,
    Base,
    Device,
    Event,
    Model,
    RolloutVariant,
    ShadowAssignment,
    utcnow,
)
from server.errors import AuthError, ForbiddenError
from server.telemetry.bandwidth import record_download


def _table(model: type[Base]) -> Table:
    table = model.__table__
    if not isinstance(table, Table):  # every model in server.db.tables maps one plain table
        raise TypeError(f"{model.__name__} is not mapped to a table")
    return table


DEVICES = _table(Device)
ASSIGNMENTS = _table(Assignment)
MODELS = _table(Model)
EVENTS = _table(Event)
SHADOWS = _table(ShadowAssignment)
FORCED = _table(RolloutVariant)

_CHECKIN_COLUMNS = (
    "state",
    "agent_version",
    "last_seen",
    "installed_name",
    "installed_release",
    "installed_variant",
    "installed_sha256",
    "installed_slot",
)
_INVALID = "device token is invalid"
_OTHER_DEVICE = "this device token belongs to another device"


@dataclass(frozen=True)
class EventReport:
    """One update-step event as a device reports it."""

    type: str
    state: str | None
    detail: dict[str, Any]


def _newest(priority: int, *where: Any) -> Select[Any]:
    """The newest assignment matching ``where`` with its release's published variants.

    An outer join: an assignment whose release has no variant still decides
    (and yields no target), exactly as when it is looked up on its own.
    """
    a = ASSIGNMENTS.c
    newest = (
        select(
            literal_column(str(priority), Integer).label("priority"),
            a.name,
            a.release,
            a.rollout_id,
        )
        .where(*where)
        .order_by(a.id.desc())
        .limit(1)
        .subquery()
    )
    m, f = MODELS.c, FORCED.c
    joined = newest.outerjoin(
        MODELS, and_(m.name == newest.c.name, m.release == newest.c.release)
    ).outerjoin(
        FORCED, and_(f.rollout_id == newest.c.rollout_id, f.profile == bindparam("profile"))
    )
    return select(
        newest.c.priority, newest.c.name, newest.c.release, m.variant, f.variant.label("forced")
    ).select_from(joined)


# Built once: building and cache-keying a statement per request costs more than running it.
_OWNER = select(DEVICES.c.id).where(DEVICES.c.token_hash == bindparam("digest"))
_CHECKIN = (
    sql_update(DEVICES)
    .where(DEVICES.c.token_hash == bindparam("digest"), DEVICES.c.id == bindparam("device"))
    .values({name: bindparam(f"new_{name}") for name in _CHECKIN_COLUMNS})
    .returning(DEVICES.c.tags, DEVICES.c.variant_preference, DEVICES.c.profile)
)
_BY_DEVICE = _newest(
    0, ASSIGNMENTS.c.target_kind == "device", ASSIGNMENTS.c.target_value == bindparam("device")
)
_BY_DEVICE_OR_TAG = union_all(
    _BY_DEVICE,
    _newest(
        1,
        ASSIGNMENTS.c.target_kind == "tag",
        ASSIGNMENTS.c.target_value.in_(bindparam("selectors", expanding=True)),
    ),
)
_ADD_EVENT = insert(EVENTS)
_SHADOW = (
    select(SHADOWS, MODELS.c.variant, FORCED.c.variant.label("forced"))
    .select_from(
        SHADOWS.outerjoin(
            MODELS, and_(MODELS.c.name == SHADOWS.c.name, MODELS.c.release == SHADOWS.c.release)
        ).outerjoin(
            FORCED,
            and_(
                FORCED.c.rollout_id == SHADOWS.c.rollout_id,
                FORCED.c.profile == bindparam("profile"),
            ),
        )
    )
    .where(SHADOWS.c.device_id == bindparam("device"))
)


@dataclass(frozen=True)
class CheckinAnswer:
    desired: DesiredTarget | None
    shadow: dict[str, Any] | None  # the wire form of ``agent.protocol.api.ShadowTarget``


def _refusal(conn: Connection, device_id: str, token_hash: str) -> AuthError | ForbiddenError:
    """Why ``token_hash`` does not open ``device_id``: unknown (401) or another device's (403)."""
    owner = conn.scalar(_OWNER, {"digest": token_hash})
    # A token re-keyed between our two statements is simply no longer valid.
    if owner is None or hmac.compare_digest(owner.encode(), device_id.encode()):
        return AuthError(_INVALID)
    return ForbiddenError(_OTHER_DEVICE)


def authenticate(conn: Connection, device_id: str, token_hash: str) -> None:
    """One indexed lookup; AuthError (401) for an unknown token, ForbiddenError (403)
    when the token belongs to another device."""
    owner = conn.scalar(_OWNER, {"digest": token_hash})
    if owner is None:
        raise AuthError(_INVALID)
    if not hmac.compare_digest(owner.encode(), device_id.encode()):
        raise ForbiddenError(_OTHER_DEVICE)


def checkin(
    conn: Connection,
    device_id: str,
    token_hash: str,
    *,
    state: str,
    installed: InstalledModel | None,
    agent_version: str,
) -> CheckinAnswer:
    """Authenticate, record the check-in, resolve the desired target and the shadow."""
    values = {
        "state": state,
        "agent_version": agent_version,
        "last_seen": utcnow(),
        "installed_name": installed.name if installed else None,
        "installed_release": installed.release if installed else None,
        "installed_variant": installed.variant if installed else None,
        "installed_sha256": installed.sha256 if installed else None,
        "installed_slot": installed.slot if installed else None,
    }
    params = {f"new_{k}": v for k, v in values.items()}
    row = conn.execute(_CHECKIN, {"digest": token_hash, "device": device_id, **params}).first()
    if row is None:
        raise _refusal(conn, device_id, token_hash)
    tags, preference, profile = row
    desired = resolve(conn, device_id, tags, preference, profile)
    return CheckinAnswer(desired, shadow_of(conn, device_id, preference, installed, profile))


def shadow_of(
    conn: Connection,
    device_id: str,
    preference: Sequence[str],
    installed: InstalledModel | None = None,
    profile: str = "",
) -> dict[str, Any] | None:
    """The candidate this device should shadow, in the variant it would install; None
    when there is none, no variant fits, or it already runs that release."""
    rows = conn.execute(_SHADOW, {"device": device_id, "profile": profile}).all()
    if not rows:
        return None
    first = rows[0]
    if installed is not None and (installed.name, installed.release) == (first.name, first.release):
        return None
    published = {r.variant for r in rows if r.variant}
    order = [first.forced] if first.forced is not None else preference
    variant = next((v for v in order if v in published), None)
    if variant is None:
        return None
    return {
        "rollout_id": first.rollout_id,
        "target_path": model_target_path(first.name, first.release, variant),
        "name": first.name,
        "release": first.release,
        "variant": variant,
        "every_n": first.every_n,
        "cpu_budget": first.cpu_budget,
    }


def resolve(
    conn: Connection,
    device_id: str,
    tags: dict[str, str],
    preference: Sequence[str],
    profile: str = "",
) -> DesiredTarget | None:
    """Newest device assignment, else newest assignment to one of its tags; then the
    variant its rollout set for the device's profile, else the first variant of
    ``preference`` that release publishes. One SELECT."""
    selectors = [f"{k}={v}" for k, v in tags.items()]
    params = {"device": device_id, "profile": profile}
    if selectors:
        rows = conn.execute(_BY_DEVICE_OR_TAG, {**params, "selectors": selectors})
    else:
        rows = conn.execute(_BY_DEVICE, params)
    chosen = sorted(rows, key=lambda r: int(r.priority))
    if not chosen:
        return None
    name, release = chosen[0].name, chosen[0].release
    published = {r.variant for r in chosen if r.priority == chosen[0].priority and r.variant}
    forced = chosen[0].forced
    for variant in [forced] if forced is not None else preference:
        if variant in published:
            return DesiredTarget(
                target_path=model_target_path(name, release, variant),
                name=name,
                release=release,
                variant=variant,
            )
    return None


def add_events(
    conn: Connection, device_id: str, events: Sequence[EventReport], source: str = "http"
) -> int:
    """Store ``events`` in one multi-row INSERT, in order (ascending ids: the rollout
    engine folds events by id), and bookkeep every ``download`` report."""
    if not events:
        return 0
    now = utcnow()
    rows = [
        {
            "device_id": device_id,
            "time": now,
            "type": e.type,
            "state": e.state,
            "source": source,
            "detail": e.detail or {},
        }
        for e in events
    ]
    conn.execute(_ADD_EVENT, rows)  # executemany: rows are inserted in list order
    downloads = [e for e in events if e.type == "download"]
    if downloads:
        # A session joined to this connection's transaction: its writes commit with ours.
        with Session(bind=conn) as s:
            for e in downloads:
                record_download(s, device_id, e.detail)
    return len(rows)

"""Operator actions on rollouts: create, start, pause, resume, approve, abort, revert.

Every action goes through the one transition table (``apply_action``), under
the rollout's lock, and leaves a history row. Starting selects the devices,
refuses devices held by another active rollout (409), places them in stable,
spread cohorts and stores one ``rollout_devices`` row each; the scheduler
then tells them to install stage by stage. Revert points every device the
rollout touched back at the release it ran before, provided that release is
still a signed TUF target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from agent.protocol.manifest import model_target_path, release_target_prefix
from server.db import queries
from server.db.tables import Assignment, Database, Device, Event, RolloutVariant, utcnow
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.push import queue as push_queue
from server.rollout.core.cohorts import assign_cohorts
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import (
    Action,
    DeviceFacts,
    RolloutStatus,
    apply_action,
    next_state,
)
from server.rollout.service.records import (
    holders,
    lock_starts,
    locked_rollout,
    new_rollout_id,
    set_status,
    spec_of,
    start_guard,
    status_of,
)
from server.rollout.service.settings import DEFAULT_CONFIG, ServiceConfig
from server.rollout.service.tables import Rollout, RolloutDevice, RolloutHistory


class TargetSource(Protocol):
    """What revert needs of the TUF repository (``TufRepository`` fits)."""

    def targets(self) -> Mapping[str, Any]: ...


class RevertRefusedError(ConflictError):
    """The release devices would go back to is no longer a valid signed target."""


@dataclass(frozen=True)
class ActionResult:
    rollout_id: str
    action: str
    state: str
    stage_index: int
    reason: str
    devices: int  # selected (create/start) or told to go back (revert)
    skipped: tuple[str, ...] = ()  # revert: touched devices with no previous release


Selected = list[tuple[str, str, dict[str, str]]]  # (device id, profile, tags)


def check_release(s: Session, spec: RolloutSpec) -> None:
    name, release = spec.release.name, spec.release.release
    if not queries.model_exists(s, name, release):
        raise NotFoundError(f"no published release {spec.release}: publish it before rolling out")
    for profile, variant in spec.variants:
        if not queries.model_exists(s, name, release, variant):
            raise NotFoundError(
                f"release {spec.release} has no {variant} variant (asked for profile {profile})"
            )


def select_devices(s: Session, spec: RolloutSpec, cfg: ServiceConfig) -> Selected:
    sel = spec.selector
    rows = s.execute(select(Device.id, Device.profile, Device.tags).order_by(Device.id)).all()
    selected = [(d, p, t or {}) for d, p, t in rows if sel.matches(d, p, t or {})]
    if sel.devices:
        known = {d for d, _, _ in rows}
        missing = [d for d in sel.devices if d not in known]
        if missing:
            shown = ", ".join(missing[: cfg.max_overlap_listed])
            raise NotFoundError(f"{len(missing)} listed devices are not enrolled: {shown}")
    if not selected:
        raise InvalidInputError("the selector matches no enrolled devices")
    return selected


def check_overlap(s: Session, selected: Selected, cfg: ServiceConfig) -> None:
    held = holders(s, [d for d, _, _ in selected])
    if held:
        rollouts = ", ".join(sorted(set(held.values())))
        shown = ", ".join(sorted(held)[: cfg.max_overlap_listed])
        raise ConflictError(
            f"{len(held)} of the {len(selected)} selected devices are already in active "
            f"rollout {rollouts} (e.g. {shown}); a device may be in only one running, paused "
            "or awaiting-approval rollout: finish, abort or revert that one first"
        )


def _history(s: Session, row: Rollout, trigger: str, now: datetime, reason: str) -> None:
    s.add(
        RolloutHistory(
            rollout_id=row.id,
            time=now,
            actor="operator",
            trigger=trigger,
            from_state=row.state,
            to_state=row.state,
            from_stage=row.stage_index,
            to_stage=row.stage_index,
            reason=reason,
        )
    )


def _start(
    s: Session,
    row: Rollout,
    *,
    spec: RolloutSpec,
    selected: Selected,
    now: datetime,
    cfg: ServiceConfig,
) -> None:
    status = apply_action(status_of(row), Action.START, now, len(spec.stages))
    members = [DeviceFacts(device_id=d, profile=p, tags=t) for d, p, t in selected]
    slots = assign_cohorts(row.id, members, spec.stages, cfg.cohorts)
    rows = [
        {
            "rollout_id": row.id,
            "device_id": device_id,
            "stage": slot.stage,
            "rank": slot.rank,
            "status": "pending",
            "last_event_id": 0,
        }
        for device_id, slot in slots.items()
    ]
    for at in range(0, len(rows), cfg.insert_chunk):
        s.execute(insert(RolloutDevice), rows[at : at + cfg.insert_chunk])
    if spec.variants:  # the check-in serves these instead of each device's own first choice
        s.execute(
            insert(RolloutVariant),
            [{"rollout_id": row.id, "profile": p, "variant": v} for p, v in spec.variants],
        )
    row.devices = len(rows)
    # Reports from before the start are not about this rollout.
    row.event_cursor = int(s.scalar(select(func.max(Event.id))) or 0)
    status = dataclasses.replace(
        status, reason=f"started by operator: {len(rows)} devices in {len(spec.stages)} stages"
    )
    set_status(
        s,
        row,
        status,
        now,
        actor="operator",
        trigger=Action.START.value,
        devices=len(rows),
        cfg=cfg,
    )


def create_rollout(
    db: Database,
    spec: RolloutSpec,
    *,
    start: bool = False,
    cfg: ServiceConfig = DEFAULT_CONFIG,
    now: datetime | None = None,
) -> ActionResult:
    """Store a new rollout (a draft, or started at once with ``start``)."""
    now = now or utcnow()
    with start_guard(db), db.session() as s:
        check_release(s, spec)
        if start:
            lock_starts(s, cfg)
        selected = select_devices(s, spec, cfg)
        check_overlap(s, selected, cfg)
        draft = RolloutStatus(reason="created")
        row = Rollout(
            id=new_rollout_id(),
            name=spec.release.name,
            release=spec.release.release,
            spec=spec.to_json(),
            status=draft.to_json(),
            state=draft.state.value,
            stage_index=0,
            devices=0,
            event_cursor=0,
            created_at=now,
            updated_at=now,
        )
        s.add(row)
        s.flush()
        _history(
            s, row, "create", now, f"created for {spec.release}, {len(selected)} devices match now"
        )
        if start:
            _start(s, row, spec=spec, selected=selected, now=now, cfg=cfg)
        return _result(row, "create", len(selected))


def _result(row: Rollout, action: str, devices: int, skipped: tuple[str, ...] = ()) -> ActionResult:
    return ActionResult(
        row.id,
        action,
        row.state,
        row.stage_index,
        str(row.status.get("reason", "")),
        devices,
        skipped,
    )


def perform(
    db: Database,
    rollout_id: str,
    action: Action,
    *,
    repo: TargetSource | None = None,
    cfg: ServiceConfig = DEFAULT_CONFIG,
    now: datetime | None = None,
) -> ActionResult:
    """Apply an operator action; TransitionError (409) when the state does not allow it."""
    now = now or utcnow()
    try:
        if action is Action.REVERT:
            if repo is None:
                raise ValueError("revert needs the TUF repository")
            return _revert(db, rollout_id, repo, now, cfg)
        return _act(db, rollout_id, action, now, cfg)
    except StaleDataError as err:  # the version check: someone else wrote first
        raise ConflictError(f"rollout {rollout_id} changed meanwhile; try again") from err


def _act(
    db: Database, rollout_id: str, action: Action, now: datetime, cfg: ServiceConfig
) -> ActionResult:
    with start_guard(db), locked_rollout(db, rollout_id, wait=True) as got:
        assert got is not None  # wait=True raises NotFoundError instead
        s, row = got
        status, spec = status_of(row), spec_of(row)
        if action is Action.START:
            next_state(status.state, action)  # refuse before selecting anything
            lock_starts(s, cfg)
            check_release(s, spec)
            selected = select_devices(s, spec, cfg)
            check_overlap(s, selected, cfg)
            _start(s, row, spec=spec, selected=selected, now=now, cfg=cfg)
            return _result(row, action.value, len(selected))
        new = apply_action(status, action, now, len(spec.stages))
        set_status(s, row, new, now, actor="operator", trigger=action.value, cfg=cfg)
        return _result(row, action.value, row.devices)


def _revert(
    db: Database, rollout_id: str, repo: TargetSource, now: datetime, cfg: ServiceConfig
) -> ActionResult:
    with locked_rollout(db, rollout_id, wait=True) as got:
        assert got is not None
        s, row = got
        status = status_of(row)
        next_state(status.state, Action.REVERT)
        rd = RolloutDevice
        touched = s.execute(
            select(rd.device_id, rd.previous_name, rd.previous_release, rd.previous_variant)
            .where(rd.rollout_id == row.id, rd.started_at.is_not(None))
            .order_by(rd.rank)
        ).all()
        back = [(d, n, r, v) for d, n, r, v in touched if n is not None and r is not None]
        skipped = tuple(d for d, n, r, _ in touched if n is None or r is None)
        signed = repo.targets()
        missing: dict[str, int] = {}
        for _, name, release, variant in back:
            if variant is not None:
                path = model_target_path(name, release, variant)
                ok = path in signed
            else:  # variant unknown: any signed variant of that release will do
                prefix = release_target_prefix(name, release)
                path = f"{prefix}*"
                ok = any(p.startswith(prefix) for p in signed)
            if not ok:
                missing[path] = missing.get(path, 0) + 1
        if missing:
            listed = ", ".join(f"{p} ({n} devices)" for p, n in sorted(missing.items()))
            raise RevertRefusedError(
                f"cannot revert rollout {row.id}: the previous release is no longer a valid "
                f"signed TUF target: {listed}; publish it again or roll out another release"
            )
        rows = [
            {
                "target_kind": "device",
                "target_value": d,
                "name": n,
                "release": r,
                "created_at": now,
                "rollout_id": row.id,
            }
            for d, n, r, _ in back
        ]
        for at in range(0, len(rows), cfg.insert_chunk):
            s.execute(insert(Assignment), rows[at : at + cfg.insert_chunk])
        ids = [d for d, _, _, _ in back]
        push_queue.request(s, ids, "revert", now)
        for at in range(0, len(ids), cfg.in_chunk):
            chunk = ids[at : at + cfg.in_chunk]
            s.execute(
                update(RolloutDevice)
                .where(RolloutDevice.rollout_id == row.id, RolloutDevice.device_id.in_(chunk))
                .values(reverted_at=now)
                .execution_options(synchronize_session=False)
            )
        new = apply_action(status, Action.REVERT, now, len(spec_of(row).stages))
        reason = (
            f"reverted by operator: {len(back)} devices told to go back to their previous release"
        )
        if skipped:
            reason += f"; {len(skipped)} had no previous release and keep the new one"
        new = dataclasses.replace(new, reason=reason)
        set_status(
            s,
            row,
            new,
            now,
            actor="operator",
            trigger=Action.REVERT.value,
            devices=len(back),
            cfg=cfg,
        )
        return _result(row, Action.REVERT.value, len(back), skipped)

"""Shadow evaluation's storage: who shadows what, and what each device reported.

- ``sync_assignments``: the engine's tick makes ``shadow_assignments`` hold
  exactly the devices the policy wants shadowing (none outside a running
  shadow phase); ``clear`` empties a rollout's rows when it stops running.
- ``record``: a device's summed shadow windows, added to its row; a device
  may only report while it is assigned to shadow for that rollout, so no
  device can write another's figures or into a stage it is not part of.
- ``load`` and ``report``: the policy's facts, and the operator's view folded
  per profile with per-class rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from server.db.tables import Device, ShadowAssignment
from server.push import queue as push_queue
from server.rollout.core.shadow import ShadowReport
from server.rollout.core.shadow_judge import MIN_EVIDENCE_FRAMES, fold
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import RolloutState
from server.rollout.service.tables import Rollout, ShadowResult

_CHUNK = 500
# Running, paused or awaiting approval (records.HOLDING, which imports this module).
HOLDING_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.AWAITING_APPROVAL)


def clear(s: Session, rollout_id: str) -> int:
    query = select(ShadowAssignment.device_id).where(ShadowAssignment.rollout_id == rollout_id)
    gone = list(s.scalars(query))
    if not gone:
        return 0
    s.execute(delete(ShadowAssignment).where(ShadowAssignment.rollout_id == rollout_id))
    push_queue.request(s, gone, "shadow")  # stop shadowing now, not at the next poll
    return len(gone)


def sync_assignments(
    s: Session, rollout_id: str, spec: RolloutSpec, devices: Sequence[str], now: datetime
) -> tuple[int, int]:
    """Make the rollout's shadow rows exactly ``devices``; (added, removed)."""
    if spec.shadow is None or not devices:
        return 0, clear(s, rollout_id)
    query = select(ShadowAssignment.device_id).where(ShadowAssignment.rollout_id == rollout_id)
    have = set(s.scalars(query))
    want = set(devices)
    gone = sorted(have - want)
    new = sorted(want - have)
    for at in range(0, len(gone), _CHUNK):
        s.execute(
            delete(ShadowAssignment).where(ShadowAssignment.device_id.in_(gone[at : at + _CHUNK]))
        )
    for at in range(0, len(new), _CHUNK):
        chunk = new[at : at + _CHUNK]
        # A row left by another rollout would block the key; rollouts never share devices.
        s.execute(delete(ShadowAssignment).where(ShadowAssignment.device_id.in_(chunk)))
        s.execute(
            insert(ShadowAssignment),
            [
                {
                    "device_id": device_id,
                    "rollout_id": rollout_id,
                    "name": spec.release.name,
                    "release": spec.release.release,
                    "every_n": spec.shadow.every_n,
                    "cpu_budget": float(spec.shadow.cpu_budget),
                    "created_at": now,
                }
                for device_id in chunk
            ],
        )
    push_queue.request(s, [*new, *gone], "shadow")
    return len(new), len(gone)


def _pairs_json(pairs: Mapping[tuple[int, int], int]) -> dict[str, int]:
    return {f"{i},{j}": n for (i, j), n in sorted(pairs.items())}


def _pairs_of(data: Mapping[str, Any]) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for key, n in data.items():
        i, _, j = key.partition(",")
        out[(int(i), int(j))] = int(n)
    return out


def _report(row: ShadowResult) -> ShadowReport:
    return ShadowReport(
        shadowed=row.shadowed,
        skipped=row.skipped,
        agreed=row.agreed,
        pairs=_pairs_of(row.pairs),
        labels=tuple(row.labels),
        candidate_p95_ms=row.candidate_p95_ms,
        serving_p95_ms=row.serving_p95_ms,
        candidate_mj=row.candidate_mj,
        error=row.error,
    )


def record(
    s: Session, rollout_id: str, device_id: str, add: ShadowReport, *, windows: int, at: datetime
) -> bool:
    """Add a device's summed windows to its row; False when the device is not shadowing
    for that rollout now (another stage's device, another rollout, or a late window)."""
    assigned = s.get(ShadowAssignment, device_id)
    if assigned is None or assigned.rollout_id != rollout_id:
        return False
    row = s.get(ShadowResult, (rollout_id, device_id), with_for_update=True)
    if row is None:
        row = ShadowResult(rollout_id=rollout_id, device_id=device_id, pairs={}, labels=[])
        s.add(row)
        total = add
        row.windows = 0
    else:
        total = _report(row).merge(add)
    row.windows = (row.windows or 0) + windows
    row.shadowed, row.skipped, row.agreed = total.shadowed, total.skipped, total.agreed
    row.pairs = _pairs_json(total.pairs)
    row.labels = list(total.labels)
    row.candidate_p95_ms, row.serving_p95_ms = total.candidate_p95_ms, total.serving_p95_ms
    row.candidate_mj, row.error = total.candidate_mj, total.error
    row.updated_at = at
    return True


def load(
    s: Session, rollout_id: str, device_ids: Iterable[str] | None = None
) -> dict[str, ShadowReport]:
    query = select(ShadowResult).where(ShadowResult.rollout_id == rollout_id)
    if device_ids is None:
        return {row.device_id: _report(row) for row in s.scalars(query)}
    ids = sorted(set(device_ids))
    out: dict[str, ShadowReport] = {}
    for at in range(0, len(ids), _CHUNK):
        chunk = query.where(ShadowResult.device_id.in_(ids[at : at + _CHUNK]))
        out.update((row.device_id, _report(row)) for row in s.scalars(chunk))
    return out


def report(s: Session, rollout_id: str) -> dict[str, Any]:
    """The operator's view: per profile, overall and per class, with the devices shadowing now."""
    reports = load(s, rollout_id)
    profiles: dict[str, dict[str, ShadowReport]] = {}
    if reports:
        rows = s.execute(select(Device.id, Device.profile).where(Device.id.in_(sorted(reports))))
        for device_id, profile in rows:
            profiles.setdefault(profile or "", {})[device_id] = reports[device_id]
    count = s.scalar(
        select(func.count())
        .select_from(ShadowAssignment)
        .where(ShadowAssignment.rollout_id == rollout_id)
    )
    return {
        "rollout_id": rollout_id,
        "shadowing_now": int(count or 0),
        "profiles": {p: fold(devices).to_json() for p, devices in sorted(profiles.items())},
    }


def live(s: Session) -> list[dict[str, Any]]:
    """Shadow figures of rollouts that still hold their devices: one row per profile, with
    the weakest class among those with enough frames to say anything (for /metrics)."""
    rows = s.scalars(select(Rollout).where(Rollout.state.in_([st.value for st in HOLDING_STATES])))
    out: list[dict[str, Any]] = []
    for rollout in rows:
        settings = rollout.spec.get("shadow")
        if not settings:
            continue
        for profile, p in report(s, rollout.id)["profiles"].items():
            judged = [c["agreement"] for c in p["classes"] if c["frames"] >= MIN_EVIDENCE_FRAMES]
            out.append(
                {
                    "rollout": rollout.id,
                    "model": rollout.name,
                    "release": rollout.release,
                    "profile": profile,
                    "agreement": p["agreement"],
                    "class_min": min(judged) if judged else None,
                    "shadowed": p["shadowed"],
                    "candidate_p95_ms": p["candidate_p95_ms"],
                }
            )
    return out

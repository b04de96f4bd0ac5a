"""What a device's reports say about its progress with a rollout's release (pure).

A device speaks through update events (type ``update``, state download ...
commit/rollback/idle, detail ``{target, slot, reason}``), the download report
(type ``download``), the golden-set result (type ``golden_set``, detail
``{accuracy, per_class, release}``) and its check-in (``installed``). Events
arrive over HTTP (``detail`` is the report) or MQTT (the stored detail is the
whole message, the report one level down). Only reports about this rollout's
release count, and for each device the newest event wins, so reading an event
twice changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.protocol.manifest import release_target_prefix
from server.rollout.core.spec import ReleaseRef
from server.rollout.core.states import InstallStatus

S = InstallStatus
EVENT_TYPES = ("update", "download", "golden_set")
IN_FLIGHT_STATES = frozenset({"download", "verify", "install", "smoke_test", "health"})
_MAX_REASON = 200


class Progress(NamedTuple):
    """One device's standing: the folded status and what explains it."""

    status: InstallStatus = S.PENDING
    reason: str | None = None
    golden_accuracy: float | None = None
    last_event_id: int = 0


@dataclass(frozen=True)
class ReleaseMatch:
    """Recognises reports about one release (any variant)."""

    name: str
    release: int
    prefix: str = field(init=False)  # every target path of this release starts with it

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", release_target_prefix(self.name, self.release))

    @classmethod
    def of(cls, ref: ReleaseRef) -> ReleaseMatch:
        return cls(ref.name, ref.release)

    def target(self, value: object) -> bool:
        return isinstance(value, str) and value.startswith(self.prefix)

    def installed(self, name: str | None, release: int | None) -> bool:
        return name == self.name and release == self.release


def report_of(detail: Any, source: str) -> dict[str, Any]:
    """The device's own detail object, whichever transport carried it."""
    if not isinstance(detail, dict):
        return {}
    inner = detail.get("detail")
    if source == "mqtt" and isinstance(inner, dict):
        return inner
    return detail


def _reason(value: object) -> str | None:
    return value[:_MAX_REASON] if isinstance(value, str) and value else None


def _accuracy(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) and 0.0 <= result <= 1.0 else None


def _fold_update(p: Progress, state: str | None, report: dict[str, Any]) -> Progress:
    reason = _reason(report.get("reason"))
    if state in IN_FLIGHT_STATES:
        return p._replace(status=S.DOWNLOADING, reason=None)
    if state == "commit":
        return p._replace(status=S.INSTALLED, reason=None)
    if state == "rollback":
        return p._replace(status=S.ROLLED_BACK, reason=reason or "rolled back on the device")
    # Back to idle with a reason and nothing installed: the attempt failed before the switch.
    if state == "idle" and reason and p.status in (S.PENDING, S.DOWNLOADING):
        return p._replace(status=S.FAILED, reason=reason)
    return p


def fold_event(
    p: Progress,
    event_id: int,
    type_: str,
    state: str | None,
    report: dict[str, Any],
    *,
    match: ReleaseMatch,
) -> Progress:
    """``p`` after one event; events already folded (by id) change nothing."""
    if event_id <= p.last_event_id:
        return p
    seen = p._replace(last_event_id=event_id)
    if type_ == "golden_set":
        accuracy = _accuracy(report.get("accuracy"))
        if report.get("release") == match.release and accuracy is not None:
            seen = seen._replace(golden_accuracy=accuracy)
    elif type_ == "download":
        if match.installed(report.get("name"), report.get("release")) and p.status is S.PENDING:
            seen = seen._replace(status=S.DOWNLOADING)
    elif type_ == "update" and match.target(report.get("target")):
        seen = _fold_update(seen, state, report)
    return seen


def fold_checkin(
    p: Progress, name: str | None, release: int | None, match: ReleaseMatch
) -> Progress:
    """A check-in naming the release as installed settles an unfinished install.

    A failure or rollback reported by events stays: the check-in row may predate it.
    """
    if match.installed(name, release) and p.status in (S.PENDING, S.DOWNLOADING):
        return p._replace(status=S.INSTALLED, reason=None)
    return p

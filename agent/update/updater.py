"""Drives one update through the state machine and performs each state's work.

The transition logic lives in ``agent.update.state_machine`` (pure); this module is
the IO edge: it persists the record before each durable step, talks to the
server, TUF and the slots, and reports every step as an event.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent.common.atomic import atomic_write_json
from agent.common.errors import AgentError, UpdateError
from agent.protocol.api import DesiredTarget, InstalledModel
from agent.protocol.manifest import ModelManifest
from agent.update.slots import SlotStore
from agent.update.state_machine import DURABLE, MAX_RESTARTS, Event, State, UpdateRecord

log = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_TARGET = 3


class Fetcher(Protocol):
    """Gets a verified target file onto local disk (TUF + download, delta or full)."""

    def fetch(self, record: UpdateRecord, desired: DesiredTarget, dest: Path) -> FetchResult: ...

    def manifest_for(self, desired: DesiredTarget) -> tuple[ModelManifest, dict[str, Any]]: ...

    def verify(self, record: UpdateRecord, path: Path) -> None: ...


@dataclass(frozen=True)
class FetchResult:
    path: Path
    via: str
    bytes_downloaded: int
    detail: dict[str, Any]


SmokeTest = Callable[[Path, ModelManifest], None]
Activate = Callable[[Path | None, dict[str, Any] | None], None]
HealthCheck = Callable[[], str | None]
Reporter = Callable[[str, str, dict[str, Any]], None]


class Updater:
    def __init__(
        self,
        state_dir: Path,
        slots: SlotStore,
        fetcher: Fetcher,
        *,
        smoke_test: SmokeTest,
        activate: Activate,
        health_check: HealthCheck,
        report: Reporter,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.slots = slots
        self.fetcher = fetcher
        self.smoke_test = smoke_test
        self.activate = activate
        self.health_check = health_check
        self.report = report
        self.staging = self.state_dir / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._record_path = self.state_dir / "update.json"
        self._failures_path = self.state_dir / "failures.json"
        self.record = self._load()
        self.failures: dict[str, int] = self._load_failures()

    # -- persistence -------------------------------------------------------
    def _load(self) -> UpdateRecord:
        try:
            return UpdateRecord.from_json(json.loads(self._record_path.read_text()))
        except FileNotFoundError:
            return UpdateRecord()
        except (ValueError, AgentError) as err:
            log.error("update record unreadable (%s); starting from idle", err)
            return UpdateRecord()

    def _load_failures(self) -> dict[str, int]:
        try:
            data = json.loads(self._failures_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save(self, record: UpdateRecord) -> None:
        self.record = record
        if record.state in DURABLE or record.state is State.IDLE:
            atomic_write_json(self._record_path, record.to_json())

    def _go(self, event: Event, **changes: Any) -> None:
        record = self.record.advance(event, **changes)
        self._save(record)
        detail = {"target": record.target_path, "slot": record.slot, "reason": record.reason}
        self._safe_report("update", record.state.value, detail)

    def _safe_report(self, kind: str, state: str, detail: dict[str, Any]) -> None:
        try:
            self.report(kind, state, detail)
        except AgentError as err:
            log.warning("could not report %s/%s: %s", kind, state, err)

    # -- queries -----------------------------------------------------------
    def installed(self) -> InstalledModel | None:
        slot = self.slots.active()
        data = self.slots.manifest(slot) if slot else None
        if slot is None or data is None:
            return None
        return InstalledModel(
            name=data["name"],
            release=data["release"],
            variant=data["variant"],
            sha256=data["sha256"],
            slot=slot,
        )

    def wants(self, desired: DesiredTarget | None) -> bool:
        if desired is None:
            return False
        current = self.installed()
        if current and (current.name, current.release, current.variant) == (
            desired.name,
            desired.release,
            desired.variant,
        ):
            return False
        return self.failures.get(desired.target_path, 0) < MAX_ATTEMPTS_PER_TARGET

    # -- driving -----------------------------------------------------------
    def resume(self) -> None:
        """After a restart: finish or undo whatever was in flight."""
        if self.record.state is State.IDLE:
            return
        state = self.record.state
        restarts = self.record.restarts + 1
        if restarts > MAX_RESTARTS:
            # The same update crashed the agent again and again: stop retrying the step.
            reason = f"agent restarted {restarts} times during this update (last in {state.value})"
            log.error("%s; abandoning the step", reason)
            self._count_failure()
            self._go(Event.FAILURE, reason=reason, restarts=restarts)
        else:
            log.warning("resuming update interrupted in state %s", state.value)
            self._go(
                Event.RESTARTED, reason=f"agent restarted during {state.value}", restarts=restarts
            )
        self._run()

    def update(self, desired: DesiredTarget) -> bool:
        """Run a whole update to ``desired``; True when it was committed."""
        if self.record.state is not State.IDLE:
            raise UpdateError(
                "check_in", f"an update is already in state {self.record.state.value}"
            )
        self._go(Event.START)
        self._go(
            Event.UPDATE_AVAILABLE,
            target_path=desired.target_path,
            desired=desired.to_json(),
            update_id=secrets.token_hex(8),
            reason=None,
        )
        return self._run()

    def _run(self) -> bool:
        committed = False
        while self.record.state is not State.IDLE:
            state = self.record.state
            try:
                event, changes = self._step(state)
            except (AgentError, OSError) as err:  # OSError: a full disk, a vanished file
                log.error("update step %s failed: %s", state.value, err)
                event, changes = Event.FAILURE, {"reason": str(err)}
                self._count_failure()
            committed = committed or state is State.COMMIT
            self._go(event, **changes)
        self._save(self.record.cleared())
        return committed

    def _count_failure(self) -> None:
        if self.record.target_path:
            key = self.record.target_path
            self.failures[key] = self.failures.get(key, 0) + 1
            atomic_write_json(self._failures_path, self.failures)

    def _step(self, state: State) -> tuple[Event, dict[str, Any]]:
        handlers = {
            State.DOWNLOAD: self._download,
            State.VERIFY: self._verify,
            State.INSTALL: self._install,
            State.SMOKE_TEST: self._smoke_test,
            State.HEALTH: self._health,
            State.COMMIT: self._commit,
            State.ROLLBACK: self._rollback,
        }
        if state not in handlers:
            raise UpdateError(state.value, "no work defined for this state")
        return handlers[state]()

    def _download(self) -> tuple[Event, dict[str, Any]]:
        desired = _desired_from(self.record)
        manifest, custom = self.fetcher.manifest_for(desired)
        self._save(
            replace(
                self.record,
                manifest=custom,
                target_sha256=manifest.sha256,
                target_length=manifest.length,
            )
        )
        result = self.fetcher.fetch(self.record, desired, self._staged())
        # The bandwidth report: the server adds these up per device, release and fleet.
        report = {
            **result.detail,
            "via": result.via,
            "bytes_downloaded": result.bytes_downloaded,
            "update_id": self.record.update_id,
            "name": manifest.name,
            "release": manifest.release,
            "variant": manifest.variant,
            "target_bytes": manifest.length,
            "fp32_bytes": manifest.fp32_length,
        }
        self._safe_report("download", "done", report)
        return Event.SUCCESS, {"via": result.via, "bytes_downloaded": result.bytes_downloaded}

    def _verify(self) -> tuple[Event, dict[str, Any]]:
        self.fetcher.verify(self.record, self._staged())
        return Event.SUCCESS, {}

    def _install(self) -> tuple[Event, dict[str, Any]]:
        plan = self.slots.plan()
        self.slots.write(plan, self._staged(), self.record.manifest or {})
        return Event.SUCCESS, {"slot": plan.slot, "previous_slot": plan.previous_slot}

    def _smoke_test(self) -> tuple[Event, dict[str, Any]]:
        slot = _require(self.record.slot, "smoke_test", "no slot recorded")
        manifest = ModelManifest.from_custom(self.record.manifest)
        self.smoke_test(self.slots.model_path(slot), manifest)
        return Event.SUCCESS, {}

    def _health(self) -> tuple[Event, dict[str, Any]]:
        slot = _require(self.record.slot, "health", "no slot recorded")
        self.slots.activate(slot)
        self.activate(self.slots.model_path(slot), self.slots.manifest(slot))
        problem = self.health_check()
        if problem:
            raise UpdateError("health", problem)
        return Event.SUCCESS, {}

    def _commit(self) -> tuple[Event, dict[str, Any]]:
        self.failures.pop(self.record.target_path or "", None)
        atomic_write_json(self._failures_path, self.failures)
        self._clean_staging()
        return Event.DONE, {"reason": None}

    def _rollback(self) -> tuple[Event, dict[str, Any]]:
        rec = self.record
        if rec.slot and self.slots.active() == rec.slot:
            if rec.previous_slot:
                self.slots.activate(rec.previous_slot)
                prev = rec.previous_slot
                self.activate(self.slots.model_path(prev), self.slots.manifest(prev))
            else:
                (self.slots.root / "active").unlink(missing_ok=True)
                self.activate(None, None)
        if rec.slot:
            self.slots.clear(rec.slot)
        self._clean_staging()
        log.warning("rolled back %s: %s", rec.target_path, rec.reason)
        return Event.DONE, {}

    def _staged(self) -> Path:
        return self.staging / "target.bin"

    def _clean_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)


def _require(value: str | None, step: str, reason: str) -> str:
    if not value:
        raise UpdateError(step, reason)
    return value


def _desired_from(record: UpdateRecord) -> DesiredTarget:
    if not record.desired:
        raise UpdateError("download", "no target recorded to resume")
    return DesiredTarget.from_json(record.desired)

"""Drives one update through the state machine and performs each state's work.

The transition logic lives in ``agent.update.state_machine`` (pure); this module is
the IO edge: it persists the record before each durable step, talks to the
server, TUF and the slots, and reports every step as an event.

It cannot loop. Any exception in a step is that step's FAILURE and counts
against the target; a state the agent keeps dying in (``MAX_RESTARTS``
consecutive restarts with no step finished) is abandoned: rolled back, reported
(``update/refused``) and the target refused. A target with
``MAX_ATTEMPTS_PER_TARGET`` failures is refused too, until the server's desired
target changes. A record the agent cannot read (unknown state, another layout
version, corrupt) is rolled back, never guessed at.
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
from agent.update.slots import SLOTS, SlotStore
from agent.update.state_machine import DURABLE, MAX_RESTARTS, Event, State, UpdateRecord

log = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_TARGET = 3
RESUMABLE = frozenset({State.DOWNLOAD, State.VERIFY, State.INSTALL})  # before the switch
FORWARD = RESUMABLE | {State.SMOKE_TEST, State.HEALTH}


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
        self._unsaved: str | None = None  # why the last record could not be persisted

    # -- persistence -------------------------------------------------------
    def _load(self) -> UpdateRecord:
        try:
            return UpdateRecord.from_json(json.loads(self._record_path.read_text()))
        except FileNotFoundError:
            return UpdateRecord()
        except (OSError, ValueError, AgentError) as err:
            log.error("update record unreadable (%s); rolling back", err)
            return _salvaged(self._record_path, err)

    def _load_failures(self) -> dict[str, int]:
        try:
            data = json.loads(self._failures_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save(self, record: UpdateRecord) -> None:
        self.record = record
        if record.state in DURABLE or record.state is State.IDLE:
            try:
                atomic_write_json(self._record_path, record.to_json())
                self._unsaved = None
            except OSError as err:  # a full disk must not crash (and crash-loop) the agent
                log.error("cannot persist update state %s: %s", record.state.value, err)
                self._unsaved = f"cannot persist state {record.state.value}: {err}"

    def _persist_failures(self) -> None:
        try:
            atomic_write_json(self._failures_path, self.failures)
        except OSError as err:  # a full disk: the counts still hold for this run
            log.error("cannot persist failure counts: %s", err)

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
        if self.failures and desired.target_path not in self.failures:
            # The server now wants something else: earlier refusals no longer apply.
            self.failures = {}
            self._persist_failures()
        current = self.installed()
        if current and (current.name, current.release, current.variant) == (
            desired.name,
            desired.release,
            desired.variant,
        ):
            return False
        return not self.refused(desired.target_path)

    def refused(self, target_path: str) -> bool:
        return self.failures.get(target_path, 0) >= MAX_ATTEMPTS_PER_TARGET

    # -- driving -----------------------------------------------------------
    def resume(self, *, forward: bool = True) -> None:
        """After a restart: finish or undo whatever was in flight.

        ``forward=False`` leaves an interrupted download, verify or install for a later
        call: the daemon undoes a switched-in candidate before it loads the active model,
        and resumes forward steps once its inference worker runs (their health check
        watches it).
        """
        if self.record.state is State.IDLE:
            return
        if not forward and self.record.state in RESUMABLE:
            return
        state = self.record.state
        restarts = self.record.restarts + 1
        if restarts > MAX_RESTARTS:
            # The agent died again and again in this state: abandon it and refuse the target.
            reason = f"agent restarted {restarts} times in {state.value} (no step finished)"
            log.error("%s; abandoning the update", reason)
            self._count_failure(refuse=True)
            self._safe_report("update", "refused", self._refusal(reason, restarts))
            self._go(Event.FAILURE, reason=reason, restarts=restarts)
        else:
            log.warning("resuming update interrupted in state %s", state.value)
            reason = f"agent restarted during {state.value}"
            if state is State.ROLLBACK and self.record.reason:
                reason = self.record.reason  # why it is rolling back says more
            self._go(Event.RESTARTED, reason=reason, restarts=restarts)
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
            except Exception as err:  # any bug or IO error is this step's failure, not a crash
                known = isinstance(err, AgentError)
                log.error("update step %s failed: %s", state.value, err, exc_info=not known)
                reason = str(err) if known else f"{type(err).__name__}: {err}"
                event, changes = Event.FAILURE, {"reason": reason}
                self._count_failure()
            committed = committed or (state is State.COMMIT and event is Event.DONE)
            self._go(event, **{"restarts": 0, **changes})  # a finished step ends a restart run
        self._save(self.record.cleared())
        return committed

    def _count_failure(self, *, refuse: bool = False) -> None:
        key = self.record.target_path
        if not key:
            return
        count = self.failures.get(key, 0) + 1
        self.failures[key] = max(count, MAX_ATTEMPTS_PER_TARGET) if refuse else count
        self._persist_failures()
        if not refuse and self.refused(key):
            reason = f"{count} failed attempts; last: {self.record.reason}"
            self._safe_report("update", "refused", self._refusal(reason, self.record.restarts))

    def _refusal(self, reason: str, restarts: int) -> dict[str, Any]:
        return {
            "target": self.record.target_path,
            "reason": reason,
            "failures": self.failures.get(self.record.target_path or "", 0),
            "restarts": restarts,
            "state": self.record.state.value,
        }

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
        if self._unsaved and state in FORWARD:
            # A step whose entry is not on disk must not run: a restart would not know of it.
            # Undoing (rollback) and committing still run: they only make things safer.
            raise UpdateError(state.value, self._unsaved)
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


def _salvaged(path: Path, err: Exception) -> UpdateRecord:
    """A ROLLBACK record for an update the agent cannot read: undo the slot switch
    if the raw record still names a valid slot pair, else just clear staging."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}

    def slot(key: str) -> str | None:
        value = raw.get(key)
        return value if value in SLOTS else None

    target = raw.get("target_path")
    return UpdateRecord(
        state=State.ROLLBACK,
        target_path=target if isinstance(target, str) else None,
        slot=slot("slot"),
        previous_slot=slot("previous_slot"),
        reason=f"update record unreadable: {err}",
    )


def _require(value: str | None, step: str, reason: str) -> str:
    if not value:
        raise UpdateError(step, reason)
    return value


def _desired_from(record: UpdateRecord) -> DesiredTarget:
    if not record.desired:
        raise UpdateError("download", "no target recorded to resume")
    return DesiredTarget.from_json(record.desired)

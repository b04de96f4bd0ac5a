"""One simulated device: check-in, the update chain with its reports, telemetry windows.

The update walks the agent's own state machine (``agent.update.state_machine``:
``UpdateRecord.advance`` over the one transition table) and reports each
state exactly as ``agent.update.updater`` does: an ``update`` event per transition
with ``{target, slot, reason}``, the ``download`` bandwidth report, and the
``golden_set`` score during the smoke test when the release ships one, which
fails the smoke test below the release minimum (``agent.update.smoke``). HTTP copies
of the events are batched by the agent's own ``agent.transport.event_queue``. Target
metadata and bytes come from the fleet's ``SharedArtifacts``: verified with
TUF once, shared by every device.

What differs from a real device is decided by ``Behaviour``: whether this
device's install of a release fails (and at which step), whether it goes
silent when told to update, and its latency, power and golden-set accuracy.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from agent.common.errors import AgentError, ProtocolError, SmokeTestError, UpdateError
from agent.inference.scoring import GoldenSetResult, GoldenSetSpec
from agent.protocol.api import DesiredTarget, InstalledModel, MqttCredentials, ShadowTarget
from agent.transport.event_queue import EventQueue
from agent.update.smoke import golden_set_problem
from agent.update.state_machine import Event, State, UpdateRecord
from server.simulator.artifacts import SharedArtifacts, SignedModel
from server.simulator.behaviour import Behaviour, Traits
from server.simulator.http import DeviceHttp
from server.simulator.mqtt_link import MqttLink
from server.simulator.payloads import (
    download_report,
    golden_report,
    shadow_results,
    telemetry_window,
)
from server.simulator.plan import PlannedDevice, SimConfig
from server.simulator.stats import FleetStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What every device of a fleet shares."""

    config: SimConfig
    behaviour: Behaviour
    http: DeviceHttp
    artifacts: SharedArtifacts
    stats: FleetStats


@dataclass(frozen=True)
class Active:
    model: SignedModel
    slot: str


class SimDevice:
    def __init__(
        self,
        plan: PlannedDevice,
        device_id: str,
        token: str,
        mqtt: MqttCredentials | None,
        ctx: Context,
    ) -> None:
        self.plan = plan
        self.device_id = device_id
        self.token = token
        self.mqtt = mqtt
        self.ctx = ctx
        self.active: Active | None = None
        self.silent = False
        self.record = UpdateRecord()  # the update in progress, as agent.update.updater keeps it
        self.failures: dict[str, int] = {}
        self.link: MqttLink | None = None
        self.shadow: ShadowTarget | None = None  # the candidate the server asked to shadow
        self.wake = asyncio.Event()
        self.windows = 0
        self.events = EventQueue()  # HTTP copies waiting for their batch
        self._traits: dict[int, Traits] = {}

    def traits(self, release: int) -> Traits:
        if release not in self._traits:
            self._traits[release] = self.ctx.behaviour.traits(
                self.plan.hardware_id, self.plan.profile, release
            )
        return self._traits[release]

    # -- what the device runs ----------------------------------------------------------
    def installed(self) -> InstalledModel | None:
        if self.active is None:
            return None
        m = self.active.model.manifest
        return InstalledModel(m.name, m.release, m.variant, m.sha256, self.active.slot)

    def wants(self, desired: DesiredTarget | None) -> bool:
        """As ``agent.update.updater.Updater.wants``: a different target, not failed too often."""
        if desired is None:
            return False
        current = self.installed()
        if current and (current.name, current.release, current.variant) == (
            desired.name,
            desired.release,
            desired.variant,
        ):
            return False
        return self.failures.get(desired.target_path, 0) < self.ctx.config.max_attempts

    def on_command(self, command: dict[str, Any]) -> None:
        """Commands arrive on the device's ``cmd`` topic; ``checkin`` wakes it, as the agent."""
        if command.get("action") == "checkin":
            self.wake.set()

    def go_silent(self) -> None:
        """Stop talking for good: no check-ins, events or windows; MQTT keep-alive lapses."""
        if not self.silent:
            self.silent = True
            self.ctx.stats.silent += 1
            if self.link is not None:
                self.link.freeze()

    # -- reporting -----------------------------------------------------------------------
    async def report(self, kind: str, state: str, detail: dict[str, Any]) -> None:
        """MQTT now and/or HTTP in the next batch, as configured; the agent sends both and
        the server dedupes."""
        route = self.ctx.config.events
        linked = self.link is not None and self.link.connected
        if linked and route in ("both", "mqtt"):
            assert self.link is not None
            self.link.publish("events", {"type": kind, "state": state, "detail": detail})
        if (not linked or route in ("both", "http")) and self.events.add(kind, state, detail):
            await self.flush_events()

    async def flush_events(self) -> None:
        """POST the queued HTTP copies, a batch at a time; a failed batch waits for the next."""
        while batch := self.events.take():
            try:
                await self.ctx.http.events(self.device_id, self.token, batch)
            except AgentError as err:
                self.events.failed(batch, err)
                log.debug("%d events of %s not posted: %s", len(batch), self.device_id, err)
                return

    async def _go(self, event: Event, **changes: Any) -> None:
        """Advance the update record through the agent's table and report the new state."""
        record = self.record = self.record.advance(event, **changes)
        detail = {"target": record.target_path, "slot": record.slot, "reason": record.reason}
        await self.report("update", record.state.value, detail)

    async def _pause(self) -> None:
        if self.ctx.config.step_s:
            await asyncio.sleep(self.ctx.config.step_s)

    # -- the update chain ----------------------------------------------------------------
    async def update(self, desired: DesiredTarget) -> bool:
        """Run one update to ``desired``; True when it was committed."""
        traits = self.traits(desired.release)
        if traits.goes_silent:
            self.go_silent()
            return False
        self.ctx.stats.updates_started += 1
        before = self.active
        self.record = UpdateRecord()
        await self._go(Event.START)
        await self._go(
            Event.UPDATE_AVAILABLE,
            target_path=desired.target_path,
            desired=desired.to_json(),
            update_id=secrets.token_hex(8),
            reason=None,
        )
        committed = False
        try:
            await self._chain(desired, traits)
            committed = True
        except AgentError as err:
            self.failures[desired.target_path] = self.failures.get(desired.target_path, 0) + 1
            await self._go(Event.FAILURE, reason=str(err))
            if self.record.state is State.ROLLBACK:
                self.active = before
                await self._go(Event.DONE)
                self.ctx.stats.rolled_back += 1
            else:
                self.ctx.stats.failed += 1
        finally:
            self.record = self.record.cleared()
        if committed:
            self.ctx.stats.committed += 1
        # Usually a no-op (the final idle event flushed the queue); after a failed POST it is
        # the one retry before the device goes back to sleep.
        await self.flush_events()
        return committed

    async def _chain(self, desired: DesiredTarget, traits: Traits) -> None:
        """Download to commit; an ``AgentError`` fails the step the record is in."""
        fail_at = self.ctx.config.fail_step if traits.fails_install else None
        artifacts = self.ctx.artifacts
        await self._pause()
        model = await artifacts.model(desired)  # the device's own TUF check of the target
        base = self.active.model if self.active else None
        fetched = await artifacts.fetch(model, base)
        await self.report(
            "download",
            "done",
            download_report(
                manifest=model.manifest,
                update_id=self.record.update_id or "",
                via=fetched.via,
                bytes_downloaded=fetched.bytes_downloaded,
                delta_bytes=fetched.delta_bytes,
                fallback=fetched.fallback,
            ),
        )
        if fail_at == "download":
            raise UpdateError("download", f"simulated download failure on {self.plan.profile}")
        await self._go(
            Event.SUCCESS, via=fetched.via, bytes_downloaded=fetched.bytes_downloaded
        )  # -> verify
        await self._pause()
        await self._go(Event.SUCCESS)  # -> install
        slot = "b" if self.active is not None and self.active.slot == "a" else "a"
        previous = self.active.slot if self.active else None
        await self._go(Event.SUCCESS, slot=slot, previous_slot=previous)  # -> smoke_test
        await self._pause()
        await self._smoke_test(model, traits)
        if fail_at == "smoke_test":
            raise SmokeTestError(f"simulated smoke-test failure on {self.plan.profile}")
        await self._go(Event.SUCCESS)  # -> health: the new model runs from here
        self.active = Active(model, slot)
        await self._pause()
        if fail_at == "health":
            raise UpdateError("health", f"simulated health failure on {self.plan.profile}")
        await self._go(Event.SUCCESS)  # -> commit
        self.failures.pop(desired.target_path, None)
        await self._go(Event.DONE, reason=None)  # -> idle

    async def _smoke_test(self, model: SignedModel, traits: Traits) -> None:
        manifest = model.manifest
        try:
            spec = GoldenSetSpec.from_extra(manifest.extra)
        except ProtocolError as err:
            raise SmokeTestError(f"golden set declaration invalid: {err}") from err
        if spec is None:
            return
        count = min(spec.count, self.ctx.config.golden_count)
        result = GoldenSetResult(
            traits.accuracy, count, {label: traits.accuracy for label in manifest.labels}
        )
        await self.report(
            "golden_set",
            "scored",
            golden_report(manifest, traits.accuracy, spec.min_accuracy, count),
        )
        problem = golden_set_problem(spec, result)
        if problem:
            raise SmokeTestError(problem)

    # -- telemetry -----------------------------------------------------------------------
    def publish_window(self) -> bool:
        """One telemetry window over MQTT, if the device runs a model and can talk."""
        link, active = self.link, self.active
        if self.silent or link is None or active is None:
            return False
        manifest = active.model.manifest
        payload = telemetry_window(
            seed=self.ctx.behaviour.seed,
            hardware_id=self.plan.hardware_id,
            index=self.windows,
            traits=self.traits(manifest.release),
            manifest=manifest,
            slot=active.slot,
            profile=self.plan.profile,
            spec=self.ctx.config.telemetry,
        )
        shadow = self.shadow
        if shadow is not None and shadow.release != manifest.release:
            behaviour = self.ctx.behaviour
            results = shadow_results(
                seed=behaviour.seed,
                hardware_id=self.plan.hardware_id,
                index=self.windows,
                manifest=manifest,
                target=shadow,
                effect=behaviour.effect(self.plan.profile, shadow.release),
                candidate=self.traits(shadow.release),
                serving=self.traits(manifest.release),
                spec=self.ctx.config.telemetry,
            )
            if link.publish("results", results):
                self.ctx.stats.shadow_windows += 1
        self.windows += 1
        if link.publish("telemetry", payload):
            self.ctx.stats.windows += 1
            return True
        return False

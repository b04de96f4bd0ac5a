"""One simulated device: check-in, the update chain with its reports, telemetry windows.

The update walks the agent's own state machine (``agent.update.state_machine``:
``UpdateRecord.advance`` over the one transition table) and reports each
state exactly as ``agent.update.updater`` does: an ``update`` event per transition
with ``{target, slot, reason}``, the ``download`` bandwidth report, and the
``golden_set`` score during the smoke test when the release ships one, which
fails the smoke test below the release minimum (``agent.update.smoke``). HTTP copies
of the events are batched by the agent's own ``agent.transport.event_queue``. Target
metadata is verified with TUF once for the fleet (``SharedArtifacts``), but each
device makes its own requests (``device_fetch``): a metadata refresh per update,
then its own delta or full file and its golden set when it does not hold it; the
bytes it received go into its ``download`` report and, as the agent's ``aux``
report, the metadata and golden-set bytes.

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
from agent.protocol.api import (
    CheckinResponse,
    DesiredTarget,
    InstalledModel,
    MqttCredentials,
    ShadowTarget,
)
from agent.protocol.manifest import ModelManifest
from agent.transport.event_queue import EventQueue
from agent.update.smoke import golden_set_problem
from agent.update.state_machine import Event, State, UpdateRecord
from server.simulator.artifacts import SharedArtifacts, SignedModel
from server.simulator.behaviour import Behaviour, Traits
from server.simulator.device_fetch import DeviceFetch, KnownMetadata
from server.simulator.http import DeviceHttp
from server.simulator.mqtt_link import MqttLink
from server.simulator.payloads import (
    aux_report,
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
    fetch: DeviceFetch  # each device's own metadata and target requests


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
        self.etag: str | None = None  # of the last 200 check-in answer, for If-None-Match
        self.last_reply: CheckinResponse | None = None  # what a 304 confirms
        self.metadata = KnownMetadata()  # the TUF metadata versions this device holds
        self.golden_held: set[str] = set()  # sha256 of golden sets already downloaded
        self.metadata_bytes = 0  # received since the last aux report, as the agent counts
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
            self.ctx.stats.pushes += 1
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
        # Usually a no-op (the final idle event flushed the queue); after a failed POST it is
        # the one retry before the device goes back to sleep.
        await self.flush_events()
        if committed:
            self.ctx.stats.committed_now()  # reported: the fleet-updated clock stops here
        return committed

    async def _chain(self, desired: DesiredTarget, traits: Traits) -> None:
        """Download to commit; an ``AgentError`` fails the step the record is in."""
        fail_at = self.ctx.config.fail_step if traits.fails_install else None
        artifacts = self.ctx.artifacts
        await self._pause()
        self.metadata_bytes += await self.ctx.fetch.refresh(self.metadata)  # its own refresh
        model = await artifacts.model(desired)  # the TUF check, shared by the fleet
        base = self.active.model if self.active else None
        fetched = await artifacts.fetch(model, base)
        received = 0
        for info in fetched.files:  # this device's own bytes on the wire
            received += await self.ctx.fetch.download(info)
        await self.report(
            "download",
            "done",
            download_report(
                manifest=model.manifest,
                update_id=self.record.update_id or "",
                via=fetched.via,
                bytes_downloaded=received,
                delta_bytes=fetched.delta_bytes,
                fallback=fetched.fallback,
            ),
        )
        if fail_at == "download":
            raise UpdateError("download", f"simulated download failure on {self.plan.profile}")
        await self._go(Event.SUCCESS, via=fetched.via, bytes_downloaded=received)  # -> verify
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
        golden_bytes = 0
        try:
            if spec is not None:
                golden_bytes = await self._golden_set(spec.path)
        finally:  # as the agent: what the update cost besides the model, even on failure
            await self._report_aux(manifest, golden_bytes)
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

    async def _golden_set(self, path: str) -> int:
        """Download the release's golden set unless this device holds it; bytes received."""
        info = await self.ctx.artifacts.signed(path)
        if info.sha256 in self.golden_held:
            return 0
        received = await self.ctx.fetch.download(info)
        self.golden_held.add(info.sha256)
        return received

    async def _report_aux(self, manifest: ModelManifest, golden_bytes: int) -> None:
        """The agent's ``download``/``aux`` report: golden set and metadata bytes."""
        metadata, self.metadata_bytes = self.metadata_bytes, 0
        await self.report(
            "download",
            "aux",
            aux_report(manifest, f"{self.record.update_id}:aux"[:64], golden_bytes, metadata),
        )

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

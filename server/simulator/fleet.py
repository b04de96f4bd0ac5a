"""N simulated devices in one asyncio loop, against a real fleet server.

``Fleet`` enrolls its planned devices over REST (or adopts devices created
beforehand, such as the benchmark's bulk-provisioned ones), gives the linked
ones their own MQTT session, and then runs one task per device: check in
(conditionally, with the last answer's ETag), run the update the director
asks for, sleep until the next poll (the advertised interval with +-10%
jitter) or until a ``checkin`` command on its ``cmd`` topic wakes it. Devices
without a session of their own hear their commands through the shared
``cmd_relay`` when one is configured, else they only poll. One task publishes
every linked device's telemetry window each ``window_s``; another drives
paho's keep-alives.

``FleetThread`` runs a fleet on its own thread and loop for synchronous
callers (tests, the benchmark) that drive the server's REST API meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent import __version__ as AGENT_VERSION  # noqa: N812
from agent.common.errors import AgentError
from agent.protocol.api import DesiredTarget, MqttCredentials
from server.errors import ServerError
from server.simulator.artifacts import ArtifactLimits, SharedArtifacts
from server.simulator.behaviour import Behaviour, draw
from server.simulator.cmd_relay import CommandRelay
from server.simulator.device import Active, Context, SimDevice
from server.simulator.device_fetch import DeviceFetch
from server.simulator.http import DeviceHttp
from server.simulator.mqtt_link import MqttLink
from server.simulator.plan import PlannedDevice, SimConfig, plan_fleet
from server.simulator.stats import FleetStats, Report

log = logging.getLogger(__name__)
T = TypeVar("T")
_YIELD_EVERY = 200  # devices handled between yields to the loop in the fleet-wide loops
_CONNECT_BATCH = 200
_TELEMETRY_SLICES = 20  # a window's publishes go out in this many bursts


class SimulatorError(ServerError):
    """The simulated fleet could not be set up (server unreachable, nothing enrolled)."""


@dataclass(frozen=True)
class Credentials:
    """A device that already exists on the server, with its secrets."""

    hardware_id: str
    device_id: str
    token: str
    mqtt: MqttCredentials | None


class Fleet:
    def __init__(
        self,
        server_url: str,
        config: SimConfig,
        behaviour: Behaviour,
        cache_dir: Path,
        *,
        pinned_root: bytes | None = None,
        artifact_limits: ArtifactLimits | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.config = config
        self.behaviour = behaviour
        self.cache_dir = Path(cache_dir)
        self.pinned_root = pinned_root
        self.artifact_limits = artifact_limits
        self.plan = plan_fleet(config, behaviour)
        self.stats = FleetStats()
        self.devices: list[SimDevice] = []
        self._http: DeviceHttp | None = None
        self._fetch: DeviceFetch | None = None
        self._ctx: Context | None = None
        self.relay: CommandRelay | None = None
        self._by_id: dict[str, SimDevice] = {}
        self._rng = random.Random(behaviour.seed)  # noqa: S311 - poll jitter, not secrets
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    # -- setup ---------------------------------------------------------------------------
    @property
    def http(self) -> DeviceHttp:
        if self._http is None:
            cfg = self.config
            self._http = DeviceHttp(
                self.server_url, cfg.http_connections, cfg.http_timeout_s, self.stats
            )
        return self._http

    @property
    def artifacts_url(self) -> str:
        return (self.config.artifacts_url or self.server_url).rstrip("/")

    def context(self) -> Context:
        if self._ctx is None:
            if self.pinned_root is None:
                raise SimulatorError("no pinned TUF root: give one, or enroll a device first")
            cfg = self.config
            artifacts = SharedArtifacts(
                self.artifacts_url, self.pinned_root, self.cache_dir, self.artifact_limits
            )
            self._fetch = DeviceFetch(
                self.artifacts_url,
                cfg.download_connections,
                cfg.http_timeout_s,
                self.stats,
                user_agent=f"edgefleet-sim/{AGENT_VERSION}",
            )
            self._ctx = Context(cfg, self.behaviour, self.http, artifacts, self.stats, self._fetch)
        return self._ctx

    async def enroll(self, token: str) -> None:
        """Enroll every planned device over REST (re-enrolling rotates its credentials)."""
        slots = asyncio.Semaphore(self.config.enroll_concurrency)
        failures: list[str] = []

        async def one(plan: PlannedDevice) -> Credentials | None:
            async with slots:
                try:
                    reply = await self.http.enroll(
                        token, plan.hardware_id, plan.profile, plan.variants, plan.tags
                    )
                except AgentError as err:
                    failures.append(plan.hardware_id)
                    # The stats count every failure; one line in the log is enough.
                    (log.warning if len(failures) == 1 else log.debug)(
                        "enrolling %s failed: %s", plan.hardware_id, err
                    )
                    return None
            if self.pinned_root is None:
                log.warning("no root.json given; pinning the root the server sent (TOFU)")
                self.pinned_root = json.dumps(reply.tuf_root).encode()
            return Credentials(plan.hardware_id, reply.device_id, reply.device_token, reply.mqtt)

        results = await asyncio.gather(*(one(p) for p in self.plan))
        enrolled = [c for c in results if c is not None]
        if not enrolled:
            raise SimulatorError(f"no device could enroll at {self.server_url}")
        if failures:
            log.warning("%d of %d devices could not enroll", len(failures), len(self.plan))
        await self.adopt(enrolled)

    async def adopt(
        self, creds: Sequence[Credentials], installed: DesiredTarget | None = None
    ) -> None:
        """Simulate devices that exist on the server; ``installed`` is what they run now."""
        by_hw = {p.hardware_id: p for p in self.plan}
        ctx = self.context()
        model = await ctx.artifacts.model(installed) if installed is not None else None
        for c in creds:
            plan = by_hw.get(c.hardware_id)
            if plan is None:
                raise SimulatorError(f"{c.hardware_id} is not a device of this plan")
            device = SimDevice(plan, c.device_id, c.token, c.mqtt, ctx)
            if model is not None:
                device.active = Active(model, "a")
            self.devices.append(device)
            self._by_id[device.device_id] = device
        self.stats.enrolled = len(self.devices)

    async def _connect(self) -> None:
        linked = [d for d in self.devices if d.plan.linked and d.mqtt is not None]
        for at in range(0, len(linked), _CONNECT_BATCH):
            batch = linked[at : at + _CONNECT_BATCH]
            for d in batch:
                assert d.mqtt is not None
                d.link = MqttLink(d.device_id, d.mqtt, self.config.mqtt, d.on_command)
            ok = await asyncio.gather(*(d.link.connect() for d in batch if d.link is not None))
            failed = ok.count(False)
            for _ in range(failed):
                self.stats.error("mqtt: connect failed")
        relay = self.config.relay
        if relay is not None and any(d.link is None for d in self.devices):
            self.relay = CommandRelay(
                # Its own client id per run: two simulators on one broker must not evict each other.
                f"relay-{self.config.prefix}-{secrets.token_hex(3)}",
                relay,
                self.config.mqtt,
                self._route,
            )
            if not await self.relay.connect():
                self.stats.error("mqtt: relay connect failed")

    def _route(self, device_id: str, command: dict[str, Any]) -> None:
        """A command the relay heard, for a device that has no session of its own."""
        device = self._by_id.get(device_id)
        if device is not None and device.link is None and not device.silent:
            device.on_command(command)

    # -- running ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the MQTT links and start every device's loop."""
        await self._connect()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._device_loop(d)) for d in self.devices]
        self._tasks.append(loop.create_task(self._telemetry_loop()))
        self._tasks.append(loop.create_task(self._misc_loop()))

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for d in self.devices:
            if d.link is not None:
                await d.link.close()
        if self.relay is not None:
            await self.relay.close()
        if self._http is not None:
            await self._http.close()
        if self._fetch is not None:
            await self._fetch.close()

    def _interval(self, advertised: float | None) -> float:
        """The next wait: the configured or advertised interval, jittered as the agent."""
        cfg = self.config
        if cfg.poll_s is not None:
            base = cfg.poll_s
        else:
            base = max(cfg.min_poll_s, advertised if advertised is not None else 30.0)
        return base * self._rng.uniform(1.0 - cfg.poll_jitter, 1.0 + cfg.poll_jitter)

    async def _sleep(self, device: SimDevice, seconds: float) -> None:
        """Until the next poll, or earlier when a command wakes the device."""
        if device.link is None and self.relay is None:  # no command can come: a plain timer
            await asyncio.sleep(seconds)
            return
        wake = device.wake
        if not wake.is_set():
            # A timer that sets the event is far cheaper than wait_for's task per sleep.
            timer = asyncio.get_running_loop().call_later(seconds, wake.set)
            try:
                await wake.wait()
            finally:
                timer.cancel()
        wake.clear()

    async def _device_loop(self, device: SimDevice) -> None:
        cfg = self.config
        spread = cfg.first_checkin_s
        if spread is None:
            spread = cfg.poll_s if cfg.poll_s is not None else 30.0
        await self._sleep(
            device, spread * draw(self.behaviour.seed, device.plan.hardware_id, "first-checkin")
        )
        advertised: float | None = None
        while not self._stopping.is_set() and not device.silent:
            try:
                if device.events:  # as the agent: what an earlier flush could not deliver
                    await device.flush_events()
                result = await self.http.checkin(
                    device.device_id, device.token, "idle", device.installed(), device.etag
                )
                if result.reply is not None:
                    device.last_reply, device.etag = result.reply, result.etag
                reply = device.last_reply  # a 304 says the last answer still holds
                if reply is not None:
                    advertised = reply.poll_interval_s
                    device.shadow = reply.shadow
                    if device.wants(reply.desired):
                        assert reply.desired is not None
                        await device.update(reply.desired)
            except AgentError as err:
                log.debug("device %s: %s", device.device_id, err)
            except Exception as err:  # a simulator bug must show, not kill the device
                log.exception("device %s failed", device.device_id)
                self.stats.error(f"internal: {type(err).__name__}")
            await self._sleep(device, self._interval(advertised))

    async def _telemetry_loop(self) -> None:
        """Each linked device's window every ``window_s``, spread evenly over the window."""
        window = self.config.telemetry.window_s
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            began = loop.time()
            devices = [d for d in self.devices if d.link is not None and not d.silent]
            slices = max(1, min(len(devices), _TELEMETRY_SLICES))
            per = -(-len(devices) // slices)
            for k in range(slices):
                for device in devices[k * per : (k + 1) * per]:
                    device.publish_window()
                await asyncio.sleep(max(0.0, began + (k + 1) * window / slices - loop.time()))

    async def _misc_loop(self) -> None:
        while not self._stopping.is_set():
            if self.relay is not None:
                self.relay.misc()
            for i, device in enumerate(self.devices):
                if device.link is not None:
                    device.link.misc()
                if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            await asyncio.sleep(self.config.mqtt.misc_interval_s)

    # -- reporting -------------------------------------------------------------------------
    def releases(self) -> dict[str, int]:
        running: Counter[str] = Counter()
        for d in self.devices:
            m = d.active.model.manifest if d.active else None
            running[f"{m.name}@{m.release}" if m else "none"] += 1
        return dict(running)

    def report(self) -> Report:
        links = [d.link for d in self.devices if d.link is not None]
        dropped = sum(link.dropped for link in links)
        if (
            self.relay is not None
            and self.relay.refused
            and "mqtt: relay refused" not in (self.stats.errors)
        ):
            self.stats.error("mqtt: relay refused")
        return self.stats.report(self.releases(), dropped, len(links))


class FleetThread:
    """A fleet on its own thread and event loop, for synchronous callers."""

    def __init__(self, make: Callable[[], Fleet]) -> None:
        self._make = make
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._fleet: Fleet | None = None
        self._done: asyncio.Event | None = None

    def start(self, setup: Callable[[Fleet], Awaitable[None]], timeout_s: float = 300.0) -> None:
        """Build the fleet, run ``setup`` (enroll or adopt), then start every device."""
        ready: Future[None] = Future()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._done = asyncio.Event()
            try:
                self._fleet = self._make()
                await setup(self._fleet)
                await self._fleet.start()
            except BaseException as err:
                ready.set_exception(err)
                if self._fleet is not None:
                    await self._fleet.stop()
                return
            ready.set_result(None)
            await self._done.wait()
            await self._fleet.stop()

        self._thread = threading.Thread(
            target=lambda: asyncio.run(main()), name="sim-fleet", daemon=True
        )
        self._thread.start()
        ready.result(timeout=timeout_s)

    def call(self, fn: Callable[[Fleet], T], timeout_s: float = 30.0) -> T:
        """Run ``fn(fleet)`` on the fleet's loop (no data races) and return its result."""
        if self._loop is None or self._fleet is None:
            raise SimulatorError("the fleet is not running")
        fleet = self._fleet

        async def run() -> T:
            return fn(fleet)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def run(self, fn: Callable[[Fleet], Coroutine[Any, Any, T]], timeout_s: float = 30.0) -> T:
        """Await ``fn(fleet)`` on the fleet's loop and return its result."""
        if self._loop is None or self._fleet is None:
            raise SimulatorError("the fleet is not running")
        return asyncio.run_coroutine_threadsafe(fn(self._fleet), self._loop).result(timeout_s)

    def report(self) -> Report:
        return self.call(lambda fleet: fleet.report())

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

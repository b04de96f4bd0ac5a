"""The simulator's limits and the plan of which devices to simulate (pure).

``SimConfig`` holds every knob and bound of a run; ``plan_fleet`` turns a
count, a behaviour and a name prefix into the devices' hardware ids,
profiles and tags. Hardware ids are stable, so running the same plan again
re-enrolls the same server-side devices instead of adding new ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.protocol.api import MqttCredentials
from server.errors import InvalidInputError
from server.simulator.behaviour import Behaviour, draw
from server.simulator.mqtt_link import LinkLimits
from server.simulator.payloads import WindowSpec

MAX_DEVICES = 200_000
_PREFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
EVENT_ROUTES = ("both", "http", "mqtt")
FAIL_STEPS = ("download", "smoke_test", "health")


@dataclass(frozen=True)
class SimConfig:
    """Every limit of a simulator run."""

    devices: int = 100
    prefix: str = "sim"  # hardware ids are "<prefix>-000042"
    stores: int = 50  # store=<prefix>-s<n> tags, spread over regions
    regions: int = 5
    extra_tags: tuple[tuple[str, str], ...] = ()
    http_connections: int = 32  # concurrent HTTP requests (the connection pool)
    http_timeout_s: float = 30.0
    enroll_concurrency: int = 16
    poll_s: float | None = None  # None: what the server says in each check-in reply
    min_poll_s: float = 0.2
    poll_jitter: float = 0.1  # each wait is interval * uniform(1 - j, 1 + j), as the agent
    first_checkin_s: float | None = None  # spread of the first check-ins (default: poll_s or 30)
    artifacts_url: str | None = None  # base of /tuf/metadata/ and /tuf/targets/ (the server)
    download_connections: int = 16  # concurrent metadata and target requests of the fleet
    relay: MqttCredentials | None = None  # a login that may read every cmd topic: commands
    # for devices without their own MQTT link (``cmd_relay``); None: those devices only poll
    mqtt_devices: int | None = None  # devices with their own MQTT link; None: all
    events: str = "both"  # how linked devices report events (unlinked ones use HTTP)
    fail_step: str = "smoke_test"  # where a simulated install failure strikes
    step_s: float = 0.0  # simulated time each update step takes
    max_attempts: int = 3  # per target, as the agent (agent.update.updater.MAX_ATTEMPTS_PER_TARGET)
    telemetry: WindowSpec = field(default_factory=WindowSpec)
    mqtt: LinkLimits = field(default_factory=LinkLimits)
    golden_count: int = 100  # samples a simulated golden-set report claims

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise InvalidInputError(f"devices must be within 1..{MAX_DEVICES}")
        if not _PREFIX.match(self.prefix):
            raise InvalidInputError(f"prefix {self.prefix[:40]!r} must match {_PREFIX.pattern}")
        if self.stores < 1 or self.regions < 1 or self.regions > self.stores:
            raise InvalidInputError("need 1 <= regions <= stores")
        if min(self.http_connections, self.enroll_concurrency, self.max_attempts) < 1:
            raise InvalidInputError("http_connections, enroll_concurrency, max_attempts >= 1")
        self._check_polling()
        if self.http_timeout_s <= 0 or self.min_poll_s <= 0 or self.step_s < 0:
            raise InvalidInputError("timeouts and poll intervals must be positive")
        if self.poll_s is not None and self.poll_s < self.min_poll_s:
            raise InvalidInputError(f"poll_s must be at least {self.min_poll_s}")
        if self.mqtt_devices is not None and self.mqtt_devices < 0:
            raise InvalidInputError("mqtt_devices must not be negative")
        if self.events not in EVENT_ROUTES:
            raise InvalidInputError(f"events must be one of {', '.join(EVENT_ROUTES)}")
        if self.fail_step not in FAIL_STEPS:
            raise InvalidInputError(f"fail_step must be one of {', '.join(FAIL_STEPS)}")
        if self.telemetry.window_s <= 0 or self.telemetry.fps <= 0:
            raise InvalidInputError("telemetry window_s and fps must be positive")

    def _check_polling(self) -> None:
        if self.download_connections < 1:
            raise InvalidInputError("download_connections must be at least 1")
        if not 0 <= self.poll_jitter < 1:
            raise InvalidInputError("poll_jitter must be within [0, 1)")
        if self.first_checkin_s is not None and self.first_checkin_s < 0:
            raise InvalidInputError("first_checkin_s must not be negative")

    @property
    def linked(self) -> int:
        """How many devices get an MQTT link (the first ones of the plan)."""
        return self.devices if self.mqtt_devices is None else min(self.mqtt_devices, self.devices)


@dataclass(frozen=True)
class PlannedDevice:
    index: int
    hardware_id: str
    profile: str
    tags: dict[str, str]
    variants: tuple[str, ...]
    linked: bool  # has its own MQTT link (telemetry, events, commands)


def plan_fleet(config: SimConfig, behaviour: Behaviour) -> list[PlannedDevice]:
    """The devices of a run: stable ids, profiles in proportion, store/region tags.

    Linked devices are picked evenly across the fleet (every k-th device), so a
    sampled run still has telemetry from every profile and store.
    """
    profiles = behaviour.assign_profiles(config.devices)
    linked = config.linked
    step = config.devices / linked if linked else 0.0
    chosen = {int(i * step) for i in range(linked)}
    out: list[PlannedDevice] = []
    for i, profile in enumerate(profiles):
        store = int(draw(behaviour.seed, config.prefix, "store", i) * config.stores)
        tags = {
            "fleet": config.prefix,
            "store": f"{config.prefix}-s{store}",
            "region": f"{config.prefix}-r{store % config.regions}",
            **dict(config.extra_tags),
        }
        out.append(
            PlannedDevice(
                index=i,
                hardware_id=f"{config.prefix}-{i:06d}",
                profile=profile,
                tags=tags,
                variants=behaviour.profile(profile).variants,
                linked=i in chosen,
            )
        )
    return out

"""REST wire shapes between agent and server (JSON bodies of /api/v1/...).

The server's pydantic models mirror these; the agent parses answers with the
strict ``from_json`` constructors so a malformed reply is a ``ProtocolError``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agent.common.errors import ProtocolError
from agent.protocol.manifest import check_sha256
from agent.protocol.topics import check_device_id

API_PREFIX = "/api/v1"
ENROLL_PATH = f"{API_PREFIX}/enroll"
CHECKIN_PATH = f"{API_PREFIX}/devices/{{device_id}}/checkin"
EVENTS_PATH = f"{API_PREFIX}/devices/{{device_id}}/events"
# Several events in one POST: ``{"events": [{"type", "state", "detail"}, ...]}`` -> 201
# ``{"stored": n}``. An update's steps are sent together, not one request each.
EVENTS_BATCH_PATH = f"{API_PREFIX}/devices/{{device_id}}/events/batch"
MAX_EVENT_BATCH = 64
# Device-authenticated: a new device token and MQTT password, ``{"device_id", "device_token",
# "mqtt"}``; the old ones stop working.
CREDENTIALS_PATH = f"{API_PREFIX}/devices/{{device_id}}/credentials"
TUF_METADATA_PREFIX = "/tuf/metadata/"
TUF_TARGETS_PREFIX = "/tuf/targets/"


def _field(data: Any, key: str, kind: type) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
        raise ProtocolError(f"server reply lacks a valid {key!r}")
    return data[key]


@dataclass(frozen=True)
class MqttCredentials:
    host: str
    port: int
    username: str
    password: str
    tls: bool = False

    @classmethod
    def from_json(cls, data: Any) -> MqttCredentials:
        return cls(
            host=_field(data, "host", str),
            port=_field(data, "port", int),
            username=_field(data, "username", str),
            password=_field(data, "password", str),
            tls=bool(data.get("tls", False)),
        )


@dataclass(frozen=True)
class EnrollResponse:
    device_id: str
    device_token: str
    mqtt: MqttCredentials
    tuf_root: dict[str, Any]
    # Where /tuf/metadata/ and /tuf/targets/ are served (a CDN, a bucket): None, the server.
    tuf_url: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> EnrollResponse:
        tuf_url = data.get("tuf_url") if isinstance(data, dict) else None
        if tuf_url is not None and not (
            isinstance(tuf_url, str) and tuf_url.startswith(("http://", "https://"))
        ):
            raise ProtocolError("server reply has a tuf_url that is not an http(s) URL")
        return cls(
            device_id=check_device_id(_field(data, "device_id", str)),
            device_token=_field(data, "device_token", str),
            mqtt=MqttCredentials.from_json(_field(data, "mqtt", dict)),
            tuf_root=_field(data, "tuf_root", dict),
            tuf_url=tuf_url,
        )


@dataclass(frozen=True)
class CredentialsResponse:
    """The answer to a credential rotation (``CREDENTIALS_PATH``)."""

    device_id: str
    device_token: str
    mqtt: MqttCredentials

    @classmethod
    def from_json(cls, data: Any) -> CredentialsResponse:
        return cls(
            device_id=check_device_id(_field(data, "device_id", str)),
            device_token=_field(data, "device_token", str),
            mqtt=MqttCredentials.from_json(_field(data, "mqtt", dict)),
        )


@dataclass(frozen=True)
class InstalledModel:
    """What a device runs now, as it reports in each check-in."""

    name: str
    release: int
    variant: str
    sha256: str
    slot: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DesiredTarget:
    """The director's answer: which signed target this device should run."""

    target_path: str
    name: str
    release: int
    variant: str

    @classmethod
    def from_json(cls, data: Any) -> DesiredTarget:
        return cls(
            target_path=_field(data, "target_path", str),
            name=_field(data, "name", str),
            release=_field(data, "release", int),
            variant=_field(data, "variant", str),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAX_SHADOW_EVERY_N = 10_000


@dataclass(frozen=True)
class ShadowTarget:
    """A rollout's candidate to run beside the serving model on 1 frame in ``every_n``.

    ``cpu_budget`` is the share of one core's wall time the candidate may use.
    The target is named like a ``DesiredTarget``: TUF, not the director, says
    what the file is.
    """

    rollout_id: str
    target_path: str
    name: str
    release: int
    variant: str
    every_n: int
    cpu_budget: float

    @classmethod
    def from_json(cls, data: Any) -> ShadowTarget:
        every_n = _field(data, "every_n", int)
        budget = _field(data, "cpu_budget", (int, float))  # type: ignore[arg-type]
        release = _field(data, "release", int)
        if any(isinstance(data[k], bool) for k in ("every_n", "cpu_budget", "release")):
            raise ProtocolError("shadow every_n, cpu_budget and release must be numbers")
        if not 1 <= every_n <= MAX_SHADOW_EVERY_N:
            raise ProtocolError(f"shadow every_n {every_n} is not in 1..{MAX_SHADOW_EVERY_N}")
        if not 0.0 < float(budget) <= 1.0:  # also refuses NaN
            raise ProtocolError(f"shadow cpu_budget {budget} is not in (0, 1]")
        return cls(
            rollout_id=_field(data, "rollout_id", str),
            target_path=_field(data, "target_path", str),
            name=_field(data, "name", str),
            release=release,
            variant=_field(data, "variant", str),
            every_n=every_n,
            cpu_budget=float(budget),
        )

    @property
    def desired(self) -> DesiredTarget:
        """The same target in the shape the TUF fetcher checks a manifest against."""
        return DesiredTarget(self.target_path, self.name, self.release, self.variant)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckinResponse:
    """The check-in answer. ``poll_interval_s`` is the fallback: a server that pushes
    ``{"action": "checkin"}`` on the device's ``cmd`` topic asks for a long one.

    ``etag`` is the answer's HTTP ETag (not in the body): sent back as
    ``If-None-Match``, the server answers 304 with no body while nothing changed.
    """

    desired: DesiredTarget | None
    poll_interval_s: float
    shadow: ShadowTarget | None = None  # absent in replies from servers before shadowing
    etag: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> CheckinResponse:
        raw = data.get("desired") if isinstance(data, dict) else None
        interval = _field(data, "poll_interval_s", (int, float))  # type: ignore[arg-type]
        shadow = data.get("shadow")
        return cls(
            desired=DesiredTarget.from_json(raw) if raw is not None else None,
            poll_interval_s=float(interval),
            shadow=ShadowTarget.from_json(shadow) if shadow is not None else None,
        )


def checkin_body(
    state: str, installed: InstalledModel | None, agent_version: str
) -> dict[str, Any]:
    if installed is not None:
        check_sha256(installed.sha256)
    return {
        "state": state,
        "installed": installed.to_json() if installed else None,
        "agent_version": agent_version,
    }

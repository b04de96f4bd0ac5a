"""Pydantic request and response models of REST v1.

Device-facing answers mirror ``agent/protocol/api.py`` field for field. Input
is strict (no "5" for 5) and bounded; device requests ignore unknown fields so
newer agents keep working, operator requests forbid them to catch typos.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from agent.protocol.api import MAX_EVENT_BATCH
from agent.protocol.manifest import VARIANTS
from server.config import MqttEndpoint
from server.db.queries import TAG_KEY, TAG_VALUE, parse_tag
from server.db.tables import as_utc
from server.errors import ServerError

DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MODEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
SHA256 = r"^[0-9a-f]{64}$"
MAX_RELEASE = 2**31 - 1

Secret = Annotated[str, StringConstraints(min_length=1, max_length=256)]
HardwareId = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")]
Profile = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z.+-]{1,32}$")]
State = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME)]
Release = Annotated[int, Field(ge=1, le=MAX_RELEASE)]
Variant = Annotated[str, StringConstraints(max_length=32)]
TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY.pattern)]
TagValue = Annotated[str, StringConstraints(pattern=TAG_VALUE.pattern)]
# SQLite returns naive datetimes; every stored time is UTC, so say so on the wire.
UtcTime = Annotated[datetime, AfterValidator(as_utc)]


def _check_variant(value: str) -> str:
    if value not in VARIANTS:
        raise ValueError(f"unknown variant {value[:32]!r}; expected one of {', '.join(VARIANTS)}")
    return value


class _DeviceInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _OperatorInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class EnrollIn(_DeviceInput):
    token: Secret
    hardware_id: HardwareId
    profile: Profile
    variant_preference: Annotated[list[Variant], Field(min_length=1, max_length=len(VARIANTS))]
    tags: Annotated[dict[TagKey, TagValue], Field(max_length=64)] = Field(default_factory=dict)
    agent_version: Version
    # An enrolled hardware id is refused (409) unless the caller means to take it over.
    replace: bool = False

    @field_validator("variant_preference")
    @classmethod
    def _variants(cls, value: list[str]) -> list[str]:
        for variant in value:
            _check_variant(variant)
        if len(set(value)) != len(value):
            raise ValueError("variant_preference lists a variant twice")
        return value


class MqttOut(BaseModel):
    host: str
    port: int
    username: str
    password: str
    tls: bool

    @classmethod
    def login(cls, public: MqttEndpoint, device_id: str, password: str) -> MqttOut:
        """The broker address devices use, with this device's new MQTT login."""
        return cls(
            host=public.host, port=public.port, username=device_id, password=password,
            tls=public.tls,
        )  # fmt: skip


class EnrollOut(BaseModel):
    device_id: str
    device_token: str
    mqtt: MqttOut
    tuf_root: dict[str, Any]
    tuf_url: str | None = None  # base of /tuf/ when not this server (--targets-url)


class InstalledIn(_DeviceInput):
    name: ModelName
    release: Release
    variant: Variant
    sha256: Annotated[str, StringConstraints(pattern=SHA256)]
    slot: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,16}$")]

    _variant = field_validator("variant")(_check_variant)


class CheckinIn(_DeviceInput):
    state: State
    installed: InstalledIn | None = None
    agent_version: Version


class DesiredOut(BaseModel):
    target_path: str
    name: str
    release: int
    variant: str


class ShadowOut(BaseModel):
    """A candidate to run beside the serving model on 1 frame in ``every_n``."""

    rollout_id: str
    target_path: str
    name: str
    release: int
    variant: str
    every_n: int
    cpu_budget: float  # share of one core's time


class CheckinOut(BaseModel):
    desired: DesiredOut | None
    poll_interval_s: float
    shadow: ShadowOut | None = None


class EventIn(_DeviceInput):
    type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    state: State | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class EventBatchIn(_DeviceInput):
    """Several events of one device, oldest first; each is checked exactly like ``EventIn``."""

    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENT_BATCH)]


class AssignmentIn(_OperatorInput):
    name: ModelName
    release: Release
    device_id: Annotated[str, StringConstraints(pattern=DEVICE_ID)] | None = None
    tag: Annotated[str, StringConstraints(max_length=200)] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> AssignmentIn:
        if (self.device_id is None) == (self.tag is None):
            raise ValueError("give exactly one of device_id or tag")
        if self.tag is not None:
            try:
                parse_tag(self.tag)
            except ServerError as err:
                raise ValueError(str(err)) from err
        return self


class TokenIn(_OperatorInput):
    max_uses: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    expires_in_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None
    note: Annotated[str, StringConstraints(max_length=200)] = ""


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class InstalledOut(BaseModel):
    name: str
    release: int
    variant: str
    sha256: str
    slot: str


class DeviceOut(_Out):
    id: str
    hardware_id: str
    profile: str
    variant_preference: list[str]
    tags: dict[str, str]
    state: str
    agent_version: str
    created_at: UtcTime
    last_seen: UtcTime | None
    installed: InstalledOut | None


class EventOut(_Out):
    time: UtcTime
    type: str
    state: str | None
    source: str
    detail: dict[str, Any]


class TelemetryOut(_Out):
    channel: str
    received_at: UtcTime
    payload: dict[str, Any]


class DeviceDetailOut(DeviceOut):
    desired: DesiredOut | None
    telemetry: dict[str, TelemetryOut]
    events: list[EventOut]


class DeltaOut(BaseModel):
    base_release: int
    base_sha256: str
    target_path: str
    length: int
    method: str


class OverrideOut(BaseModel):
    reason: str
    by: str
    at: UtcTime


class GateOut(BaseModel):
    """The accuracy gate's verdict on a release published with its FP32 original."""

    decision: str
    passed: bool
    failed_classes: list[str]
    overall: dict[str, Any] | None  # n, reference, candidate, drop (points)
    summary: str
    override: OverrideOut | None  # set when an operator shipped a refused release


class ModelOut(_Out):
    name: str
    release: int
    variant: str
    sha256: str
    length: int
    target_path: str
    fp32_length: int | None
    labels: list[str]
    created_at: UtcTime
    deltas: list[DeltaOut] = []
    input: dict[str, Any] | None = None  # the signed input contract; None before contracts
    input_notes: list[str] = []  # publish only: where the contract came from
    gate: GateOut | None = None  # None when published without fp32 and validation


class AssignmentOut(_Out):
    id: int
    name: str
    release: int
    target_kind: str
    target_value: str
    created_at: UtcTime


class TokenOut(BaseModel):
    token: str
    expires_at: UtcTime | None
    max_uses: int | None
    note: str


class ErrorOut(BaseModel):
    error: str

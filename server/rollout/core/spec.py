"""What an operator asks for: a rollout spec, parsed and validated from plain text.

Pure: no IO. Every piece of operator input (``"1%,10%,50%,100%"``, ``"30m"``,
``"2%"``, ``"store=17"``, a cron line) goes through one parser here, and bad input
is an ``InvalidInputError`` that names the option and says what is expected.
``RolloutSpec.to_json``/``from_json`` is the stored form.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from fractions import Fraction
from typing import Any

from agent.common.errors import ProtocolError
from agent.protocol.manifest import VARIANTS, check_name
from agent.protocol.topics import check_device_id
from server.errors import InvalidInputError
from server.rollout.core.cron import MaintenanceWindow, parse_window
from server.rollout.core.gates import GateLimits
from server.rollout.core.shadow import ShadowLimits
from server.rollout.core.units import (
    HUNDRED,
    Amount,
    format_duration,
    parse_amount,
    parse_duration,
    parse_whole,
    text_of,
)

# Same shapes as server.db.queries' tag rules, repeated so this core needs no database code.
TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TAG_VALUE = re.compile(r"^[\w.:/@+-]{1,128}$")


@dataclass(frozen=True)
class SpecLimits:
    """Bounds on operator input."""

    max_stages: int = 20
    max_duration: timedelta = timedelta(days=30)  # soak and timeout
    max_selector_devices: int = 100_000
    max_selector_items: int = 64  # tags and profiles
    max_concurrent_downloads: int = 100_000
    max_window: timedelta = timedelta(days=7)


DEFAULT_LIMITS = SpecLimits()


def parse_stage_sizes(value: object, limits: SpecLimits = DEFAULT_LIMITS) -> tuple[Amount, ...]:
    """``"1%,10%,50%,100%"`` or counts then percentages, like ``"5,50,25%,100%"``.

    Sizes are cumulative. Counts must rise, percentages must rise, no count may
    follow a percentage (which is larger depends on the fleet), and the last
    stage must be 100% so that every selected device is covered.
    """
    text = text_of(value, "stages")
    items = [item.strip() for item in text.split(",")]
    if not text or any(not item for item in items):
        raise InvalidInputError(
            f"stages {text[:80]!r}: give a comma-separated list like 1%,10%,100%"
        )
    if len(items) > limits.max_stages:
        raise InvalidInputError(f"at most {limits.max_stages} stages are allowed, got {len(items)}")
    sizes = tuple(
        parse_amount(item, f"stage {i + 1} size", allow_zero=False) for i, item in enumerate(items)
    )
    check_stage_sizes(sizes)
    return sizes


def check_stage_sizes(sizes: Sequence[Amount]) -> None:
    if not sizes:
        raise InvalidInputError("a rollout needs at least one stage")
    for i in range(1, len(sizes)):
        before, now = sizes[i - 1], sizes[i]
        if before.percent and not now.percent:
            raise InvalidInputError(
                f"stage {i + 1} ({now}) is a count after a percentage ({before}); "
                "put counts first, like 5,50,25%,100%"
            )
        if before.percent == now.percent and now.value <= before.value:
            raise InvalidInputError(
                f"stage sizes must increase: stage {i + 1} ({now}) is not larger than "
                f"stage {i} ({before})"
            )
    last = sizes[-1]
    if not (last.percent and last.value == HUNDRED):
        raise InvalidInputError(
            f"the last stage must be 100% so every selected device is covered, got {last}"
        )


TWO_PERCENT = Amount(Fraction(2), percent=True)
DEFAULT_GATES = GateLimits()


@dataclass(frozen=True)
class StageSpec:
    """One stage. ``size`` is cumulative; ``success=None`` means every device that
    is not within the failure budget must succeed."""

    size: Amount
    soak: timedelta = timedelta(minutes=30)
    timeout: timedelta = timedelta(hours=1)
    success: Amount | None = None
    max_failures: Amount = TWO_PERCENT
    gates: GateLimits = DEFAULT_GATES
    approval: bool = False  # wait for an operator after this stage

    def to_json(self) -> dict[str, Any]:
        return {
            "size": str(self.size),
            "soak": format_duration(self.soak),
            "timeout": format_duration(self.timeout),
            "success": None if self.success is None else str(self.success),
            "max_failures": str(self.max_failures),
            "gates": self.gates.to_json(),
            "approval": self.approval,
        }


def stage_from_json(data: Any, index: int, limits: SpecLimits = DEFAULT_LIMITS) -> StageSpec:
    what = f"stage {index + 1}"
    longest = limits.max_duration
    if not isinstance(data, dict):
        raise InvalidInputError(f"{what} must be an object")
    base = StageSpec(size=parse_amount(data.get("size"), f"{what} size", allow_zero=False))
    success = data.get("success")
    return replace(
        base,
        soak=parse_duration(
            data.get("soak", "30m"), f"{what} soak", allow_zero=True, longest=longest
        ),
        timeout=parse_duration(data.get("timeout", "1h"), f"{what} timeout", longest=longest),
        success=(
            None if success is None else parse_amount(success, f"{what} success", allow_zero=False)
        ),
        max_failures=parse_amount(data.get("max_failures", "2%"), f"{what} max-failures"),
        gates=GateLimits.from_json(data.get("gates") or {}),
        approval=_flag(data.get("approval", False), f"{what} approval"),
    )


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets; every given criterion must hold.

    Tags with the same key are alternatives (``store=1 store=2``); different
    keys must all match; ``profiles`` are alternatives; ``devices`` is an
    explicit list. ``all_devices`` is the deliberate way to select everything.
    """

    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    profiles: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    all_devices: bool = False

    def matches(self, device_id: str, profile: str, tags: Mapping[str, str]) -> bool:
        if self.devices:  # sorted: a binary search, not a scan of 65,000 ids
            at = bisect.bisect_left(self.devices, device_id)
            if at == len(self.devices) or self.devices[at] != device_id:
                return False
        if self.profiles and profile not in self.profiles:
            return False
        return all(tags.get(key) in values for key, values in self.tags)

    def tag_selectors(self) -> list[str]:
        return [f"{key}={value}" for key, values in self.tags for value in values]

    def to_json(self) -> dict[str, Any]:
        return {
            "tags": self.tag_selectors(),
            "profiles": list(self.profiles),
            "devices": list(self.devices),
            "all": self.all_devices,
        }


def parse_selector(
    tags: Iterable[str] = (),
    profiles: Iterable[str] = (),
    devices: Iterable[str] = (),
    all_devices: bool = False,
    limits: SpecLimits = DEFAULT_LIMITS,
) -> Selector:
    grouped: dict[str, set[str]] = {}
    for raw in tags:
        key, sep, value = text_of(raw, "selector tag").partition("=")
        if not sep or not TAG_KEY.match(key) or not TAG_VALUE.match(value):
            raise InvalidInputError(
                f"selector {raw[:80]!r} must look like key=value, e.g. store=17"
            )
        grouped.setdefault(key, set()).add(value)
    profile_list = sorted({text_of(p, "profile") for p in profiles})
    for profile in profile_list:
        if not TAG_KEY.match(profile):
            raise InvalidInputError(f"profile {profile[:80]!r} is not a valid profile name")
    device_list = sorted({text_of(d, "device id") for d in devices})
    for device in device_list:
        try:
            check_device_id(device)
        except ProtocolError as err:
            raise InvalidInputError(str(err)) from err
    if len(device_list) > limits.max_selector_devices:
        raise InvalidInputError(f"at most {limits.max_selector_devices} devices may be listed")
    if len(grouped) + len(profile_list) > limits.max_selector_items:
        raise InvalidInputError(f"at most {limits.max_selector_items} tag keys and profiles")
    selector = Selector(
        tags=tuple((k, tuple(sorted(v))) for k, v in sorted(grouped.items())),
        profiles=tuple(profile_list),
        devices=tuple(device_list),
        all_devices=all_devices,
    )
    if not (selector.tags or selector.profiles or selector.devices or all_devices):
        raise InvalidInputError(
            "the rollout selects no devices: give tags (store=17), a profile, a device list, "
            "or ask for all devices explicitly"
        )
    return selector


@dataclass(frozen=True)
class ReleaseRef:
    name: str
    release: int

    def __str__(self) -> str:
        return f"{self.name}@{self.release}"


def parse_release(value: object) -> ReleaseRef:
    """``"digits@2"``: a model name and its release counter."""
    text = text_of(value, "release")
    name, sep, number = text.partition("@")
    if not sep or not number.isdigit() or int(number) < 1:
        raise InvalidInputError(f"release {text[:80]!r} must look like NAME@RELEASE, e.g. digits@2")
    try:
        check_name(name)
    except ProtocolError as err:
        raise InvalidInputError(f"release {text[:80]!r}: {err}") from err
    return ReleaseRef(name, int(number))


@dataclass(frozen=True)
class RolloutSpec:
    """Everything an operator decided about one rollout."""

    release: ReleaseRef
    selector: Selector
    stages: tuple[StageSpec, ...]
    max_concurrent_downloads: int = 100
    window: MaintenanceWindow | None = None
    variants: tuple[tuple[str, str], ...] = field(default=())  # (profile, variant)
    shadow: ShadowLimits | None = None  # each stage shadows the candidate before installing

    @property
    def gates_estimates(self) -> bool:
        """Power gates also count estimated power (by default only sensors are gated)."""
        return any(stage.gates.gate_estimated_power for stage in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "shadow": None if self.shadow is None else self.shadow.to_json(),
            "release": str(self.release),
            "selector": self.selector.to_json(),
            "stages": [stage.to_json() for stage in self.stages],
            "max_concurrent_downloads": self.max_concurrent_downloads,
            "window": None if self.window is None else self.window.to_json(),
            "variants": dict(self.variants),
        }

    @classmethod
    def from_json(cls, data: Any, limits: SpecLimits = DEFAULT_LIMITS) -> RolloutSpec:
        if not isinstance(data, dict):
            raise InvalidInputError("a rollout spec must be an object")
        sel = data.get("selector")
        stages = data.get("stages")
        if not isinstance(sel, dict) or not isinstance(stages, list):
            raise InvalidInputError("a rollout spec needs a selector object and a list of stages")
        if len(stages) > limits.max_stages:
            raise InvalidInputError(f"at most {limits.max_stages} stages are allowed")
        parsed = tuple(stage_from_json(s, i, limits) for i, s in enumerate(stages))
        check_stage_sizes([s.size for s in parsed])
        window = data.get("window")
        if window is not None and not isinstance(window, dict):
            raise InvalidInputError("window must be an object with cron, duration and timezone")
        return cls(
            release=parse_release(data.get("release")),
            selector=parse_selector(
                _list(sel.get("tags")),
                _list(sel.get("profiles")),
                _list(sel.get("devices")),
                _flag(sel.get("all", False), "selector all"),
                limits,
            ),
            stages=parsed,
            max_concurrent_downloads=_downloads(data.get("max_concurrent_downloads", 100), limits),
            window=None
            if window is None
            else parse_window(
                window.get("cron"),
                parse_duration(window.get("duration"), "window duration"),
                window.get("timezone", "UTC"),
                limits.max_window,
            ),
            variants=_variants(data.get("variants") or {}),
            shadow=None if data.get("shadow") is None else ShadowLimits.from_json(data["shadow"]),
        )


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{what} must be true or false")
    return value


def _list(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInputError("selector tags, profiles and devices must be lists")
    return [text_of(item, "selector item") for item in value]


def _downloads(value: object, limits: SpecLimits) -> int:
    count = parse_whole(value, "max-concurrent-downloads", minimum=1)
    if count > limits.max_concurrent_downloads:
        raise InvalidInputError(
            f"max-concurrent-downloads is above {limits.max_concurrent_downloads}"
        )
    return count


def _variants(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise InvalidInputError("variants must map a profile to a variant")
    for profile, variant in value.items():
        if not isinstance(profile, str) or not TAG_KEY.match(profile) or variant not in VARIANTS:
            raise InvalidInputError(
                f"variant {variant!r} for profile {profile!r} is not one of {', '.join(VARIANTS)}"
            )
    return tuple(sorted(value.items()))

"""How simulated devices behave: per-profile baselines and per-release effects.

Pure: no IO. Every random choice is a hash of (seed, device, what, ...), so a
run is reproducible from its seed whatever order the asyncio tasks run in,
and a device keeps the same traits (its speed, whether it fails release 2)
across runs and restarts.

Operator text, as the CLI takes it:

- a profile: ``NAME[:key=value,...]`` with keys ``weight``, ``p95_ms``,
  ``power_mw``, ``power_source`` (sensor|estimate), ``install_failure``,
  ``accuracy``, ``silence`` and ``jitter``, e.g. ``rpi4:weight=2,p95_ms=38``;
- a release effect: ``RELEASE[:PROFILE]:key=value[,...]`` with keys
  ``latency`` and ``power`` (multipliers of the profile's baseline, 1.4 = 40%
  slower), ``install_failure``, ``accuracy`` and ``silence`` (fractions that
  replace the profile's), e.g. ``2:jetson-orin-nano:latency=1.4``; and for a
  release shadowed before it installs, ``agreement`` (the share of frames on
  which it agrees with the serving model) with ``weak_class`` (a class index)
  and ``weak_agreement`` (that class's agreement), e.g. ``2:weak_class=7,weak_agreement=0.4``.

``install_failure`` is the share of devices whose install of a release fails
(at the configured step, so it rolls back or fails as on a real agent, and
again on each retry); ``silence`` the share that stop talking for good the
moment they are told to install it; ``accuracy`` the golden-set score they
report, which fails the smoke test below the release's minimum.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from statistics import NormalDist
from typing import Any

from server.errors import InvalidInputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNIT = NormalDist()
_MAX_Z = 3.0  # clip normal draws so one device is never absurdly fast or slow
POWER_SOURCES = ("sensor", "estimate")


def draw(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and ``parts``."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def normal(seed: int, *parts: object) -> float:
    """A standard normal number fixed by ``seed`` and ``parts``, clipped to +-3."""
    u = min(max(draw(seed, *parts), 1e-12), 1.0 - 1e-12)
    return max(-_MAX_Z, min(_MAX_Z, _UNIT.inv_cdf(u)))


def _check_fractions(what: str, *values: float | None) -> None:
    for value in values:
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidInputError(f"{what}: rates and accuracy must be fractions within 0..1")


@dataclass(frozen=True)
class ProfileBehaviour:
    """A board family's share of the fleet and its behaviour on a neutral release."""

    name: str
    weight: float = 1.0
    p95_ms: float = 20.0
    power_mw: float = 5000.0
    power_source: str = "estimate"
    install_failure: float = 0.0
    accuracy: float = 0.97
    silence: float = 0.0
    jitter: float = 0.05  # spread between devices of the profile (log-normal sigma)
    variants: tuple[str, ...] = ("int8-cpu",)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidInputError(f"profile name {self.name[:64]!r} is not valid")
        if not (self.weight >= 0 and self.p95_ms > 0 and self.power_mw > 0):
            raise InvalidInputError(
                f"profile {self.name}: weight must be >= 0, p95_ms and power_mw > 0"
            )
        if self.power_source not in POWER_SOURCES:
            raise InvalidInputError(f"profile {self.name}: power_source must be sensor or estimate")
        _check_fractions(f"profile {self.name}", self.install_failure, self.accuracy, self.silence)
        if not 0 <= self.jitter <= 1:
            raise InvalidInputError(f"profile {self.name}: jitter must be within 0..1")


@dataclass(frozen=True)
class ReleaseEffect:
    """What one release does to one profile (or to every profile)."""

    latency: float = 1.0
    power: float = 1.0
    install_failure: float | None = None
    accuracy: float | None = None
    silence: float | None = None
    agreement: float = 0.998  # as a shadow candidate, with the serving model
    weak_class: float | None = None  # a class index whose agreement is weak_agreement
    weak_agreement: float = 0.998

    def __post_init__(self) -> None:
        if not (0 < self.latency <= 100 and 0 < self.power <= 100):
            raise InvalidInputError("latency and power multipliers must be within (0, 100]")
        _check_fractions(
            "release effect", self.install_failure, self.accuracy, self.silence, self.agreement,
            self.weak_agreement,
        )  # fmt: skip
        if self.weak_class is not None and (
            self.weak_class < 0 or self.weak_class != int(self.weak_class)
        ):
            raise InvalidInputError("weak_class must be a class index (0, 1, ...)")

    def agreement_of(self, label_index: int) -> float:
        weak = self.weak_class is not None and int(self.weak_class) == label_index
        return self.weak_agreement if weak else self.agreement


NEUTRAL = ReleaseEffect()


@dataclass(frozen=True)
class Traits:
    """One device's behaviour on one release, as drawn from the seed."""

    p95_ms: float
    power_mw: float
    power_source: str
    fails_install: bool
    goes_silent: bool
    accuracy: float


@dataclass(frozen=True)
class Behaviour:
    profiles: tuple[ProfileBehaviour, ...]
    effects: tuple[tuple[int, str | None, ReleaseEffect], ...] = ()  # (release, profile, effect)
    seed: int = 0

    def __post_init__(self) -> None:
        names = [p.name for p in self.profiles]
        if not names or len(set(names)) != len(names):
            raise InvalidInputError("give at least one profile, each name once")
        if sum(p.weight for p in self.profiles) <= 0:
            raise InvalidInputError("profile weights must not all be zero")
        for release, profile, _ in self.effects:
            if profile is not None and profile not in names:
                raise InvalidInputError(
                    f"release {release} effect names profile {profile!r}, which is not simulated"
                )

    def profile(self, name: str) -> ProfileBehaviour:
        for p in self.profiles:
            if p.name == name:
                return p
        raise InvalidInputError(f"profile {name!r} is not simulated")

    def effect(self, profile: str, release: int) -> ReleaseEffect:
        """The profile-specific effect of ``release`` if given, else the fleet-wide one."""
        general = NEUTRAL
        for rel, prof, effect in self.effects:
            if rel == release and prof == profile:
                return effect
            if rel == release and prof is None:
                general = effect
        return general

    def traits(self, hardware_id: str, profile: str, release: int) -> Traits:
        base = self.profile(profile)
        eff = self.effect(profile, release)
        seed = self.seed
        # The device factor does not depend on the release: a device is compared with itself.
        speed = math.exp(base.jitter * normal(seed, hardware_id, "speed"))
        thirst = math.exp(base.jitter * normal(seed, hardware_id, "power"))
        fail = base.install_failure if eff.install_failure is None else eff.install_failure
        silent = base.silence if eff.silence is None else eff.silence
        accuracy = base.accuracy if eff.accuracy is None else eff.accuracy
        return Traits(
            p95_ms=base.p95_ms * eff.latency * speed,
            power_mw=base.power_mw * eff.power * thirst,
            power_source=base.power_source,
            fails_install=draw(seed, hardware_id, "fail", release) < fail,
            goes_silent=draw(seed, hardware_id, "silent", release) < silent,
            accuracy=accuracy,
        )

    def assign_profiles(self, count: int) -> list[str]:
        """``count`` profile names in exact proportion to the weights, deterministically mixed."""
        total = sum(p.weight for p in self.profiles)
        quotas = [p.weight * count / total for p in self.profiles]
        counts = [math.floor(q) for q in quotas]
        # Largest remainder, so the counts add up to ``count`` exactly.
        by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
        for i in by_remainder[: count - sum(counts)]:
            counts[i] += 1
        names = [p.name for p, n in zip(self.profiles, counts, strict=True) for _ in range(n)]
        order = sorted(range(count), key=lambda i: draw(self.seed, "mix", i))
        return [names[i] for i in order]


# The default fleet: typical p95 of a small INT8 classifier and whole-board power.
DEFAULT_PROFILES = (
    ProfileBehaviour("rpi4", weight=3, p95_ms=38.0, power_mw=4200.0),
    ProfileBehaviour("rpi5", weight=3, p95_ms=14.0, power_mw=5600.0, power_source="sensor"),
    ProfileBehaviour(
        "jetson-orin-nano", weight=2, p95_ms=6.0, power_mw=9000.0, power_source="sensor"
    ),
    ProfileBehaviour("x86-gateway", weight=1, p95_ms=3.2, power_mw=15000.0, power_source="sensor"),
    ProfileBehaviour(
        "coral-devboard", weight=1, p95_ms=2.5, power_mw=3100.0, variants=("edgetpu", "int8-cpu")
    ),
)


def _pairs(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise InvalidInputError(f"{what}: {item.strip()[:40]!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def _number(value: str, key: str, what: str) -> float:
    try:
        result = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise InvalidInputError(f"{what}: {key}={value[:20]!r} is not a number") from None
    if not math.isfinite(result):
        raise InvalidInputError(f"{what}: {key} must be finite")
    return result


def _values(cls: type, text: str, skip: Iterable[str], what: str) -> dict[str, Any]:
    """Parsed ``key=value`` pairs for the fields of ``cls`` (all numbers but power_source)."""
    known = {f.name for f in fields(cls)} - set(skip) - {"variants"}
    out: dict[str, Any] = {}
    for key, value in _pairs(text, what).items():
        if key not in known:
            raise InvalidInputError(f"{what}: unknown key {key!r}; use {', '.join(sorted(known))}")
        out[key] = value if key == "power_source" else _number(value, key, what)
    return out


def parse_profile(
    text: str, defaults: Sequence[ProfileBehaviour] = DEFAULT_PROFILES
) -> ProfileBehaviour:
    """``NAME[:key=value,...]``; a known NAME starts from its default behaviour."""
    name, sep, rest = text.strip().partition(":")
    what = f"profile {text.strip()[:80]!r}"
    base = next((p for p in defaults if p.name == name), None) or ProfileBehaviour(name)
    if not sep:
        return base
    return replace(base, **_values(ProfileBehaviour, rest, ("name",), what))


def parse_effect(text: str) -> tuple[int, str | None, ReleaseEffect]:
    """``RELEASE[:PROFILE]:key=value[,...]``, e.g. ``2:jetson-orin-nano:latency=1.4``."""
    what = f"release effect {text.strip()[:80]!r}"
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or int(parts[0]) < 1:
        raise InvalidInputError(
            f"{what} must look like RELEASE[:PROFILE]:key=value, e.g. 2:rpi4:latency=1.4"
        )
    profile = parts[1] if len(parts) == 3 else None
    effect = ReleaseEffect(**_values(ReleaseEffect, parts[-1], (), what))
    return int(parts[0]), profile, effect


def build_behaviour(
    profiles: Iterable[str] = (), effects: Iterable[str] = (), seed: int = 0
) -> Behaviour:
    """The fleet from CLI text; no profiles given means the default mix."""
    chosen = tuple(parse_profile(p) for p in profiles) or DEFAULT_PROFILES
    return Behaviour(chosen, tuple(parse_effect(e) for e in effects), seed)

"""Health gates: per-profile statistics of a rollout's devices, judged against limits.

Pure: no IO. ``GateLimits`` holds one stage's limits as the operator set them.
``ProfileStats`` accumulates one profile's devices in the policy's
single pass; ``judge_profile`` turns it into ``GateResult`` values that carry
the measured number, the limit and the devices involved, so every pause can say
which gate tripped and why.

- install failure rate: failed installs (failed, rolled back, or silent before
  installing) over finished installs;
- p95 latency and power regression: sum over devices of the value on the new
  release over the sum of the same devices' own baselines, minus one; it trips
  only when the mean increase is also above an absolute floor (0.5 ms, 100 mW
  by default), so a 1.5 ms model measured at 1.7 ms does not pause a fleet;
- golden-set accuracy: mean of the accuracies the devices report.

A gate is judged once ``min_sample`` devices (or every device that could
report, when fewer) have reported; until then it holds the stage back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from server.errors import InvalidInputError
from server.rollout.core.states import DeviceFacts
from server.rollout.core.units import (
    HUNDRED,
    format_number,
    parse_fraction,
    parse_number,
    parse_percent,
    parse_whole,
)

INSTALL_FAILURE_RATE = "install_failure_rate"
LATENCY_REGRESSION = "p95_latency_regression"
POWER_REGRESSION = "power_regression"
GOLDEN_ACCURACY = "golden_accuracy"
ERROR_THRESHOLD = "error_threshold"
SUCCESS_THRESHOLD = "success_threshold"


@dataclass(frozen=True)
class GateLimits:
    """Health gates of one stage; None switches a gate off.

    Regressions are percent over each device's own pre-update baseline; the
    install failure rate is percent of finished installs. A gate is judged per
    profile once ``min_sample`` devices (or all of them, if fewer) report.
    """

    max_install_failure: Fraction | None = Fraction(5)
    max_latency_regression: Fraction | None = Fraction(10)
    max_power_regression: Fraction | None = Fraction(10)
    min_golden_accuracy: Fraction | None = None  # 0..1
    max_device_errors: int | None = None  # more runtime errors than this: the device failed
    min_sample: int = 10
    latency_floor_ms: Fraction = Fraction(1, 2)  # mean increase needed besides the percentage
    power_floor_mw: Fraction = Fraction(100)
    gate_estimated_power: bool = False  # power from estimates (not sensors) is not gated

    def to_json(self) -> dict[str, Any]:
        def pct(value: Fraction | None) -> str | None:
            return None if value is None else f"{format_number(value)}%"

        return {
            "max_install_failure": pct(self.max_install_failure),
            "max_latency_regression": pct(self.max_latency_regression),
            "max_power_regression": pct(self.max_power_regression),
            "min_golden_accuracy": pct(
                None if self.min_golden_accuracy is None else self.min_golden_accuracy * 100
            ),
            "max_device_errors": self.max_device_errors,
            "min_sample": self.min_sample,
            "latency_floor_ms": format_number(self.latency_floor_ms),
            "power_floor_mw": format_number(self.power_floor_mw),
            "gate_estimated_power": self.gate_estimated_power,
        }

    @classmethod
    def from_json(cls, data: object) -> GateLimits:
        if not isinstance(data, Mapping):
            raise InvalidInputError("gates must be an object")

        def opt(key: str, parse: Any, default: Any) -> Any:
            if key not in data:
                return default
            raw = data[key]
            return None if raw is None or raw == "off" else parse(raw, key.replace("_", "-"))

        return cls(
            max_install_failure=opt("max_install_failure", parse_percent, cls.max_install_failure),
            max_latency_regression=opt(
                "max_latency_regression", parse_percent, cls.max_latency_regression
            ),
            max_power_regression=opt(
                "max_power_regression", parse_percent, cls.max_power_regression
            ),
            min_golden_accuracy=opt("min_golden_accuracy", parse_fraction, None),
            max_device_errors=opt("max_device_errors", parse_whole, None),
            min_sample=parse_whole(data.get("min_sample", cls.min_sample), "min-sample", minimum=1),
            latency_floor_ms=parse_number(data.get("latency_floor_ms", "0.5"), "latency-floor-ms"),
            power_floor_mw=parse_number(data.get("power_floor_mw", "100"), "power-floor-mw"),
            gate_estimated_power=data.get("gate_estimated_power", False) is True,
        )


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict. ``value`` is None until ``needed`` devices have reported;
    while ``sample < needed`` the gate holds its stage back."""

    name: str
    profile: str | None  # None: the whole stage
    value: float | None
    limit: float
    unit: str  # "%" or "devices"
    bound: str  # "max" or "min"
    tripped: bool
    sample: int
    needed: int
    devices: tuple[str, ...] = ()  # the devices behind a trip; empty when it holds
    detail: str = ""
    stage: int | None = None  # for stage-wide gates
    subject: str = ""  # what within the profile, e.g. "class 'cat'"

    @property
    def waiting(self) -> bool:
        return self.sample < self.needed

    def message(self, listed: int = 10) -> str:
        where = f" on profile {self.profile}" if self.profile else ""
        if self.subject:
            where += f" for {self.subject}"
        if self.stage is not None:
            where += f" in stage {self.stage + 1}"
        if self.value is None and self.detail:
            return f"{self.name}{where}: {self.detail}"
        if self.value is None:
            missing = self.needed - self.sample
            if missing <= 0:
                return f"{self.name}{where}: no device can report yet"
            return f"{self.name}{where}: waiting for data from {missing} more devices"
        if self.bound == "max":
            op = ">" if self.tripped else "<="
        else:
            op = "<" if self.tripped else ">="
        text = (
            f"{self.name}{where}: {_fmt(self.value, self.unit)} {op} "
            f"{'limit' if self.bound == 'max' else 'minimum'} {_fmt(self.limit, self.unit)}"
        )
        if self.detail:
            text += f" ({self.detail})"
        if self.tripped and self.devices:
            names = ", ".join(self.devices[:listed])
            more = f" and {len(self.devices) - listed} more" if len(self.devices) > listed else ""
            text += f"; devices: {names}{more}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "profile": self.profile,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "bound": self.bound,
            "tripped": self.tripped,
            "sample": self.sample,
            "needed": self.needed,
            "devices": list(self.devices),
            "detail": self.detail,
            "stage": self.stage,
            "subject": self.subject,
        }


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f}%" if unit == "%" else f"{value:g} {unit}"


class RegressionSums:
    """One regression gate's running sums: devices' values against their own baselines."""

    __slots__ = ("bad", "base", "cur", "floor", "n", "possible")

    def __init__(self, floor: float = 0.0) -> None:
        self.possible = self.n = 0  # devices with a baseline; those that also reported
        self.base = self.cur = 0.0
        self.floor = floor  # absolute increase a device (and the mean) must exceed
        self.bad: list[str] = []

    def add(self, device_id: str, base: float | None, value: float | None, factor: float) -> None:
        if base is None or base <= 0:
            return
        self.possible += 1
        if value is not None:
            self.n += 1
            self.base += base
            self.cur += value
            if value > base * factor and value - base > self.floor:
                self.bad.append(device_id)

    @property
    def mean_increase(self) -> float:
        return (self.cur - self.base) / self.n if self.n else 0.0


class ProfileStats:
    """Running sums for one profile; plain attributes, since this is the hot loop."""

    __slots__ = (
        "acc_bad",
        "acc_eval",
        "acc_n",
        "acc_sum",
        "finished",
        "install_failed",
        "latency",
        "power",
        "started",
    )

    def __init__(self, latency_floor: float = 0.0, power_floor: float = 0.0) -> None:
        self.started = self.finished = 0
        self.install_failed: list[str] = []
        self.latency = RegressionSums(latency_floor)
        self.power = RegressionSums(power_floor)
        self.acc_eval = self.acc_n = 0
        self.acc_sum = 0.0
        self.acc_bad: list[str] = []

    def add(
        self, d: DeviceFacts, latency: float | None, power: float | None, accuracy: float | None
    ) -> None:
        """Add a succeeded device; the factors are 1 + limit (None: gate off)."""
        if latency is not None:
            self.latency.add(d.device_id, d.baseline_p95_ms, d.p95_ms, latency)
        if power is not None:
            self.power.add(d.device_id, d.baseline_power_mw, d.power_mw, power)
        if accuracy is not None:
            self.acc_eval += 1
            score = d.golden_accuracy
            if score is not None:
                self.acc_n += 1
                self.acc_sum += score
                if score < accuracy:
                    self.acc_bad.append(d.device_id)


@dataclass(frozen=True)
class Factors:
    """Per-device cut-offs as floats, precomputed once per tick."""

    latency: float | None
    power: float | None
    accuracy: float | None
    latency_floor: float = 0.0
    power_floor: float = 0.0

    @classmethod
    def of(cls, gates: GateLimits) -> Factors:
        def rise(limit: Fraction | None) -> float | None:
            return None if limit is None else float(1 + limit / HUNDRED)

        acc = gates.min_golden_accuracy
        return cls(
            rise(gates.max_latency_regression),
            rise(gates.max_power_regression),
            None if acc is None else float(acc),
            float(gates.latency_floor_ms),
            float(gates.power_floor_mw),
        )


def _needed(min_sample: int, possible: int) -> int:
    return min(min_sample, possible)


def _pending(
    name: str, profile: str, limit: float, bound: str, *, sample: int, needed: int
) -> GateResult:
    """A gate still waiting for ``needed`` devices to report."""
    return GateResult(
        name=name, profile=profile, value=None, limit=limit, unit="%", bound=bound,
        tripped=False, sample=sample, needed=needed,
    )  # fmt: skip


def _install_failure(
    profile: str, limit: Fraction, stats: ProfileStats, min_sample: int
) -> GateResult:
    needed = _needed(min_sample, stats.started)
    if stats.finished == 0 or stats.finished < needed:
        return _pending(
            INSTALL_FAILURE_RATE, profile, float(limit), "max", sample=stats.finished, needed=needed
        )
    failed = len(stats.install_failed)
    tripped = failed * HUNDRED > limit * stats.finished
    return GateResult(
        name=INSTALL_FAILURE_RATE, profile=profile, value=failed * 100.0 / stats.finished,
        limit=float(limit), unit="%", bound="max", tripped=tripped, sample=stats.finished,
        needed=needed, devices=_named(tripped, stats.install_failed),
        detail=f"{failed} of {stats.finished} finished installs failed",
    )  # fmt: skip


def _regression(
    name: str, profile: str, limit: Fraction, sums: RegressionSums, min_sample: int, *, unit: str
) -> GateResult:
    needed = _needed(min_sample, sums.possible)
    if sums.n == 0 or sums.n < needed:
        return _pending(name, profile, float(limit), "max", sample=sums.n, needed=needed)
    increase = sums.mean_increase
    over = Fraction(sums.cur) > Fraction(sums.base) * (1 + limit / HUNDRED)
    tripped = over and increase > sums.floor
    detail = (
        f"{sums.n} devices against their own baseline: mean {sums.base / sums.n:.2f} -> "
        f"{sums.cur / sums.n:.2f} {unit}"
    )
    if over and not tripped:
        detail += f"; under the {sums.floor:g} {unit} floor"
    return GateResult(
        name=name, profile=profile, value=(sums.cur / sums.base - 1.0) * 100.0,
        limit=float(limit), unit="%", bound="max", tripped=tripped, sample=sums.n,
        needed=needed, devices=_named(tripped, sums.bad), detail=detail,
    )  # fmt: skip


def _golden_accuracy(
    profile: str, minimum: Fraction, stats: ProfileStats, min_sample: int
) -> GateResult:
    needed = _needed(min_sample, stats.acc_eval)
    limit_pct = float(minimum * HUNDRED)
    if stats.acc_n == 0 or stats.acc_n < needed:
        return _pending(
            GOLDEN_ACCURACY, profile, limit_pct, "min", sample=stats.acc_n, needed=needed
        )
    tripped = Fraction(stats.acc_sum) < minimum * stats.acc_n
    return GateResult(
        name=GOLDEN_ACCURACY, profile=profile, value=stats.acc_sum / stats.acc_n * 100.0,
        limit=limit_pct, unit="%", bound="min", tripped=tripped, sample=stats.acc_n,
        needed=needed, devices=_named(tripped, stats.acc_bad),
        detail=f"mean over {stats.acc_n} devices",
    )  # fmt: skip


def _named(tripped: bool, devices: list[str]) -> tuple[str, ...]:
    return tuple(sorted(devices)) if tripped else ()


def judge_profile(profile: str, stats: ProfileStats, gates: GateLimits) -> list[GateResult]:
    """Every enabled gate for one profile."""
    n = gates.min_sample
    results: list[GateResult] = []
    if gates.max_install_failure is not None:
        results.append(_install_failure(profile, gates.max_install_failure, stats, n))
    if gates.max_latency_regression is not None:
        results.append(
            _regression(
                LATENCY_REGRESSION,
                profile,
                gates.max_latency_regression,
                stats.latency,
                n,
                unit="ms",
            )
        )
    if gates.max_power_regression is not None:
        results.append(
            _regression(
                POWER_REGRESSION, profile, gates.max_power_regression, stats.power, n, unit="mW"
            )
        )
    if gates.min_golden_accuracy is not None:
        results.append(_golden_accuracy(profile, gates.min_golden_accuracy, stats, n))
    return results

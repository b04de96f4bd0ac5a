"""Pure core of telemetry rollups: what one window contributes, how buckets merge, repeats.

Device payloads are untrusted and evolve, so every field is optional here:
a missing, non-numeric, negative or absurd value counts as absent, never as
zero and never as an error. Rollups keep sums and counts (and a latency
sketch), so any set of buckets merges exactly; means are derived on output.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from server.telemetry import latency_sketch
from server.telemetry.latency_sketch import Sketch

MAX_RELEASE = 2**31 - 1
_MODEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_POWER_SOURCES = ("sensor", "estimate")
_MAX_NUMBER = 1e12
_TEMP_RANGE = (-100.0, 400.0)
_MAX_FIELDS = frozenset({"rss_mb_max", "power_mw_max", "temp_max_c", "invoke_max_ms"})
_SKETCH_FIELDS = frozenset({"invoke", "e2e"})


def number(value: Any, lo: float = 0.0, hi: float = _MAX_NUMBER) -> float | None:
    """A finite number within ``[lo, hi]`` (bools are not numbers), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) and lo <= result <= hi else None


def count(value: Any) -> int:
    result = number(value)
    return int(result) if result is not None else 0


def _section(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key)
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class RollupKey:
    bucket: datetime
    device_id: str
    profile: str
    model: str
    release: int
    power_source: str


def release_of(payload: dict[str, Any]) -> tuple[str, int]:
    """``(model, release)`` of a window; ``("", 0)`` for no (or an unreadable) model."""
    model, release = payload.get("model"), payload.get("release")
    if not isinstance(model, str) or not _MODEL.match(model):
        return "", 0
    if isinstance(release, bool) or not isinstance(release, int) or not 0 < release <= MAX_RELEASE:
        return model, 0
    return model, release


def power_source_of(payload: dict[str, Any]) -> str:
    power = _section(payload, "power")
    if number(power.get("mw")) is None:
        return ""
    source = power.get("source")
    return source if source in _POWER_SOURCES else "unknown"


@dataclass
class RollupValues:
    """The mergeable content of one rollup row (everything but its key)."""

    windows: int = 0
    inferences: int = 0
    errors: int = 0
    window_s_sum: float = 0.0
    fps_sum: float = 0.0
    cpu_windows: int = 0
    cpu_percent_sum: float = 0.0
    rss_mb_max: float | None = None
    power_windows: int = 0
    power_mw_sum: float = 0.0
    power_mw_max: float | None = None
    energy_inferences: int = 0
    energy_mj_sum: float = 0.0
    energy_above_idle_mj_sum: float = 0.0
    thermal_windows: int = 0
    throttled_windows: int = 0
    temp_max_c: float | None = None
    invoke_max_ms: float | None = None
    outbox_dropped: int = 0
    invoke: Sketch = field(default_factory=dict)
    e2e: Sketch = field(default_factory=dict)

    def add_window(self, payload: dict[str, Any]) -> None:
        """Add one ``telemetry`` window payload (see ``agent/telemetry/window.py``)."""
        inferences = count(payload.get("inferences"))
        self.windows += 1
        self.inferences += inferences
        self.errors += count(payload.get("errors"))
        self.window_s_sum += number(payload.get("window_s"), hi=86_400) or 0.0
        self.fps_sum += number(payload.get("fps"), hi=1e6) or 0.0
        cpu = number(payload.get("cpu_percent"), hi=100_000)
        if cpu is not None:
            self.cpu_windows += 1
            self.cpu_percent_sum += cpu
        self.rss_mb_max = _max(self.rss_mb_max, number(payload.get("rss_mb"), hi=1e7))
        self.outbox_dropped += count(payload.get("outbox_dropped"))
        self._add_power(_section(payload, "power"), inferences)
        self._add_thermal(_section(payload, "thermal"))
        invoke = _section(payload, "invoke_ms")
        self.invoke_max_ms = _max(self.invoke_max_ms, number(invoke.get("max")))
        latency_sketch.merge(self.invoke, latency_sketch.from_percentiles(invoke))
        latency_sketch.merge(self.e2e, latency_sketch.from_percentiles(payload.get("e2e_ms")))

    def _add_power(self, power: dict[str, Any], inferences: int) -> None:
        mw = number(power.get("mw"), hi=1e9)
        if mw is None:
            return
        self.power_windows += 1
        self.power_mw_sum += mw
        self.power_mw_max = _max(self.power_mw_max, number(power.get("max_mw"), hi=1e9) or mw)
        per_inference = number(power.get("mj_per_inference"), hi=1e9)
        if per_inference is not None and inferences > 0:
            # Weighted by inferences, so the mean is total energy / total inferences.
            self.energy_inferences += inferences
            self.energy_mj_sum += per_inference * inferences
            above = number(power.get("mj_per_inference_above_idle"), hi=1e9) or 0.0
            self.energy_above_idle_mj_sum += above * inferences

    def _add_thermal(self, thermal: dict[str, Any]) -> None:
        if not thermal:
            return
        self.thermal_windows += 1
        flags = thermal.get("flags")
        if thermal.get("throttled") is True or (isinstance(flags, list) and flags):
            self.throttled_windows += 1
        self.temp_max_c = _max(self.temp_max_c, number(thermal.get("max_c"), *_TEMP_RANGE))

    def merge(self, other: RollupValues) -> RollupValues:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in _SKETCH_FIELDS:
                latency_sketch.merge(mine, theirs)
            elif f.name in _MAX_FIELDS:
                setattr(self, f.name, _max(mine, theirs))
            else:
                setattr(self, f.name, mine + theirs)
        return self

    # --- derived values -------------------------------------------------------------
    @property
    def fps_mean(self) -> float | None:
        return self.fps_sum / self.windows if self.windows else None

    @property
    def power_mw_mean(self) -> float | None:
        return self.power_mw_sum / self.power_windows if self.power_windows else None

    @property
    def mj_per_inference(self) -> float | None:
        return self.energy_mj_sum / self.energy_inferences if self.energy_inferences else None

    @property
    def mj_per_inference_above_idle(self) -> float | None:
        if not self.energy_inferences:
            return None
        return self.energy_above_idle_mj_sum / self.energy_inferences

    def invoke_p95_ms(self) -> float | None:
        return latency_sketch.quantile(self.invoke, 0.95)

    def e2e_p95_ms(self) -> float | None:
        return latency_sketch.quantile(self.e2e, 0.95)

    # --- storage ----------------------------------------------------------------------
    def to_columns(self) -> dict[str, Any]:
        """Column values of a ``telemetry_rollups`` row (without key and timestamps)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SKETCH_FIELDS}
        out["invoke_hist"] = latency_sketch.to_json(self.invoke)
        out["e2e_hist"] = latency_sketch.to_json(self.e2e)
        out["invoke_p95_ms"] = _round(self.invoke_p95_ms())
        out["e2e_p95_ms"] = _round(self.e2e_p95_ms())
        return out

    @classmethod
    def from_row(cls, row: Any) -> RollupValues:
        """From a stored row (ORM object or Core row with the same attribute names)."""
        values = cls()
        for f in fields(cls):
            if f.name == "invoke":
                values.invoke = latency_sketch.from_json(row.invoke_hist)
            elif f.name == "e2e":
                values.e2e = latency_sketch.from_json(row.e2e_hist)
            else:
                setattr(values, f.name, getattr(row, f.name))
        return values


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- time --------------------------------------------------------------------------------


def window_time(
    payload: dict[str, Any], received_at: datetime, retention_s: float, max_skew_s: float
) -> datetime:
    """When a window happened: the device's ``ts`` when plausible, else the receive time.

    A replayed backlog keeps its own minutes this way; a device clock far in
    the future, or a time older than the retention, falls back to arrival.
    """
    now = received_at.timestamp()
    ts = number(payload.get("ts"), hi=_MAX_NUMBER)
    if ts is None or not now - retention_s <= ts <= now + max_skew_s:
        return received_at
    return datetime.fromtimestamp(ts, timezone.utc)


def bucket_start(when: datetime, bucket_s: int) -> datetime:
    epoch = int(when.timestamp()) // bucket_s * bucket_s
    return datetime.fromtimestamp(epoch, timezone.utc)


# --- repeats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """The newest accepted outbox position of a device."""

    seq: int | None = None
    ts: float | None = None


def message_position(payload: dict[str, Any]) -> tuple[int | None, float | None]:
    """``(seq, ts)`` the agent's outbox stamped on a message, or Nones."""
    seq = payload.get("seq")
    valid = isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63
    return (seq if valid else None), number(payload.get("ts"), hi=_MAX_NUMBER)


def is_repeat(seq: int, ts: float | None, cursor: Cursor) -> bool:
    """True for a QoS 1 redelivery: an outbox position at or before the newest accepted one.

    The agent replays in ``seq`` order, so anything at or below the cursor was
    seen. One exception: a message stamped later than the cursor's time is new
    even with a smaller ``seq`` - the device's outbox was reset (re-flashed,
    or a corrupt file started over) - and the cursor restarts from it.
    """
    if cursor.seq is None or seq > cursor.seq:
        return False
    return not (ts is not None and cursor.ts is not None and ts > cursor.ts)

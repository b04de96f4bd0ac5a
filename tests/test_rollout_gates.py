"""Table-driven tests of the rollout policy's health gates: each trips alone, with its
name and numbers; at its limit it passes; it waits for its sample."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from policy_facts import (
    DL,
    FAIL,
    NOW,
    OK,
    RB,
    K,
    dev,
    facts,
    later,
    make_spec,
)

from server.rollout.core.gates import (
    GOLDEN_ACCURACY,
    INSTALL_FAILURE_RATE,
    LATENCY_REGRESSION,
    POWER_REGRESSION,
)
from server.rollout.core.policy import RolloutFacts, decide
from server.rollout.core.states import (
    Action,
    DeviceFacts,
    InstallStatus,
    apply_action,
)

# --- every gate trips alone, with its name and numbers -------------------------------------


def two_profiles(bad: dict[str, Any], status: InstallStatus = OK, bad_count: int = 10) -> list[
        DeviceFacts]:
    good = [dev(i, profile="rpi4") for i in range(10)]
    jetson = [dev(i, status if i < bad_count else OK, profile="jetson",
                  **(bad if i < bad_count else {})) for i in range(10)]
    return [*good, *jetson, later()]


@pytest.mark.parametrize(
    ("options", "devices", "expected"),
    [
        ({"max_latency_regression": "10%"}, two_profiles({"p95_ms": 14.0}),
         (LATENCY_REGRESSION, 40.0, 10.0, 10)),
        ({"max_latency_regression": "10%"}, two_profiles({"p95_ms": 11.01}),
         (LATENCY_REGRESSION, 10.1, 10.0, 10)),
        ({"max_power_regression": "10%"}, two_profiles({"power_mw": 2300.0}),
         (POWER_REGRESSION, 15.0, 10.0, 10)),
        ({"min_golden_accuracy": "90%"}, two_profiles({"golden_accuracy": 0.85}),
         (GOLDEN_ACCURACY, 85.0, 90.0, 10)),
        ({"max_install_failure": "5%", "max_failure": "50%"},
         two_profiles({}, status=FAIL, bad_count=2), (INSTALL_FAILURE_RATE, 20.0, 5.0, 2)),
        ({"max_install_failure": "5%", "max_failure": "50%"},
         two_profiles({}, status=RB, bad_count=1), (INSTALL_FAILURE_RATE, 10.0, 5.0, 1)),
        # One slow device among ten pushes the sum over the limit; only it is named.
        ({"max_latency_regression": "10%"}, two_profiles({"p95_ms": 25.0}, bad_count=1),
         (LATENCY_REGRESSION, 15.0, 10.0, 1)),
    ],
)
def test_each_gate_trips_alone(options: dict[str, Any], devices: list[DeviceFacts],
                               expected: tuple[str, float, float, int]) -> None:
    name, value, limit, bad = expected
    decision = decide(facts(make_spec(**options), devices), NOW)
    assert decision.kind is K.PAUSE
    assert len(decision.tripped) == 1, decision.reason
    gate = decision.tripped[0]
    assert (gate.name, gate.profile, gate.limit) == (name, "jetson", limit)
    assert gate.value == pytest.approx(value)
    assert gate.devices == tuple(f"jetson-{i:03d}" for i in range(bad))
    assert f"{name} on profile jetson: {value:.1f}%" in decision.status.reason
    assert decision.status.held_devices == set(gate.devices)
    healthy = [g for g in decision.gates if g.profile == "rpi4" and g.name == name]
    assert healthy and not healthy[0].tripped


@pytest.mark.parametrize(
    ("options", "bad"),
    [
        ({"max_latency_regression": "10%"}, {"p95_ms": 11.0}),  # exactly +10%
        ({"max_power_regression": "10%"}, {"power_mw": 2200.0}),
        ({"min_golden_accuracy": "90%"}, {"golden_accuracy": 0.9}),
        ({"max_latency_regression": "10%"}, {"p95_ms": 8.0}),  # faster is fine
        ({"max_latency_regression": None}, {"p95_ms": 50.0}),  # gate off
    ],
)
def test_gates_at_their_limit_pass(options: dict[str, Any], bad: dict[str, Any]) -> None:
    decision = decide(facts(make_spec(**options), two_profiles(bad)), NOW)
    assert decision.kind is K.ADVANCE, decision.reason


def reporting(field: str, bad: Any, reported: int) -> list[DeviceFacts]:
    """Ten devices; the first ``reported`` report a bad ``field``, the rest nothing yet."""
    if field == "status":
        return [dev(i, FAIL if i < reported else DL, started=NOW - timedelta(minutes=5))
                for i in range(10)]
    values: list[dict[str, Any]] = [{field: bad if i < reported else None} for i in range(10)]
    return [dev(i, **values[i]) for i in range(10)]


@pytest.mark.parametrize(
    ("options", "field", "bad", "name"),
    [
        ({"max_latency_regression": "10%"}, "p95_ms", 14.0, LATENCY_REGRESSION),
        ({"max_power_regression": "10%"}, "power_mw", 3000.0, POWER_REGRESSION),
        ({"min_golden_accuracy": "90%"}, "golden_accuracy", 0.5, GOLDEN_ACCURACY),
        ({"max_install_failure": "5%", "max_failure": "100%"}, "status", None,
         INSTALL_FAILURE_RATE),
    ],
)
def test_gate_waits_for_its_sample_before_judging(options: dict[str, Any], field: str, bad: Any,
                                                  name: str) -> None:
    spec = make_spec(min_sample=8, **options)
    early = decide(facts(spec, [*reporting(field, bad, 5), later()]), NOW)
    assert early.kind is K.WAIT and not early.tripped
    assert f"{name} on profile rpi4: waiting for data from 3 more devices" in early.waiting
    enough = decide(facts(spec, [*reporting(field, bad, 8), later()]), NOW)
    assert enough.kind is K.PAUSE and [g.name for g in enough.tripped] == [name]


def test_devices_without_a_baseline_do_not_block_or_count() -> None:
    spec = make_spec(max_latency_regression="10%")
    devices = [dev(i, baseline_p95_ms=None, p95_ms=50.0) for i in range(5)]
    decision = decide(facts(spec, [*devices, later()]), NOW)
    assert decision.kind is K.ADVANCE
    gate = next(g for g in decision.gates if g.name == LATENCY_REGRESSION)
    assert (gate.value, gate.needed, gate.tripped) == (None, 0, False)
    assert gate.message() == "p95_latency_regression on profile rpi4: no device can report yet"


def test_runtime_errors_fail_a_device_when_limited() -> None:
    devices = [dev(i) for i in range(9)] + [dev(9, error_count=4), later()]
    assert decide(facts(make_spec(max_failure="0", max_device_errors=3), devices), NOW).kind is (
        K.PAUSE)
    assert decide(facts(make_spec(max_failure="0", max_device_errors=4), devices), NOW).kind is (
        K.ADVANCE)




def small(p95: float, base: float) -> list[DeviceFacts]:
    return [*(dev(i, baseline_p95_ms=base, p95_ms=p95) for i in range(10)), later()]


def test_a_regression_must_also_clear_its_absolute_floor() -> None:
    spec = make_spec(max_latency_regression="10%")
    # 1.5 ms -> 1.7 ms is +13%, but +0.2 ms is noise for a model this fast.
    quiet = decide(facts(spec, small(1.7, 1.5)), NOW)
    assert quiet.kind is K.ADVANCE, quiet.reason
    gate = next(g for g in quiet.gates if g.name == LATENCY_REGRESSION)
    assert not gate.tripped and "under the 0.5 ms floor" in gate.detail
    assert "mean 1.50 -> 1.70 ms" in gate.detail
    # The same percentage with a real increase trips, and a lower floor trips the first.
    assert decide(facts(spec, small(17.0, 15.0)), NOW).kind is K.PAUSE
    strict = make_spec(max_latency_regression="10%", latency_floor_ms="0.1")
    paused = decide(facts(strict, small(1.7, 1.5)), NOW)
    assert paused.kind is K.PAUSE
    # The reason carries the gate's own number and detail.
    tripped = paused.tripped[0]
    assert f"{tripped.value:.1f}%" in paused.reason and tripped.detail in paused.reason


def test_power_floor() -> None:
    spec = make_spec(max_power_regression="10%")
    devices = [*(dev(i, baseline_power_mw=500.0, power_mw=580.0) for i in range(10)), later()]
    assert decide(facts(spec, devices), NOW).kind is K.ADVANCE  # +80 mW < 100 mW
    devices = [*(dev(i, baseline_power_mw=5000.0, power_mw=5800.0) for i in range(10)), later()]
    assert decide(facts(spec, devices), NOW).kind is K.PAUSE


def test_a_pause_keeps_its_gates_and_a_resumed_stage_counts_every_success() -> None:
    spec = make_spec(max_latency_regression="10%", stages="100%")
    devices = [dev(i, p95_ms=20.0 if i < 3 else 10.0) for i in range(10)]
    paused = decide(facts(spec, devices), NOW)
    assert paused.kind is K.PAUSE
    kept = paused.status.paused_gates
    assert [g["name"] for g in kept] == [LATENCY_REGRESSION]
    assert f"{kept[0]['value']:.1f}%" in paused.status.reason  # the number the reason shows
    resumed = apply_action(paused.status, Action.RESUME, NOW, 1)
    assert resumed.paused_gates == () and resumed.acknowledged == set(kept[0]["devices"])
    base = facts(spec, devices)
    done = decide(RolloutFacts(base.rollout_id, spec, resumed, devices), NOW)
    assert done.kind is K.COMPLETE
    assert "10 of 10 devices succeeded; 3 acknowledged by the operator" in done.reason

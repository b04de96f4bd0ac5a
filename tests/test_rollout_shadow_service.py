"""Shadow evaluation through the real server, on SQLite and PostgreSQL.

Devices speak the wire protocol: the check-in names the candidate to shadow,
shadow results go over MQTT with each device's own credentials, and the engine's
tick judges them. A candidate that disagrees on one class pauses the rollout with
the class and its numbers; a resume accepts it and installs start; a device
cannot report into a rollout that did not select it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from rollout_helpers import Fleet, SimDevice, Telemetry, tick_once
from waiting import wait_for

from agent.protocol.manifest import model_target_path
from server.app import ServerHandle
from server.cli.rollout import shadow_text, status_text

ServerFactory = Callable[..., ServerHandle]
LABELS = [str(i) for i in range(10)]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def server(request: pytest.FixtureRequest, server_factory: ServerFactory,
           tmp_path: Path) -> ServerHandle:
    db_url = None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    # The scheduler in this process (it ticks once at start, then hourly): a spawned one may
    # take its first round, and the rollout's row lock, just as a test ticks by hand.
    return server_factory(tmp_path / "server", db_url=db_url, rollout_tick_interval_s=3600,
                          rollout_scheduler="thread")








def block(rollout_id: str, per_class: int = 20, wrong: dict[int, int] | None = None) -> dict[
        str, Any]:
    """A shadow window: ``per_class`` frames of each class; ``wrong[c]`` of class c's frames
    the candidate called class 1."""
    pairs = []
    for c in range(10):
        bad = (wrong or {}).get(c, 0)
        if per_class - bad:
            pairs.append([c, c, per_class - bad])
        if bad:
            pairs.append([c, 1, bad])
    shadowed = sum(p[2] for p in pairs)
    return {"rollout_id": rollout_id, "frames": shadowed * 5, "shadowed": shadowed,
            "skipped": 3, "agreed": sum(p[2] for p in pairs if p[0] == p[1]), "pairs": pairs,
            "labels": LABELS, "candidate_latency_ms": {"p50": 2.0, "p95": 2.5, "max": 3.0},
            "serving_latency_ms": {"p50": 1.8, "p95": 2.2}, "candidate_mj": 0.9,
            "error": None}


def shadow_rows(fleet: Fleet, rid: str) -> dict[str, Any]:
    out: dict[str, Any] = fleet.call("GET", f"/api/v1/rollouts/{rid}/shadow")
    return out


def start(fleet: Fleet, devices: list[SimDevice]) -> str:
    fleet.bring_to(devices, 1)
    out = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%", soak="0s",
                       min_sample=2, shadow_every=4, min_shadow_agreement="95%",
                       shadow_min_frames=30, shadow_duration="0s", max_latency_regression=None,
                       max_power_regression=None, start=True)
    rid: str = out["id"]
    return rid


def test_one_class_disagreeing_pauses_the_rollout_naming_it(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    devices = fleet.enroll(4)
    rid = start(fleet, devices)
    result = tick_once(server, rid)
    assert result.started == ()  # the shadow phase installs nothing
    shadowing = [d for d in devices if fleet.checkin_reply(d).get("shadow") is not None]
    assert len(shadowing) == 2
    offer = fleet.checkin_reply(shadowing[0])["shadow"]
    assert offer == {"rollout_id": rid, "target_path": model_target_path("digits", 2, "int8-cpu"),
                     "name": "digits", "release": 2, "variant": "int8-cpu", "every_n": 4,
                     "cpu_budget": 0.25}
    assert all(fleet.desired_release(d) == 1 for d in devices)
    view = fleet.rollout(rid)
    assert view["shadow_phase"] and "shadow phase: 2 devices" in status_text(view)

    # A device outside the stage cannot write into the rollout's shadow results.
    outsider = next(d for d in devices if d not in shadowing)
    for dev in shadowing:
        telemetry.results(dev, 1, block(rid, wrong={7: 15}))
    telemetry.results(outsider, 1, block(rid))
    wait_for("shadow results stored", lambda: shadow_rows(fleet, rid)["profiles"].get(
        "x86-gateway", {}).get("devices") == 2)
    result = tick_once(server, rid)
    status = result.decision.status
    assert status.state.value == "paused" and status.shadow_tripped
    reason = status.reason
    assert "shadow_class_agreement on profile x86-gateway for class '7': 25.0% < minimum 95.0%" in (
        reason)
    assert "the candidate said '1' on 30" in reason
    assert all(fleet.checkin_reply(d).get("shadow") is None for d in devices)  # paused: no shadow

    report = shadow_rows(fleet, rid)
    profile = report["profiles"]["x86-gateway"]
    assert profile["shadowed"] == 400 and profile["agreed"] == 370 and profile["skipped"] == 6
    seven = next(c for c in profile["classes"] if c["class"] == "7")
    assert (seven["frames"], seven["agreed"], seven["confused_with"]) == (40, 10, "1")
    assert profile["candidate_p95_ms"] == 2.5 and profile["serving_p95_ms"] == 2.2
    text = shadow_text(report)
    assert "92.5% agreement, 370 of 400 frames on 2 devices" in text
    assert "1 (30)" in text

    # The operator accepts the candidate: the stage's devices are told to install.
    fleet.act(rid, "resume")
    result = tick_once(server, rid)
    assert len(result.started) == 2
    assert {d.device_id for d in shadowing} == set(result.started)


def test_an_agreeing_candidate_passes_the_shadow_phase_then_installs(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    devices = fleet.enroll(4)
    rid = start(fleet, devices)
    tick_once(server, rid)
    shadowing = [d for d in devices if fleet.checkin_reply(d).get("shadow") is not None]
    for dev in shadowing:
        telemetry.results(dev, 1, block(rid))
    wait_for("shadow results stored", lambda: shadow_rows(fleet, rid)["profiles"].get(
        "x86-gateway", {}).get("devices") == 2)
    passed = tick_once(server, rid)
    assert passed.decision.kind.value == "shadow_passed"
    assert "shadow passed" in passed.decision.reason
    assert all(fleet.checkin_reply(d).get("shadow") is None for d in devices)
    installing = tick_once(server, rid)
    assert set(installing.started) == {d.device_id for d in shadowing}


def test_shadow_garbage_is_refused_and_counted(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    for bad in ({"shadow_every": 0}, {"shadow_every": 10**6},
                {"shadow_every": 5, "min_shadow_agreement": "x"},
                {"shadow_every": 5, "shadow_cpu_budget": "0%"},
                {"shadow_every": 5, "shadow_duration": "forever"},
                {"min_shadow_agreement": "99%"}):  # an option without shadow_every
        out = fleet.create(expect=422, release="digits@2", select=["fleet=test"], **bad)
        assert "shadow" in out["error"], out
    devices = fleet.enroll(2)
    rid = start(fleet, devices)
    tick_once(server, rid)
    shadowing = next(d for d in devices if fleet.checkin_reply(d).get("shadow") is not None)
    broken = {**block(rid), "agreed": 999}  # does not add up
    telemetry.results(shadowing, 1, broken)
    telemetry.results(shadowing, 1, {"rollout_id": rid, "pairs": "nonsense"})

    def rejected() -> float | None:
        text = requests.get(f"{server.url}/metrics", timeout=10, headers={
            "Authorization": f"Bearer {server.operator_token}"}).text
        found = re.search(r'edgefleet_shadow_results_total\{result="rejected"\} (\S+)', text)
        return float(found.group(1)) if found and float(found.group(1)) >= 2 else None

    assert wait_for("both blocks counted as rejected", rejected) == 2
    assert shadow_rows(fleet, rid)["profiles"] == {}  # nothing stored from them

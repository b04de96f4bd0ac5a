"""The rollout service against a real server on SQLite and on PostgreSQL.

Devices are enrolled over REST and make progress by sending the real device
reports (update events, check-ins, golden-set events over HTTP with their own
tokens, telemetry windows over MQTT with their own credentials). The engine is
stepped with ``tick`` so every stage boundary can be observed; the
scheduler thread of these servers waits an hour between rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from rollout_helpers import Fleet, SimDevice, Telemetry, tick_once
from sqlalchemy import func, select
from waiting import wait_for

from agent.protocol.manifest import model_target_path
from server.app import ServerHandle
from server.db.tables import Assignment, TelemetryRollup, utcnow
from server.errors import ConflictError, NotFoundError
from server.rollout.core.options import build_spec
from server.rollout.core.states import Action, InstallStatus, TransitionError
from server.rollout.service import (
    RevertRefusedError,
    RolloutHistory,
    ServiceConfig,
    TickResult,
    create_rollout,
    perform,
    tick,
)

ServerFactory = Callable[..., ServerHandle]
S = InstallStatus


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def db_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def server(server_factory: ServerFactory, tmp_path: Path, db_url: str | None) -> ServerHandle:
    # The scheduler in this process (it ticks once at start, then hourly): a spawned one may
    # take its first round, and the rollout's row lock, just as a test ticks by hand.
    return server_factory(tmp_path / "server", db_url=db_url, rollout_tick_interval_s=3600,
                          rollout_scheduler="thread")






def spread(i: int) -> dict[str, str]:
    return {"fleet": "test", "store": f"s{i % 4}", "region": f"r{i % 2}"}




def started_devices(fleet: Fleet, devices: list[SimDevice]) -> list[SimDevice]:
    """The devices whose check-in now names release 2 (the real way a device learns it)."""
    return [d for d in devices if fleet.desired_release(d) == 2]


def told(fleet: Fleet, devices: list[SimDevice], count: int) -> list[SimDevice] | None:
    """The devices told to install release 2, once there are ``count`` of them."""
    found = started_devices(fleet, devices)
    assert len(found) <= count
    return found if len(found) == count else None


def history(server: ServerHandle, rollout_id: str) -> list[RolloutHistory]:
    with server.db.session() as s:
        query = select(RolloutHistory).where(RolloutHistory.rollout_id == rollout_id)
        return list(s.scalars(query.order_by(RolloutHistory.id)))


def rollout_assignments(server: ServerHandle, rollout_id: str) -> dict[str, list[int]]:
    with server.db.session() as s:
        rows = s.execute(select(Assignment.target_value, Assignment.release)
                         .where(Assignment.rollout_id == rollout_id).order_by(Assignment.id))
        out: dict[str, list[int]] = {}
        for device_id, release in rows:
            out.setdefault(device_id, []).append(release)
        return out


def test_a_good_release_goes_stage_by_stage_to_completion(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(10, tags=spread)
    fleet.bring_to(devices, 1)
    out = fleet.create(release="digits@2", select=["fleet=test"], stages="10%,50%,100%",
                       soak="0s", start=True)
    rid = out["id"]
    assert [s["devices"] for s in out["stage_list"]] == [1, 4, 5]
    assert all(fleet.desired_release(d) == 1 for d in devices)  # nobody told yet

    seen_stages: list[int] = []
    installed: set[str] = set()
    for _ in range(20):
        result = tick_once(server, rid)
        seen_stages.append(result.decision.status.stage_index)
        if result.decision.status.state.value == "completed":
            break
        for dev in started_devices(fleet, devices):
            if dev.device_id not in installed:
                fleet.install(dev, 2)
                installed.add(dev.device_id)
        # Stage by stage: never more devices told than the current stage allows.
        assert len(installed) <= [1, 5, 10][result.decision.status.stage_index]
    assert result.decision.status.state.value == "completed"
    assert installed == {d.device_id for d in devices}
    assert all(fleet.desired_release(d) == 2 for d in devices)
    # One assignment per device, all to release 2.
    assert rollout_assignments(server, rid) == {d.device_id: [2] for d in devices}
    moves = [(h.trigger, h.from_stage, h.to_stage, h.to_state) for h in history(server, rid)]
    assert moves == [
        ("create", 0, 0, "draft"), ("start", 0, 0, "running"),
        ("stage_passed", 0, 1, "running"), ("stage_passed", 1, 2, "running"),
        ("finished", 2, 2, "completed"),
    ]
    view = fleet.rollout(rid)
    assert [s["state"] for s in view["stage_list"]] == ["passed"] * 3
    assert [s["succeeded"] for s in view["stage_list"]] == [1, 4, 5]
    devices_view = fleet.call("GET", f"/api/v1/rollouts/{rid}/devices")
    assert {d["status"] for d in devices_view} == {"installed"}
    assert {d["previous"] for d in devices_view} == {"digits@1"}


def test_failed_installs_pause_with_the_gate_and_numbers_then_resume(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(20, tags=spread)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", max_failure="10%", start=True)["id"]
    tick_once(server, rid)
    first = started_devices(fleet, devices)
    assert len(first) == 10
    bad = {first[0].device_id, first[1].device_id}
    fleet.install(first[0], 2, outcome="fail")
    fleet.install(first[1], 2, outcome="rollback")
    for dev in first[2:]:
        fleet.install(dev, 2)

    result = tick_once(server, rid)
    assert result.decision.status.state.value == "paused"
    assert result.decision.status.held_devices == bad
    view = fleet.rollout(rid)
    assert view["state"] == "paused"
    reason = view["paused_reason"]
    assert "error_threshold in stage 1: 20.0% > limit 10.0% (2 of 10 devices failed)" in reason
    assert "install_failure_rate on profile x86-gateway: 20.0% > limit 5.0%" in reason
    assert all(device in reason for device in bad)
    tripped = {g["name"] for g in view["tripped"]}
    assert tripped == {"error_threshold", "install_failure_rate"}
    statuses = {d["device_id"]: (d["status"], d["reason"])
                for d in fleet.call("GET", f"/api/v1/rollouts/{rid}/devices?stage=1")}
    assert statuses[first[0].device_id] == ("failed", "download: connection reset")
    assert statuses[first[1].device_id] == ("rolled_back", "health: invoke errors")

    # Paused: ticking changes nothing and starts nobody.
    assert tick_once(server, rid).started == ()
    fleet.act(rid, "resume")
    assert tick_once(server, rid).decision.status.stage_index == 1  # the 8 others carry stage 1
    second = tick_once(server, rid).started
    assert len(second) == 10
    for dev in devices:
        if dev.device_id in second:
            fleet.install(dev, 2)
    assert tick_once(server, rid).decision.status.state.value == "completed"


def test_a_slower_release_pauses_on_latency_and_revert_restores_release_1(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    # One region per profile, three stores each: cohorts alternate regions, so the
    # first half of the order holds three devices of each profile.
    pis = fleet.enroll(6, profile="rpi4",
                       tags=lambda i: {"fleet": "test", "region": "ra", "store": f"a{i % 3}"})
    gateways = fleet.enroll(6, profile="x86-gateway",
                            tags=lambda i: {"fleet": "test", "region": "rb", "store": f"b{i % 3}"})
    devices = pis + gateways
    fleet.bring_to(devices, 1)
    before = utcnow().timestamp() - 120  # windows from two minutes ago: the baseline
    for dev in devices:
        telemetry.window(dev, 1, p95_ms=10.0, power_mw=2000.0, ts=before)
    wait_for("baseline rollups", lambda: _rollup_devices(server, 1) == len(devices))

    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", min_sample=2, start=True)["id"]
    first = tick_once(server, rid).started
    assert len(first) == 6
    touched = [d for d in devices if d.device_id in first]
    assert sorted(d.profile for d in touched) == ["rpi4"] * 3 + ["x86-gateway"] * 3
    for dev in touched:
        fleet.install(dev, 2)
        slow = dev.profile == "rpi4"
        telemetry.window(dev, 2, p95_ms=14.0 if slow else 10.1, power_mw=2010.0)
    wait_for("release 2 rollups", lambda: _rollup_devices(server, 2) == len(touched))

    result = tick_once(server, rid)
    assert result.decision.status.state.value == "paused"
    names = {(g.name, g.profile) for g in result.decision.tripped}
    assert names == {("p95_latency_regression", "rpi4")}
    reason = fleet.rollout(rid)["paused_reason"]
    assert "p95_latency_regression on profile rpi4:" in reason and "> limit 10.0%" in reason
    latency = [g for g in result.decision.gates if g.name == "p95_latency_regression"]
    values = {g.profile: g.value for g in latency}
    assert values["rpi4"] is not None and 30.0 < values["rpi4"] < 50.0
    assert values["x86-gateway"] is not None and abs(values["x86-gateway"]) < 10.0

    out = fleet.act(rid, "revert")
    assert out["rollout"]["state"] == "reverted" and out["devices"] == len(touched)
    for dev in devices:  # touched devices go back to 1; the rest never left it
        assert fleet.desired_release(dev) == 1
    assert rollout_assignments(server, rid) == {d.device_id: [2, 1] for d in touched}
    assert step_is_idle(server, rid)


def _rollup_devices(server: ServerHandle, release: int) -> int:
    with server.db.session() as s:
        query = select(func.count(func.distinct(TelemetryRollup.device_id))).where(
            TelemetryRollup.release == release)
        return int(s.scalar(query) or 0)


def step_is_idle(server: ServerHandle, rollout_id: str) -> bool:
    return tick(server.db, rollout_id, ServiceConfig.from_server(server.config)) is None


def test_revert_is_refused_while_the_previous_release_is_not_a_signed_target(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(4, tags=spread)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", start=True)["id"]
    tick_once(server, rid)
    for dev in started_devices(fleet, devices):
        fleet.install(dev, 2)
    server.repo.remove_target(model_target_path("digits", 1, "int8-cpu"))
    with pytest.raises(RevertRefusedError, match=r"models/digits/1/int8-cpu.tflite \(2 devices\)"):
        perform(server.db, rid, Action.REVERT, repo=server.repo)
    refused = fleet.act(rid, "revert", expect=409)
    assert "no longer a valid signed TUF target" in refused["error"]
    assert fleet.rollout(rid)["state"] == "running"  # nothing changed
    assignments = rollout_assignments(server, rid)
    assert len(assignments) == 2 and all(r == [2] for r in assignments.values())


def test_silent_devices_count_as_failed_after_the_timeout(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(4, tags=spread)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", timeout="10m", max_failure="1", start=True)["id"]
    first = tick_once(server, rid).started
    assert len(first) == 2
    # Nobody reports; within the timeout the stage simply waits.
    assert tick_once(server, rid).decision.status.state.value == "running"
    later = utcnow() + timedelta(minutes=11)
    result = tick_once(server, rid, now=later)
    assert result.decision.status.state.value == "paused"
    assert result.decision.status.held_devices == set(first)
    assert "2 of 2 devices failed, 2 of them silent" in result.decision.reason


def test_approval_holds_the_next_stage_until_an_operator_approves(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(4, tags=spread)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", approval=True, start=True)["id"]
    first = tick_once(server, rid).started
    for dev in devices:
        if dev.device_id in first:
            fleet.install(dev, 2)
    assert tick_once(server, rid).decision.status.state.value == "awaiting_approval"
    waiting = tick_once(server, rid)
    assert waiting.started == () and waiting.decision.status.state.value == "awaiting_approval"
    with pytest.raises(TransitionError, match="cannot resume a rollout that is awaiting"):
        perform(server.db, rid, Action.RESUME)
    result = perform(server.db, rid, Action.APPROVE)
    assert (result.state, result.stage_index) == ("running", 1)
    assert len(tick_once(server, rid).started) == 2


def test_golden_set_accuracy_below_the_minimum_pauses(server: ServerHandle, fleet: Fleet) -> None:
    devices = fleet.enroll(4, tags=spread)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", min_golden_accuracy="90%", min_sample=2, start=True)["id"]
    started = tick_once(server, rid).started
    first = [d for d in devices if d.device_id in started]
    for dev, accuracy in zip(first, (0.95, 0.5), strict=True):
        fleet.install(dev, 2)
        fleet.event(dev, "golden_set", None,
                    {"accuracy": accuracy, "per_class": {"0": accuracy}, "release": 2})
    result = tick_once(server, rid)
    assert result.decision.status.state.value == "paused"
    gate = result.decision.tripped[0]
    assert (gate.name, gate.limit) == ("golden_accuracy", 90.0)
    assert gate.value == pytest.approx(72.5)
    assert gate.devices == (first[1].device_id,)


def test_overlapping_rollouts_and_unknown_releases_are_refused(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(4, tags=spread)
    spec = build_spec(release="digits@2", select=["fleet=test"], stages="50%,100%")
    first = create_rollout(server.db, spec, start=True)
    subset = build_spec(release="digits@2", select=["store=s1"], stages="100%")
    with pytest.raises(ConflictError, match=f"already in active rollout {first.rollout_id}"):
        create_rollout(server.db, subset)
    with pytest.raises(NotFoundError, match="no published release digits@7"):
        create_rollout(server.db, build_spec(release="digits@7", select=["fleet=test"]))
    with pytest.raises(NotFoundError, match="1 listed devices are not enrolled: dev-nope"):
        create_rollout(server.db, build_spec(release="digits@2", devices=["dev-nope"]))
    perform(server.db, first.rollout_id, Action.ABORT)
    second = create_rollout(server.db, subset, start=True)
    assert second.state == "running" and second.devices == 1
    assert devices  # the enrolled fleet is what both selected


def test_ticks_racing_on_one_rollout_never_start_a_device_twice(
    server: ServerHandle, fleet: Fleet
) -> None:
    devices = fleet.enroll(30, tags=spread)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="100%", soak="0s",
                       max_concurrent_downloads=1000, start=True)["id"]
    import threading  # noqa: PLC0415

    results: list[TickResult | None] = []
    cfg = ServiceConfig.from_server(server.config)

    def run() -> None:
        for _ in range(5):
            results.append(tick(server.db, rid, cfg))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [d for r in results if r is not None for d in r.started]
    assert sorted(started) == sorted(d.device_id for d in devices)
    assert all(len(r) == 1 for r in rollout_assignments(server, rid).values())


def test_a_server_restart_during_a_rollout_resumes_it(
    server_factory: ServerFactory, tmp_path: Path, db_url: str | None
) -> None:
    first = server_factory(tmp_path / "server", db_url=db_url, rollout_tick_interval_s=0.05)
    fleet = Fleet(first.url, first.operator_token, first.config.enrollment_tokens[0])
    fleet.publish(1)
    fleet.publish(2)
    fleet.call("POST", "/api/v1/assignments", expect=201,
               json={"name": "digits", "release": 1, "tag": "fleet=test"})
    devices = fleet.enroll(6, tags=spread)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%",
                       soak="0s", start=True)["id"]
    stage1 = wait_for("stage 1 devices told to install", lambda: told(fleet, devices, 3))
    first.stop()  # the scheduler stops with it; everything it knew is in the database

    second = server_factory(
        tmp_path / "server", db_url=db_url, rollout_tick_interval_s=0.05,
        operator_token=first.operator_token, enrollment_tokens=first.config.enrollment_tokens,
    )
    fleet.url = second.url
    assert fleet.rollout(rid)["state"] == "running"
    for dev in stage1:
        fleet.install(dev, 2)
    stage2 = wait_for("stage 2 devices told to install, by the new server",
                      lambda: told(fleet, devices, 6))
    for dev in stage2:
        if dev not in stage1:
            fleet.install(dev, 2)
    wait_for("completion", lambda: fleet.rollout(rid)["state"] == "completed")
    moves = [(h.trigger, h.from_stage, h.to_stage) for h in history(second, rid)]
    assert moves[-2:] == [("stage_passed", 0, 1), ("finished", 1, 1)]
    assert rollout_assignments(second, rid) == {d.device_id: [2] for d in devices}

"""Rollout REST API and ``edgefleet rollout`` CLI against a real server (SQLite).

Bad operator input must come back as a clear 4xx with the reason, never a 500.
The scheduler of this server waits an hour between rounds; tests step the
engine with ``tick`` where they need it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import server_config
from rollout_helpers import Fleet, SimDevice

from server.app import ServerHandle, start_server
from server.cli import main as cli_main
from server.rollout.service import ServiceConfig, tick


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_server(server_config(tmp_path_factory.mktemp("server"),
                                        rollout_tick_interval_s=3600))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def fleet(server: ServerHandle) -> Fleet:
    f = Fleet(server.url, server.operator_token, server.config.enrollment_tokens[0])
    f.publish(1)
    f.publish(2)
    return f


def enroll(fleet: Fleet, group: str, count: int) -> list[SimDevice]:
    return fleet.enroll(count, tags=lambda i: {"group": group, "store": f"s{i % 3}"})


def post(server: ServerHandle, path: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {server.operator_token}", **kwargs.pop("headers", {})}
    return requests.post(server.url + path, headers=headers, timeout=30, **kwargs)


def test_rollouts_need_the_operator_token(server: ServerHandle, fleet: Fleet) -> None:
    device = enroll(fleet, "auth", 1)[0]
    for headers in ({}, {"Authorization": f"Bearer {device.token}"}):
        resp = requests.get(server.url + "/api/v1/rollouts", headers=headers, timeout=10)
        assert resp.status_code == 401
        resp = requests.post(server.url + "/api/v1/rollouts", headers=headers, timeout=10,
                             json={"release": "digits@2", "select": ["group=auth"]})
        assert resp.status_code == 401 and "token" in resp.json()["error"]


GOOD = {"release": "digits@2", "select": ["group=bad"]}


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"stages": "1%,10%,50%"}, 422, "the last stage must be 100% so every selected device"),
        ({"stages": "10%,5%,100%"}, 422, "stage sizes must increase"),
        ({"stages": "5%,10"}, 422, "is a count after a percentage"),
        ({"stages": ""}, 422, "give a comma-separated list like 1%,10%,100%"),
        ({"stages": "0%,100%"}, 422, "stage 1 size '0%' must be more than zero"),
        ({"release": "digits@99"}, 404, "no published release digits@99"),
        ({"release": "digits"}, 422, "must look like NAME@RELEASE"),
        ({"release": "Digits@2"}, 422, "release 'Digits@2'"),
        ({"soak": "30 minutes"}, 422, "is not a duration"),
        ({"timeout": "0s"}, 422, "must be longer than zero"),
        ({"max_failure": "lots"}, 422, "stage 1 max-failures 'lots' is not valid"),
        ({"max_latency_regression": "10"}, 422, "must be a percentage like 10%"),
        ({"min_golden_accuracy": "120%"}, 422, "must be at most 100%"),
        ({"select": ["store"]}, 422, "must look like key=value"),
        ({"select": []}, 422, "the rollout selects no devices"),
        ({"select": ["group=nobody"]}, 422, "the selector matches no enrolled devices"),
        ({"select": [], "devices": ["dev-missing"]}, 404, "listed devices are not enrolled"),
        ({"window_cron": "0 2 * * *"}, 422, "needs both a cron line and a duration"),
        ({"window_cron": "99 2 * * *", "window_duration": "2h"}, 422, "cron"),
        ({"variants": {"rpi4": "fp64"}}, 422, "is not one of"),
        ({"variants": {"rpi4": "edgetpu"}}, 404, "has no edgetpu variant"),
        ({"min_sample": "10"}, 422, "min_sample: Input should be a valid integer"),
        ({"releese": "digits@2"}, 422, "releese: Extra inputs are not permitted"),
        ({"spec": {"release": "digits@2"}}, 422, "either a whole spec or the individual"),
        ({"max_concurrent_downloads": 0}, 422, "max_concurrent_downloads"),
    ],
)
def test_bad_operator_input_gets_a_clear_4xx(
    server: ServerHandle, fleet: Fleet, change: dict[str, Any], status: int, message: str
) -> None:
    if not fleet.call("GET", "/api/v1/devices?tag=group=bad"):
        enroll(fleet, "bad", 2)
    resp = post(server, "/api/v1/rollouts", json={**GOOD, **change})
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'{"select": ["group=bad"]}', "release is required"),
        (b'{"spec": {"selector": {}, "stages": [], "release": "digits@2"}}',
         "a rollout needs at least one stage"),
        (b'{"spec": "everything"}', "spec: Input should be a valid dictionary"),
    ],
)
def test_garbage_bodies_are_refused(server: ServerHandle, body: bytes, message: str) -> None:
    resp = post(server, "/api/v1/rollouts", data=body,
                headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert message in resp.json()["error"]


def test_overlaps_transitions_and_unknown_rollouts_are_refused(
    server: ServerHandle, fleet: Fleet
) -> None:
    enroll(fleet, "overlap", 4)
    first = fleet.create(release="digits@2", select=["group=overlap"], stages="50%,100%",
                         start=True)
    again = fleet.create(expect=409, release="digits@2", select=["store=s1"], stages="100%")
    assert f"already in active rollout {first['id']}" in again["error"]
    approve = fleet.act(first["id"], "approve", expect=409)
    assert approve["error"] == ("cannot approve a rollout that is running; "
                                "allowed now: pause, abort, revert")
    assert fleet.act(first["id"], "start", expect=409)["error"].startswith("cannot start")
    assert fleet.act("ro-000000000000", "pause", expect=404)["error"] == (
        "no rollout 'ro-000000000000'")
    assert "Input should be" in fleet.act(first["id"], "explode", expect=422)["error"]
    assert fleet.call("GET", "/api/v1/rollouts/ro-nope", expect=404)["error"]
    assert fleet.call("GET", "/api/v1/rollouts/bad%20id", expect=422)["error"]
    assert fleet.call("GET", "/api/v1/rollouts?state=sleeping", expect=422)["error"]
    fleet.act(first["id"], "abort")
    assert fleet.act(first["id"], "resume", expect=409)["error"] == (
        "cannot resume a rollout that is aborted; allowed now: revert")


def test_status_shows_stages_gates_and_why_it_paused(server: ServerHandle, fleet: Fleet) -> None:
    devices = enroll(fleet, "status", 6)
    out = fleet.create(release="digits@2", select=["group=status"], stages="1,50%,100%",
                       soak="0s", max_failure="0")
    rid = out["id"]
    assert out["state"] == "draft" and out["decision"] is None
    started = fleet.act(rid, "start")
    assert started["devices"] == 6 and started["rollout"]["state"] == "running"
    result = tick(server.db, rid, ServiceConfig.from_server(server.config))
    assert result is not None and len(result.started) == 1
    told = next(d for d in devices if d.device_id in result.started)
    fleet.install(told, 2, outcome="fail")
    tick(server.db, rid, ServiceConfig.from_server(server.config))

    view = fleet.rollout(rid)
    assert (view["state"], view["stage"], view["stages"], view["devices"]) == ("paused", 1, 3, 6)
    assert [s["devices"] for s in view["stage_list"]] == [1, 2, 3]
    assert view["stage_list"][0]["failed"] == 1
    assert view["held_devices"] == [told.device_id]
    reason = view["paused_reason"]
    assert reason.startswith("stage 1/3 (1) paused: ")
    assert ("error_threshold in stage 1: 1 devices > limit 0 devices "
            "(1 of 1 devices failed)") in reason
    assert "install_failure_rate on profile x86-gateway: 100.0% > limit 5.0%" in reason
    error_gate = next(g for g in view["tripped"] if g["name"] == "error_threshold")
    assert (error_gate["value"], error_gate["limit"], error_gate["unit"]) == (1.0, 0.0, "devices")
    assert error_gate["text"].startswith("error_threshold in stage 1: 1 devices > limit 0")
    devices_view = fleet.call("GET", f"/api/v1/rollouts/{rid}/devices?status=failed")
    assert [(d["device_id"], d["reason"]) for d in devices_view] == [
        (told.device_id, "download: connection reset")]
    listed = fleet.call("GET", "/api/v1/rollouts?state=paused")
    assert rid in [r["id"] for r in listed]
    history = fleet.call("GET", f"/api/v1/rollouts/{rid}/history")
    assert [h["trigger"] for h in history] == ["create", "start", "gate_tripped"]
    assert history[-1]["reason"] == view["paused_reason"]
    fleet.act(rid, "abort")
    reverted = fleet.act(rid, "revert")
    # The failed device never ran release 1: nothing to go back to.
    assert reverted["devices"] == 0 and reverted["skipped"] == [told.device_id]


def run_cli(server: ServerHandle, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = cli_main(["--server", server.url, "--token", server.operator_token, "rollout", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


def test_cli_creates_watches_and_steers_a_rollout(
    server: ServerHandle, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(fleet, "cli", 4)
    created = run_cli(server, capsys, "create", "--release", "digits@2", "--select", "group=cli",
                      "--stages", "50%,100%", "--soak", "0s", "--max-failure", "2%",
                      "--max-latency-regression", "15%", "--max-power-regression", "off",
                      "--stage-timeout", "20m", "--start", "--json")
    rid = created["id"]
    assert created["state"] == "running"
    limits = created["stage_list"][0]["limits"]
    assert (limits["max_latency_regression"], limits["max_power_regression"]) == ("15%", None)
    assert created["stage_list"][0]["timeout"] == "20m"
    tick(server.db, rid, ServiceConfig.from_server(server.config))

    text = run_cli(server, capsys, "status", rid)
    assert f"rollout {rid}  digits@2  running  stage 1/2  (4 devices)" in text
    assert "STAGE  SIZE  STATE" in text and "error_threshold" in text
    assert run_cli(server, capsys, "status", rid, "--json")["id"] == rid
    assert rid in run_cli(server, capsys, "list")
    assert rid in [r["id"] for r in run_cli(server, capsys, "list", "--json")]
    assert run_cli(server, capsys, "pause", rid, "--json")["rollout"]["state"] == "paused"
    assert "running" in run_cli(server, capsys, "resume", rid)
    assert len(run_cli(server, capsys, "devices", rid, "--stage", "1", "--json")) == 2
    assert "gate_tripped" not in run_cli(server, capsys, "history", rid)
    assert run_cli(server, capsys, "abort", rid, "--json")["rollout"]["state"] == "aborted"
    reverted = run_cli(server, capsys, "revert", rid, "--json")
    assert reverted["rollout"]["state"] == "reverted"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--release", "digits@2", "--select", "group=cli", "--stages", "1%,50%"],
         "server answered 422: the last stage must be 100%"),
        (["create", "--release", "digits@2", "--select", "group=cli", "--variant", "rpi4"],
         "--variant 'rpi4' must look like PROFILE=VARIANT"),
        (["status", "ro-000000000000"], "server answered 404: no rollout 'ro-000000000000'"),
    ],
)
def test_cli_reports_refusals_in_one_line(
    server: ServerHandle, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = cli_main(["--server", server.url, "--token", server.operator_token, "rollout", *argv])
    _, err = capsys.readouterr()
    assert code == 1
    assert message in err and err.count("\n") == 1

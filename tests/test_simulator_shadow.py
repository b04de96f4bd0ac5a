"""Simulated devices shadow a candidate as the agent does: the check-in names it, each
window's results carry the agreement, and the server's scheduler judges it. A release
weak on one class pauses its rollout naming the class; an agreeing one passes the
shadow phase and installs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Operator
from waiting import wait_for

from server import cli
from server.app import ServerHandle
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour

DASHBOARD = Path(__file__).parent.parent / "dashboards" / "grafana-edgefleet.json"


@pytest.fixture
def server(server_factory: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    handle = server_factory(tmp_path / "server", rollout_tick_interval_s=0.5)
    op = Operator(handle.url, handle.operator_token)
    op.publish(1)
    op.publish(2)
    return handle


@pytest.fixture
def fleet_of(server: ServerHandle, tmp_path: Path) -> Iterator[Callable[..., FleetThread]]:
    threads: list[FleetThread] = []

    def make(prefix: str, effects: tuple[str, ...]) -> FleetThread:
        cfg = SimConfig(devices=4, prefix=prefix, stores=2, regions=1, poll_s=0.3,
                        telemetry=WindowSpec(window_s=0.5, fps=20.0))
        behaviour = build_behaviour(("x86-gateway",), effects, seed=7)
        root = (server.repo.metadata_dir / "1.root.json").read_bytes()
        thread = FleetThread(
            lambda: Fleet(server.url, cfg, behaviour, tmp_path / prefix, pinned_root=root))
        thread.start(lambda fleet: fleet.enroll(server.config.enrollment_tokens[0]))
        threads.append(thread)
        return thread

    yield make
    for thread in threads:
        thread.stop()


def shadow_rollout(op: Operator, prefix: str, fleet: FleetThread, duration: str = "6s") -> str:
    op.assign(1, tag=f"fleet={prefix}")
    wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 4)
    # A 60% minimum: a class at 20% trips it, an overall agreement near 92% never does.
    out = op.call("POST", "/api/v1/rollouts", json={
        "release": "digits@2", "select": [f"fleet={prefix}"], "stages": "50%,100%",
        "soak": "0s", "min_sample": 2, "shadow_every": 1, "min_shadow_agreement": "60%",
        "shadow_min_frames": 20, "shadow_duration": duration, "max_latency_regression": None,
        "max_power_regression": None,
        "start": True})
    rid: str = out["id"]
    return rid


def test_a_candidate_weak_on_one_class_pauses_naming_it(
    server: ServerHandle, fleet_of: Callable[..., FleetThread], capsys: pytest.CaptureFixture[str]
) -> None:
    op = Operator(server.url, server.operator_token)
    fleet = fleet_of("weak", ("2:weak_class=7,weak_agreement=0.2",))
    rid = shadow_rollout(op, "weak", fleet)

    def paused() -> dict[str, Any] | None:
        view: dict[str, Any] = op.call("GET", f"/api/v1/rollouts/{rid}")
        return view if view["state"] == "paused" else None

    view = wait_for("the shadow gate to trip", paused, timeout_s=60)
    assert "for class '7'" in view["paused_reason"]
    tripped = {(g["name"], g["subject"]) for g in view["tripped"]}
    assert ("shadow_class_agreement", "class '7'") in tripped
    report = op.call("GET", f"/api/v1/rollouts/{rid}/shadow")["profiles"]["x86-gateway"]
    seven = next(c for c in report["classes"] if c["class"] == "7")
    assert seven["agreement"] < 0.5 and seven["confused_with"] == "8"
    assert {g["subject"] for g in view["tripped"] if g["name"] == "shadow_class_agreement"} == {
        "class '7'"}
    others = [c for c in report["classes"] if c["class"] != "7"]
    assert sum(c["agreed"] for c in others) / sum(c["frames"] for c in others) > 0.9
    assert report["candidate_p95_ms"] is not None and report["devices"] == 2
    assert fleet.report().shadow_windows > 0
    assert fleet.report().releases == {"digits@1": 4}  # nobody installed the candidate
    metrics = op.session.get(f"{server.url}/metrics", timeout=30).text
    labels = f'model="digits",profile="x86-gateway",release="2",rollout="{rid}"'
    assert f"edgefleet_shadow_agreement_ratio{{{labels}}}" in metrics
    accuracy = op.call("GET", "/api/v1/accuracy")["shadow"]
    assert [(r["rollout"], r["profile"]) for r in accuracy] == [(rid, "x86-gateway")]
    assert accuracy[0]["class_min"] < 0.5 < accuracy[0]["agreement"]
    login = ["--server", server.url, "--token", server.operator_token]
    assert cli.main([*login, "accuracy"]) in (0, None)
    out = capsys.readouterr().out
    assert "shadow evaluation (candidate against serving model)" in out and rid in out
    assert cli.main([*login, "rollout", "shadow", rid]) in (0, None)
    out = capsys.readouterr().out
    assert "profile x86-gateway:" in out and "8 (" in out  # class 7 mistaken for 8
    # Every shadow query of the Grafana dashboard is a metric served here.
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    queried = set(re.findall(r"\bedgefleet_shadow_[a-z0-9_]+", exprs))
    assert len(queried) == 4 and all(f"{name}{{" in metrics for name in queried), queried


def test_an_agreeing_candidate_passes_shadow_and_installs(
    server: ServerHandle, fleet_of: Callable[..., FleetThread]
) -> None:
    op = Operator(server.url, server.operator_token)
    fleet = fleet_of("good", ())
    rid = shadow_rollout(op, "good", fleet)
    wait_for("the rollout to complete", lambda: op.call(
        "GET", f"/api/v1/rollouts/{rid}")["state"] == "completed", timeout_s=90)
    moves = [h["trigger"] for h in op.call("GET", f"/api/v1/rollouts/{rid}/history")]
    assert moves.count("shadow_passed") == 2  # each stage shadowed before installing
    assert fleet.report().releases == {"digits@2": 4}

"""The walking skeleton end to end, on loopback, in both storage/broker modes.

publish -> enroll -> check-in -> TUF download -> install -> inference ->
telemetry received by the server. "embedded" is SQLite with the embedded
broker; "production" is PostgreSQL with Mosquitto (mandatory in CI).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Operator, enroll_agent
from waiting import wait_for

from agent.daemon import Agent


@pytest.fixture(params=["embedded", "production"])
def fleet(
    request: pytest.FixtureRequest, server_factory: Callable[..., Any], tmp_path: Path
) -> Any:
    if request.param == "production":
        db_url = request.getfixturevalue("pg_url")
        mqtt_url = request.getfixturevalue("mosquitto_url")
        return server_factory(tmp_path / "server", db_url=db_url, mqtt_url=mqtt_url)
    return server_factory(tmp_path / "server")


def _agent(fleet: Any, tmp_path: Path, name: str, board: str = "x86-gateway") -> Agent:
    root = fleet.repo.metadata_dir / "1.root.json"
    return enroll_agent(
        fleet.url,
        fleet.config.enrollment_tokens[0],
        root_json=root,
        work=tmp_path / name,
        board=board,
    )


def test_signed_model_travels_to_the_agent_and_runs(fleet: Any, tmp_path: Path) -> None:
    op = Operator(fleet.url, fleet.operator_token)
    published = op.publish(1)
    agent = _agent(fleet, tmp_path, "cam1", board="jetson-orin-nano")
    device_id = agent.identity.device_id
    agent.start()
    try:
        assert agent.checkin_once() is False  # nothing assigned yet
        op.assign(1, tag="fleet=test")
        assert agent.checkin_once() is True
        installed = agent.updater.installed()
        assert installed is not None
        assert (installed.name, installed.release, installed.slot) == ("digits", 1, "a")
        assert installed.sha256 == published["sha256"]

        telemetry = wait_for(
            "a telemetry window for release 1",
            lambda: (
                (t := op.latest(device_id, "telemetry")).get("release") == 1
                and (t.get("invoke_ms") or {}).get("p50")
                and t
            ),
        )
        assert telemetry["inferences"] > 0 and telemetry["fps"] > 0
        assert 0 < telemetry["invoke_ms"]["p50"] <= telemetry["invoke_ms"]["p99"]
        assert telemetry["rss_mb"] > 0 and telemetry["slot"] == "a"
        results = wait_for("results", lambda: op.latest(device_id, "results").get("class_counts"))
        assert sum(results.values()) > 0

        assert agent.checkin_once() is False  # already on the desired release
        detail = op.device(device_id)
        assert detail["installed"]["release"] == 1
        assert detail["profile"] == "jetson-orin-nano"
        events = [(e["type"], e["state"]) for e in detail["events"]]
        assert ("update", "commit") in events
    finally:
        agent.stop()


def test_second_release_replaces_the_first_and_a_device_assignment_wins(
    fleet: Any, tmp_path: Path
) -> None:
    op = Operator(fleet.url, fleet.operator_token)
    op.publish(1)
    op.publish(2)
    first, second = _agent(fleet, tmp_path, "a"), _agent(fleet, tmp_path, "b")
    for agent in (first, second):
        agent.start()
    try:
        op.assign(1, tag="fleet=test")
        op.assign(2, device=second.identity.device_id)
        assert first.checkin_once() and second.checkin_once()
        assert first.updater.installed().release == 1  # type: ignore[union-attr]
        assert second.updater.installed().release == 2  # type: ignore[union-attr]
        op.assign(2, tag="fleet=test")
        assert first.checkin_once() is True
        assert first.updater.installed().release == 2  # type: ignore[union-attr]
        assert first.updater.installed().slot == "b"  # type: ignore[union-attr]
    finally:
        for agent in (first, second):
            agent.stop()

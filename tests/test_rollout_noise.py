"""Gates that do not trip on noise, through the real server: a device's figure needs three
telemetry windows, and estimated power is gated only when the rollout asks for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rollout_helpers import Fleet, SimDevice, Telemetry, tick_once
from sqlalchemy import func, select
from waiting import wait_for

from server.app import ServerHandle
from server.cli.rollout import status_text
from server.db.tables import TelemetryRollup, utcnow


@pytest.fixture
def server(server_factory: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    return server_factory(tmp_path / "server", rollout_tick_interval_s=3600)








def windows(server: ServerHandle, release: int) -> int:
    with server.db.session() as s:
        query = select(func.sum(TelemetryRollup.windows)).where(TelemetryRollup.release == release)
        return int(s.scalar(query) or 0)


def power_rollout(fleet: Fleet, server: ServerHandle, telemetry: Telemetry, *, source: str,
                  repeat: int = 3, **options: Any) -> tuple[str, list[SimDevice]]:
    """Four devices at 2000 mW on release 1 and 3000 mW (+50%) on release 2."""
    devices = fleet.enroll(4)
    fleet.bring_to(devices, 1)
    before = utcnow().timestamp() - 120
    for dev in devices:
        telemetry.window(dev, 1, p95_ms=10.0, power_mw=2000.0, ts=before, source=source)
    wait_for("baseline rollups", lambda: windows(server, 1) == 12)
    rid: str = fleet.create(release="digits@2", select=["fleet=test"], stages="100%",
                            soak="0s", min_sample=4, max_latency_regression=None,
                            max_power_regression="10%", start=True, **options)["id"]
    assert len(tick_once(server, rid).started) == 4
    for dev in devices:
        fleet.install(dev, 2)
        telemetry.window(dev, 2, p95_ms=10.0, power_mw=3000.0, source=source, repeat=repeat)
    wait_for("release 2 rollups", lambda: windows(server, 2) == 4 * repeat)
    return rid, devices


def test_estimated_power_is_not_gated_unless_asked(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    rid, _ = power_rollout(fleet, server, telemetry, source="estimate")
    result = tick_once(server, rid)
    assert result.decision.status.state.value == "completed", result.decision.reason
    power = next(g for g in result.decision.gates if g.name == "power_regression")
    assert power.value is None and power.sample == 0


def test_estimated_power_is_gated_when_asked(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    rid, _ = power_rollout(fleet, server, telemetry, source="estimate",
                           gate_estimated_power=True)
    result = tick_once(server, rid)
    assert result.decision.status.state.value == "paused"
    assert "power_regression on profile x86-gateway: 50.0% > limit 10.0%" in (
        result.decision.reason)
    view = fleet.rollout(rid)
    kept = view["paused_gates"]
    assert [(g["name"], g["value"]) for g in kept] == [("power_regression", 50.0)]
    text = status_text(view)
    assert "paused on (as measured then):" in text and "gates now:" in text


def test_one_window_is_not_enough_to_judge_a_device(
    server: ServerHandle, fleet: Fleet, telemetry: Telemetry
) -> None:
    rid, _ = power_rollout(fleet, server, telemetry, source="sensor", repeat=1)
    result = tick_once(server, rid)
    assert result.decision.status.state.value == "running"
    assert any("power_regression on profile x86-gateway: waiting for data from 4 more devices"
               in w for w in result.decision.waiting)

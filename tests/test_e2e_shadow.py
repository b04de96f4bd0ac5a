"""Shadow evaluation end to end with real agents: LiteRT on real frames, the candidate
fetched through TUF, agreement over MQTT, the server's scheduler judging it.

The candidate is the serving INT8 model with one class (3) collapsed. Two agents
watch the held-out digits; the stage shadows before any device installs, and the
rollout pauses naming class '3' with its numbers, while both agents keep release 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import Operator, enroll_agent
from quantize_helpers import damage_class, digits_pixels
from waiting import wait_for

from agent.daemon import Agent
from server.app import ServerHandle

COLLAPSED = 3


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    """The held-out digits as camera frames (uint8, 64x64), one .npy each."""
    x, _ = digits_pixels()
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(x):
        np.save(folder / f"{i:03d}.npy", frame)
    return folder


@pytest.fixture
def agents(server_factory: Callable[..., ServerHandle], tmp_path: Path,
           frames: Path) -> Iterator[tuple[ServerHandle, list[Agent]]]:
    server = server_factory(tmp_path / "server", rollout_tick_interval_s=0.5)
    op = Operator(server.url, server.operator_token)
    op.publish(1)
    op.publish_file(damage_class(tmp_path / "collapsed.tflite", COLLAPSED), 2)
    started: list[Agent] = []
    for name in ("cam-a", "cam-b"):
        agent = enroll_agent(
            server.url, server.config.enrollment_tokens[0],
            root_json=server.repo.metadata_dir / "1.root.json", work=tmp_path / name,
            inference=f'frames = "dir:{frames}"\n',
        )  # fmt: skip
        agent.start()
        started.append(agent)
    try:
        op.assign(1, tag="fleet=test")
        for agent in started:
            assert agent.checkin_once() is True
        yield server, started
    finally:
        for agent in started:
            agent.stop()


def test_a_candidate_that_collapses_one_class_pauses_its_rollout_in_shadow(
    agents: tuple[ServerHandle, list[Agent]],
) -> None:
    server, devices = agents
    op = Operator(server.url, server.operator_token)
    out = op.call("POST", "/api/v1/rollouts", json={
        "release": "digits@2", "select": ["fleet=test"], "stages": "100%", "soak": "0s",
        "min_sample": 2, "shadow_every": 2, "min_shadow_agreement": "50%",
        "shadow_min_frames": 15, "shadow_duration": "3s", "shadow_cpu_budget": "50%",
        "max_latency_regression": None, "max_power_regression": None, "start": True})
    rid = out["id"]
    # A 50% minimum: the collapsed class (0% agreement) trips it on its own, while the
    # candidate's overall agreement (about 90%) cannot, however few frames are in.

    def paused() -> dict[str, Any] | None:
        for agent in devices:
            agent.checkin_once()  # learns the candidate; stops shadowing once paused
        view: dict[str, Any] = op.call("GET", f"/api/v1/rollouts/{rid}")
        return view if view["state"] == "paused" else None

    view = wait_for("the rollout paused by the shadow gate", paused, timeout_s=90)
    reason = view["paused_reason"]
    assert f"shadow_class_agreement on profile x86-gateway for class '{COLLAPSED}'" in reason
    report = op.call("GET", f"/api/v1/rollouts/{rid}/shadow")["profiles"]["x86-gateway"]
    assert report["devices"] == 2
    collapsed = next(c for c in report["classes"] if c["class"] == str(COLLAPSED))
    assert collapsed["frames"] >= 5 and collapsed["agreed"] == 0
    assert collapsed["confused_with"] is not None and collapsed["confused_with"] != "3"
    others = [c for c in report["classes"] if c["class"] != str(COLLAPSED)]
    assert sum(c["agreed"] for c in others) >= 0.95 * sum(c["frames"] for c in others)
    # Measured on the device, from real invokes.
    assert report["candidate_p95_ms"] > 0 and report["serving_p95_ms"] > 0
    # Nobody installed the candidate, and a paused rollout shadows nowhere.
    for agent in devices:
        installed = agent.updater.installed()
        assert installed is not None and installed.release == 1
        agent.checkin_once()
    # The candidate file is gone once the device hears the shadow ended.
    assert not [p for a in devices for p in (a.cfg.state_dir / "shadow").glob("*.tflite")]

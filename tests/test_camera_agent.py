"""A camera in the daemon: its frames reach the model, its failures are the camera's.

An MJPEG camera on loopback feeds the real inference worker and a real agent
enrolled with a real server. When the camera goes down the model is not
blamed: the worker reports a camera error (and recovery) on its own channel,
the telemetry window carries the camera's counters, and the agent tells the
server with a ``camera`` event while it keeps running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from camera_helpers import WAIT_S, MjpegServer
from fleet_helpers import Operator, enroll_agent
from waiting import wait_for

from agent.inference.capture import CaptureOptions
from agent.inference.runtime import load_model
from agent.update.smoke import RuntimeChoice
from agent.worker import InferenceWorker

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "digits_int8_r1.tflite"
FAST = CaptureOptions(stall_after_s=1.0, read_timeout_s=1.0, open_timeout_s=3.0,
                      io_timeout_s=1.0, backoff_initial_s=0.2, backoff_max_s=0.5)


class Recorder:
    """What the worker publishes, and its camera transitions, collected across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.camera: list[tuple[str, str | None]] = []

    def publish(self, channel: str, payload: dict[str, Any]) -> None:
        with self.lock:
            self.messages.append((channel, payload))

    def on_camera(self, state: str, error: str | None) -> None:
        with self.lock:
            self.camera.append((state, error))

    def windows(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p for c, p in self.messages if c == "telemetry"]


def manifest() -> dict[str, Any]:
    model = load_model(MODEL)
    try:
        shape = [int(d) for d in model.input.shape]
    finally:
        model.close()
    contract = {"layout": "NHWC", "height": shape[1], "width": shape[2], "channels": shape[3],
                "resize": "bilinear", "crop": 1.0, "color": "RGB", "range": [0.0, 1.0]}
    return {"name": "digits", "release": 1, "variant": "int8-cpu", "input": contract,
            "labels": [str(i) for i in range(10)]}


def test_a_dead_camera_is_reported_and_recovers_without_blaming_the_model(
    tmp_path: Path,
) -> None:
    camera = MjpegServer(fps=20)
    rec = Recorder()
    worker = InferenceWorker(
        RuntimeChoice("auto", 1, None, ""), camera.url, rec.publish, window_s=0.3, warmup=0,
        capture=lambda: FAST, on_camera=rec.on_camera,
    )  # fmt: skip
    slot = tmp_path / "a"
    slot.mkdir()
    (slot / "model.tflite").write_bytes(MODEL.read_bytes())
    worker.start()
    try:
        worker.swap(slot / "model.tflite", manifest())
        assert worker.wait_healthy(5, WAIT_S) is None
        streaming = wait_for(
            "a window with camera fps",
            lambda: next((w for w in reversed(rec.windows())
                          if (w.get("camera") or {}).get("camera_fps")), None),
            WAIT_S,
        )
        camera_block = streaming["camera"]
        assert camera_block["state"] == "streaming" and camera_block["frames_captured"] > 0
        assert camera_block["processed_fps"] == streaming["fps"]
        port = camera.port
        camera.stop()
        wait_for("a camera error", lambda: any(s == "error" for s, _ in rec.camera), WAIT_S)
        state, error = rec.camera[0]
        assert state == "error" and error
        down = wait_for(
            "a window naming the camera error",
            lambda: next((w for w in reversed(rec.windows())
                          if (w.get("camera") or {}).get("error")), None),
            WAIT_S,
        )
        assert down["errors"] == 0  # the model did nothing wrong
        camera = MjpegServer(port=port, fps=20)
        wait_for("the camera back", lambda: rec.camera[-1][0] == "ok", WAIT_S)
        before = worker.total_inferences
        wait_for("inferences again", lambda: worker.total_inferences > before + 5, WAIT_S)
        reconnected = wait_for(
            "a window counting the reconnect",
            lambda: sum((w.get("camera") or {}).get("reconnects", 0) for w in rec.windows()),
            WAIT_S,
        )
        assert reconnected >= 1
    finally:
        worker.stop()
        camera.stop()


@pytest.fixture
def server(server_factory: Callable[..., Any], tmp_path: Path) -> Any:
    return server_factory(tmp_path / "server")


def test_the_agent_tells_the_server_when_its_camera_dies(server: Any, tmp_path: Path) -> None:
    camera = MjpegServer(fps=20)
    op = Operator(server.url, server.operator_token)
    op.publish(1)
    agent = enroll_agent(
        server.url, server.config.enrollment_tokens[0],
        root_json=server.repo.metadata_dir / "1.root.json", work=tmp_path / "cam",
        inference=f'frames = "{camera.url}"\n',
        extra="[camera]\nstall_after_s = 1.0\nread_timeout_s = 1.0\nbackoff_max_s = 0.5\n",
    )  # fmt: skip
    device_id = agent.identity.device_id
    runner = threading.Thread(target=agent.run_forever, daemon=True)
    try:
        op.assign(1, tag="fleet=test")
        runner.start()
        wait_for("release 1 installed from camera frames",
                 lambda: (i := agent.updater.installed()) is not None and i.release == 1, WAIT_S)
        telemetry = wait_for(
            "camera telemetry at the server",
            lambda: (t := op.latest(device_id, "telemetry")).get("camera") and t, WAIT_S,
        )
        assert telemetry["camera"]["state"] == "streaming"
        camera.stop()

        def events() -> list[tuple[str, str]]:
            return [(e["type"], e["state"]) for e in op.device(device_id)["events"]]

        wait_for("a camera error event", lambda: ("camera", "error") in events(), WAIT_S)
        assert runner.is_alive()
        assert agent.updater.installed().release == 1  # type: ignore[union-attr]
    finally:
        agent.request_stop()
        runner.join(timeout=WAIT_S)
        camera.stop()

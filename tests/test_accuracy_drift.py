"""Drift flagged on a device fed shifted frames: real agents, real server, real MQTT.

The digits release is published through the accuracy gate with its FP32
original and a camera-space validation set, so its report holds the reference
distributions. Two real agents run it: one on frames of the validation
distribution (a lens as it should be), one on the same digits inverted (a lens
gone wrong). Only the second is flagged, with a PSI over the drift threshold and
the class that moved most named, in the REST API, in ``/metrics`` and in
``edgefleet accuracy``. Both pass the golden set, which is scored on the device's
stored set, not on its camera: the reason drift is measured on live predictions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import requests
from fleet_helpers import enroll_agent
from PIL import Image
from promtool import promtool_problems
from quantize_helpers import FP32, INT8, LABELS, digits_pixels, run_cli
from waiting import wait_for

from agent.daemon import Agent
from server.app import ServerHandle
from server.telemetry.accuracy import MIN_INFERENCES, PSI_DRIFT, PSI_WATCH

PER_CLASS = 10
DASHBOARD = Path(__file__).parent.parent / "dashboards" / "grafana-edgefleet.json"


@pytest.fixture(params=["embedded", "production"])
def server(request: pytest.FixtureRequest, server_factory: Callable[..., ServerHandle],
           tmp_path: Path) -> ServerHandle:  # fmt: skip
    if request.param == "production":
        db_url = request.getfixturevalue("pg_url")
        mqtt_url = request.getfixturevalue("mosquitto_url")
        return server_factory(tmp_path / "server", db_url=db_url, mqtt_url=mqtt_url)
    return server_factory(tmp_path / "server")


def write_frames(folder: Path, x: npt.NDArray[np.uint8], y: npt.NDArray[np.int64]) -> Path:
    """PER_CLASS images of each class as PNGs, named so the sorted order cycles the classes."""
    folder.mkdir()
    for cls in range(10):
        for rank, index in enumerate(np.flatnonzero(y == cls)[:PER_CLASS]):
            Image.fromarray(x[index], "RGB").save(folder / f"{rank:02d}_{cls}.png")
    return folder


def publish(server: ServerHandle, validation: Path) -> None:
    data = {"name": "digits", "release": "1", "variant": "int8-cpu", "input_range": "0,1",
            "labels": ",".join(LABELS.read_text().split()), "min_accuracy": "0.5"}  # fmt: skip
    files = {name: (path.name, path.read_bytes())
             for name, path in (("file", INT8), ("fp32", FP32), ("validation", validation),
                                ("golden_set", validation))}  # fmt: skip
    resp = requests.post(f"{server.url}/api/v1/models", data=data, files=files,
                         headers=operator(server), timeout=300)  # fmt: skip
    assert resp.status_code == 201, resp.text


def operator(server: ServerHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.operator_token}"}


def get(server: ServerHandle, path: str) -> Any:
    resp = requests.get(server.url + path, headers=operator(server), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json() if path.startswith("/api") else resp.text


def agent(server: ServerHandle, work: Path, frames: Path, board: str) -> Agent:
    return enroll_agent(
        server.url, server.config.enrollment_tokens[0],
        root_json=server.repo.metadata_dir / "1.root.json", work=work, board=board,
        inference=f'frames = "dir:{frames}"\n',
    )  # fmt: skip


def judged(server: ServerHandle, device_id: str) -> dict[str, Any] | None:
    """The device's release 1 row once enough inferences for a verdict have arrived."""
    rows = get(server, f"/api/v1/devices/{device_id}/accuracy")["releases"]
    row = next((r for r in rows if r["release"] == 1), None)
    if row is None or row["drift"] is None or row["inferences"] < 2 * MIN_INFERENCES:
        return None
    return dict(row)


def run_two_cameras(server: ServerHandle, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Publish through the gate, run a clear and an inverted camera; their judged rows."""
    x, y = digits_pixels()
    validation = tmp_path / "val.npz"
    np.savez(validation, x=x, y=y)
    publish(server, validation)
    cameras = {
        "clear": agent(server, tmp_path / "clear", write_frames(tmp_path / "ok", x, y),
                       "x86-gateway"),
        "inverted": agent(server, tmp_path / "inverted",
                          write_frames(tmp_path / "inv", 255 - x, y), "jetson-orin-nano"),
    }  # fmt: skip
    requests.post(f"{server.url}/api/v1/assignments", json={
        "name": "digits", "release": 1, "tag": "fleet=test"}, headers=operator(server), timeout=30,
    ).raise_for_status()  # fmt: skip
    for a in cameras.values():
        a.start()
    try:
        for a in cameras.values():
            assert a.checkin_once() is True
        ids = {name: a.identity.device_id for name, a in cameras.items()}
        return {
            name: {"device_id": device_id,
                   **wait_for(f"a verdict on the {name} camera", partial(judged, server, device_id),
                              120)}
            for name, device_id in ids.items()
        }  # fmt: skip
    finally:
        for a in cameras.values():
            a.stop()


def check_metrics(server: ServerHandle) -> None:
    metrics = get(server, "/metrics")

    def gauge(name: str, profile: str) -> float:
        found = re.search(rf'^{name}\{{model="digits",profile="{profile}",release="1"\}} (\S+)$',
                          metrics, re.M)  # fmt: skip
        assert found is not None, name
        return float(found.group(1))

    assert gauge("edgefleet_accuracy_class_drift_psi", "jetson-orin-nano") >= PSI_DRIFT
    assert gauge("edgefleet_accuracy_class_drift_psi", "x86-gateway") < PSI_WATCH
    assert gauge("edgefleet_accuracy_drifting_devices", "jetson-orin-nano") == 1
    assert gauge("edgefleet_accuracy_drifting_devices", "x86-gateway") == 0
    assert gauge("edgefleet_accuracy_golden_set_ratio", "x86-gateway") > 0.9
    assert 0 < gauge("edgefleet_accuracy_confidence_mean_ratio", "x86-gateway") <= 1
    # Every accuracy metric the Grafana dashboard queries is served, with samples, here.
    panels = json.dumps(json.loads(DASHBOARD.read_text())["panels"])
    queried = set(re.findall(r"\bedgefleet_accuracy_[a-z0-9_]+", panels))
    assert len(queried) >= 5
    assert all(re.search(rf"^{name}(\{{| )", metrics, re.M) for name in queried), queried
    assert promtool_problems(metrics) == ""


def check_cli(server: ServerHandle, capsys: pytest.CaptureFixture[str], inverted: str,
              worst: str) -> None:  # fmt: skip
    base = ("--server", server.url, "--token", server.operator_token)
    capsys.readouterr()  # what enrolling printed
    code, out, _ = run_cli(capsys, *base, "accuracy")
    assert code == 0
    line = next(row for row in out.splitlines() if "jetson-orin-nano" in row)
    assert "drift" in line and inverted in line and worst in line
    assert "stable" in next(row for row in out.splitlines() if "x86-gateway" in row)
    code, out, _ = run_cli(capsys, *base, "accuracy", "--json")
    assert code == 0 and json.loads(out)["releases"]
    code, out, _ = run_cli(capsys, *base, "accuracy", "--device", inverted)
    assert code == 0 and "drift" in out and worst in out


def test_drift_is_flagged_on_the_device_fed_shifted_frames(
    server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = run_two_cameras(server, tmp_path)
    good, bad = rows["clear"], rows["inverted"]
    assert good["drift"]["status"] == "stable", good["drift"]
    assert good["drift"]["psi"] < PSI_WATCH
    assert bad["drift"]["status"] == "drift", bad["drift"]
    assert bad["drift"]["psi"] >= PSI_DRIFT
    worst = bad["drift"]["worst_class"]
    assert worst in LABELS.read_text().split()
    assert worst == next(iter(bad["drift"]["contributions"]))
    assert bad["golden_set_accuracy"] is not None and bad["golden_set_accuracy"] > 0.9

    fleet = get(server, "/api/v1/accuracy")
    by_profile = {r["profile"]: r for r in fleet["releases"] if r["model"] == "digits"}
    assert by_profile["x86-gateway"]["drift"]["status"] == "stable"
    assert by_profile["x86-gateway"]["drifting_devices"] == []
    inverted = by_profile["jetson-orin-nano"]
    assert inverted["drift"]["status"] == "drift" and inverted["drift"]["worst_class"] == worst
    assert [d["device_id"] for d in inverted["drifting_devices"]] == [bad["device_id"]]
    assert inverted["drifting_devices"][0]["worst_class"] == worst
    assert inverted["golden_set_accuracy"] > 0.9 and inverted["golden_set_devices"] == 1
    assert 0 < inverted["mean_confidence"] <= 1
    check_metrics(server)
    check_cli(server, capsys, bad["device_id"], worst)

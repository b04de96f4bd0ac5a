"""Golden sets: scored at publish, re-scored on the device, a miss rolls back locally.

The first test ships the old float format (x in [0, 1] at the model's size); the
second a camera-space set (uint8 at another size) for a model trained on
[-1, 1], so the device scores it through the release's signed input contract.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from fleet_helpers import FIXTURES, Operator, enroll_agent
from sqlalchemy import select

from agent.inference.scoring import GoldenSetSpec
from agent.protocol.input_options import ContractOptions
from server.db import queries
from server.db.tables import Event
from server.publish.golden_sets import golden_set_path
from server.publish.registry import publish_model

LABELS = tuple(str(i) for i in range(10))


def publish_with_set(
    op: Operator, release: int, min_accuracy: float, npz: Path, *,
    model: Path | None = None, input_range: str = "0,1",
) -> requests.Response:  # fmt: skip
    path = model or FIXTURES / f"digits_int8_r{release}.tflite"
    with open(path, "rb") as fh, open(npz, "rb") as golden:
        return op.session.post(
            op.url + "/api/v1/models",
            files={"file": (path.name, fh), "golden_set": ("val.npz", golden)},
            data={"name": "digits", "release": str(release), "variant": "int8-cpu",
                  "labels": ",".join(LABELS), "min_accuracy": str(min_accuracy),
                  "input_range": input_range},
            timeout=60,
        )  # fmt: skip


def device_accuracy(op: Operator, device_id: str) -> float:
    events = op.device(device_id)["events"]
    scored = [e for e in events if e["type"] == "golden_set"]
    assert scored, events
    detail = scored[0]["detail"]
    accuracy = detail.get("accuracy", (detail.get("detail") or {}).get("accuracy"))
    assert isinstance(accuracy, float)
    return accuracy


def test_golden_set_is_scored_on_publish_and_on_the_device(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "server")
    op = Operator(srv.url, srv.operator_token)
    npz = FIXTURES / "digits_val.npz"

    refused = publish_with_set(op, 1, 0.999, npz)
    assert refused.status_code == 422
    assert "below the minimum 0.9990" in refused.json()["error"]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really")
    bad = publish_with_set(op, 1, 0.5, garbage)
    assert bad.status_code == 422 and "golden set" in bad.json()["error"]

    ok = publish_with_set(op, 1, 0.9, npz)
    assert ok.status_code == 201, ok.text
    spec = GoldenSetSpec.from_extra(
        srv.repo.targets()["models/digits/1/int8-cpu.tflite"].custom["extra"]
    )
    assert spec is not None and spec.count == 300 and spec.reference_accuracy is not None
    assert spec.reference_accuracy > 0.95

    agent = enroll_agent(
        srv.url, srv.config.enrollment_tokens[0],
        root_json=srv.repo.metadata_dir / "1.root.json", work=tmp_path / "cam",
    )  # fmt: skip
    agent.start()
    try:
        op.assign(1, tag="fleet=test")
        assert agent.checkin_once() is True
        accuracy = device_accuracy(op, agent.identity.device_id)
        assert accuracy == pytest.approx(spec.reference_accuracy, abs=1e-3)

        # A release whose minimum this device's runtime misses (signed directly, as a
        # server with a more accurate reference runtime would) rolls back on the device.
        extra = {"golden_set": {**spec.to_extra(), "min_accuracy": 0.9999}}
        manifest = publish_model(
            srv.repo, FIXTURES / "digits_int8_r2.tflite", "digits", 2, "int8-cpu",
            labels=LABELS, extra=extra, input_options=ContractOptions(value_range=(0.0, 1.0)),
        )  # fmt: skip
        with srv.db.session() as s:
            queries.add_model(s, manifest)
        op.assign(2, tag="fleet=test")
        assert agent.checkin_once() is False
        assert agent.updater.installed().release == 1  # type: ignore[union-attr]
        assert "golden-set accuracy" in (agent.updater.record.reason or "")
        agent.flush_events()
        # Release 2 ships the same set: held by content, so not downloaded again; each
        # update's golden set and metadata bytes are counted with it.
        with srv.db.session() as s:
            rows = s.scalars(select(Event).where(
                Event.device_id == agent.identity.device_id, Event.type == "download",
                Event.state == "aux", Event.source == "http"))
            aux = {e.detail["release"]: e.detail for e in rows}
        size = npz.stat().st_size
        assert aux[1]["golden_set_bytes"] == size and aux[1]["metadata_bytes"] > 0
        assert aux[2]["golden_set_bytes"] == 0 and aux[2]["metadata_bytes"] > 0
        fleet = op.call("GET", "/api/v1/bandwidth")["fleet"]
        assert fleet["updates"] == 2
        assert fleet["aux_bytes"] == size + aux[1]["metadata_bytes"] + aux[2]["metadata_bytes"]
        assert fleet["bytes_sent"] >= fleet["aux_bytes"] + size // 10
        # Two full downloads: nothing saved, and the aux bytes do not make it look negative.
        assert fleet["saving_vs_int8"] == 0.0
    finally:
        agent.stop()
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    assert golden_set_path("digits", digest) in srv.repo.targets()


def test_camera_space_set_is_scored_through_the_signed_contract_on_the_device(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "server")
    op = Operator(srv.url, srv.operator_token)
    with np.load(FIXTURES / "digits_val.npz") as data:
        pixels, y = np.rint(data["x"] * 255.0).astype(np.uint8), data["y"]
    camera = np.stack([cv2.resize(f, (40, 48), interpolation=cv2.INTER_LINEAR) for f in pixels])
    npz = tmp_path / "camera.npz"
    np.savez_compressed(npz, x=camera, y=y)
    signed = FIXTURES / "digits_signed_int8.tflite"  # trained on [-1, 1]

    wrong = publish_with_set(op, 1, 0.9, npz, model=signed, input_range="0,1")
    assert wrong.status_code == 422 and "below the minimum" in wrong.json()["error"]
    ok = publish_with_set(op, 1, 0.9, npz, model=signed, input_range="-1,1")
    assert ok.status_code == 201, ok.text
    custom = srv.repo.targets()["models/digits/1/int8-cpu.tflite"].custom
    spec = GoldenSetSpec.from_extra(custom["extra"])
    assert spec is not None and spec.reference_accuracy is not None
    assert spec.reference_accuracy > 0.95
    assert custom["input"]["range"] == [-1.0, 1.0]

    agent = enroll_agent(
        srv.url, srv.config.enrollment_tokens[0],
        root_json=srv.repo.metadata_dir / "1.root.json", work=tmp_path / "cam",
    )  # fmt: skip
    agent.start()
    try:
        op.assign(1, tag="fleet=test")
        assert agent.checkin_once() is True
        accuracy = device_accuracy(op, agent.identity.device_id)
        assert accuracy == pytest.approx(spec.reference_accuracy, abs=1e-3)
        installed = agent.slots.active_manifest() or {}
        assert installed.get("input", {}).get("range") == [-1.0, 1.0]
    finally:
        agent.stop()

"""Golden sets: scored at publish, re-scored on the device, a miss rolls back locally."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from fleet_helpers import FIXTURES, Operator, enroll_agent

from agent.inference.scoring import GoldenSetSpec
from server.db import queries
from server.publish.golden_sets import golden_set_path
from server.publish.registry import publish_model

LABELS = tuple(str(i) for i in range(10))


def publish_with_set(
    op: Operator, release: int, min_accuracy: float, npz: Path
) -> requests.Response:
    path = FIXTURES / f"digits_int8_r{release}.tflite"
    with open(path, "rb") as model, open(npz, "rb") as golden:
        return op.session.post(
            op.url + "/api/v1/models",
            files={"file": (path.name, model), "golden_set": ("val.npz", golden)},
            data={"name": "digits", "release": str(release), "variant": "int8-cpu",
                  "labels": ",".join(LABELS), "min_accuracy": str(min_accuracy)},
            timeout=60,
        )  # fmt: skip


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
        events = op.device(agent.identity.device_id)["events"]
        scored = [e for e in events if e["type"] == "golden_set"]
        assert scored, events
        detail = scored[0]["detail"]
        accuracy = detail.get("accuracy", (detail.get("detail") or {}).get("accuracy"))
        assert accuracy == pytest.approx(spec.reference_accuracy, abs=1e-3)

        # A release whose minimum this device's runtime misses (signed directly, as a
        # server with a more accurate reference runtime would) rolls back on the device.
        extra = {"golden_set": {**spec.to_extra(), "min_accuracy": 0.9999}}
        manifest = publish_model(
            srv.repo, FIXTURES / "digits_int8_r2.tflite", "digits", 2, "int8-cpu",
            labels=LABELS, extra=extra,
        )  # fmt: skip
        with srv.db.session() as s:
            queries.add_model(s, manifest)
        op.assign(2, tag="fleet=test")
        assert agent.checkin_once() is False
        assert agent.updater.installed().release == 1  # type: ignore[union-attr]
        assert "golden-set accuracy" in (agent.updater.record.reason or "")
    finally:
        agent.stop()
    assert golden_set_path("digits", 1, "int8-cpu") in srv.repo.targets()

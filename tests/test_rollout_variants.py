"""A rollout sends each board profile the variant the operator named (``--variant
PROFILE=VARIANT``), through the check-in, instead of each device choosing its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fleet_helpers import Operator
from rollout_helpers import published_fleet

from server.app import ServerHandle
from server.rollout.service import ServiceConfig, tick


def test_the_variant_follows_the_profile(
    server_factory: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "server", rollout_tick_interval_s=3600)
    fleet = published_fleet(server)
    Operator(server.url, server.operator_token).publish(2, variant="int8-xnnpack")
    pis = fleet.enroll(2, profile="rpi4")
    corals = fleet.enroll(2, profile="coral-devboard")
    fleet.bring_to(pis + corals, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="100%", soak="0s",
                       variants={"coral-devboard": "int8-xnnpack"}, start=True)["id"]
    result = tick(server.db, rid, ServiceConfig.from_server(server.config))
    assert result is not None and len(result.started) == 4
    # Every device prefers int8-cpu; the rollout overrides that for the Coral boards only.
    for dev in pis:
        assert (fleet.checkin(dev) or {})["variant"] == "int8-cpu"
    for dev in corals:
        desired = fleet.checkin(dev) or {}
        assert desired["variant"] == "int8-xnnpack"
        assert desired["target_path"].endswith("int8-xnnpack.tflite")
    # The operator's view of a device resolves the same way.
    device = fleet.call("GET", f"/api/v1/devices/{corals[0].device_id}")
    assert device["desired"]["variant"] == "int8-xnnpack"

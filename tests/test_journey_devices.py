"""Enrollment conflicts and ``edgefleet device delete``: REST, the operator CLI and the store.

A hardware id that is already enrolled is refused (409) unless the request says
``replace`` and proves it is that device (its current token as the bearer; more in
tests/test_enroll_security.py); deleting a device revokes its HTTP token and MQTT
password at once and removes its rows, and its hardware id may then enroll again as a
new device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from mosquitto_proc import connack
from sqlalchemy import func, select

from server.app import ServerHandle
from server.cli import main as cli_main
from server.db import queries
from server.db.tables import Assignment, Database, DeviceTag, Event, TelemetryLatest, utcnow
from server.errors import ConflictError


@pytest.fixture
def server(server_factory: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    return server_factory(tmp_path / "server")


def enroll(
    server: ServerHandle,
    hw: str,
    replace: bool | None = None,
    proof: str | None = None,
    **tags: str,
) -> Any:
    body: dict[str, Any] = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": hw,
        "profile": "rpi4",
        "variant_preference": ["int8-cpu"],
        "tags": tags,
        "agent_version": "0.1.0",
    }
    if replace is not None:
        body["replace"] = replace
    headers = {"Authorization": f"Bearer {proof}"} if proof is not None else {}
    return requests.post(f"{server.url}/api/v1/enroll", json=body, headers=headers, timeout=10)


def checkin_status(server: ServerHandle, device_id: str, token: str) -> int:
    resp = requests.post(
        f"{server.url}/api/v1/devices/{device_id}/checkin",
        json={"state": "idle", "agent_version": "0.1.0"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    return resp.status_code


def cli(
    server: ServerHandle, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    code = cli_main(["--server", server.url, "--token", server.operator_token, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_enrolling_an_enrolled_hardware_id_needs_replace_and_proof(server: ServerHandle) -> None:
    first = enroll(server, "hw-twin", store="1").json()
    for replace in (None, False):
        resp = enroll(server, "hw-twin", replace, store="2")
        assert resp.status_code == 409
        detail = resp.json()["error"]
        assert f"already enrolled as {first['device_id']}" in detail and "--replace" in detail
    assert checkin_status(server, first["device_id"], first["device_token"]) == 200
    # ``replace`` alone is no longer enough: an enrollment token and a hardware id would
    # let anyone lock the real device out.
    resp = enroll(server, "hw-twin", True, store="2")
    assert resp.status_code == 409 and "current device token" in resp.json()["error"]
    assert checkin_status(server, first["device_id"], first["device_token"]) == 200

    resp = enroll(server, "hw-twin", True, proof=first["device_token"], store="2")
    assert resp.status_code == 200, resp.text
    second = resp.json()
    assert second["device_id"] == first["device_id"]
    assert checkin_status(server, first["device_id"], first["device_token"]) == 401
    assert checkin_status(server, second["device_id"], second["device_token"]) == 200
    with server.db.session() as s:
        device = queries.get_device(s, second["device_id"])
        assert device.tags == {"store": "2"}
        types = [e.type for e in queries.recent_events(s, device.id, 10)]
        assert types[:2] == ["reenrolled", "enrolled"]


def test_device_delete_revokes_credentials_and_removes_its_rows(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = enroll(server, "hw-gone", store="9").json()
    other = enroll(server, "hw-stays", store="9").json()
    device_id, mqtt = dev["device_id"], dev["mqtt"]
    assert not connack(mqtt["host"], mqtt["port"], device_id, mqtt["password"]).is_failure
    with server.db.session() as s:
        queries.store_telemetry(s, device_id, "state", {"status": "online"})
    code, _, err = cli(server, capsys, "token", "create")  # the CLI works before and after
    assert code == 0, err

    code, out, err = cli(server, capsys, "device", "delete", device_id)
    assert code == 0, err
    assert out.strip() == (
        f"deleted device {device_id} (hardware id hw-gone, profile rpi4); "
        "its token and MQTT password no longer work"
    )
    assert checkin_status(server, device_id, dev["device_token"]) == 401
    assert connack(mqtt["host"], mqtt["port"], device_id, mqtt["password"]).is_failure
    with server.db.session() as s:
        for table in (Event, DeviceTag, TelemetryLatest):
            count = s.scalar(select(func.count()).where(table.device_id == device_id))
            assert count == 0, table.__tablename__
    headers = {"Authorization": f"Bearer {server.operator_token}"}
    url = f"{server.url}/api/v1/devices"
    assert requests.get(f"{url}/{device_id}", headers=headers, timeout=10).status_code == 404
    assert [d["id"] for d in requests.get(url, headers=headers, timeout=10).json()] == [
        other["device_id"]
    ]
    assert checkin_status(server, other["device_id"], other["device_token"]) == 200

    code, _, err = cli(server, capsys, "device", "delete", device_id)
    assert code == 1 and f"server answered 404: no device '{device_id}'" in err
    assert requests.delete(f"{url}/{device_id}", timeout=10).status_code == 401

    # The hardware id is free again: a new device, no --replace needed.
    again = enroll(server, "hw-gone")
    assert again.status_code == 200, again.text
    assert again.json()["device_id"] != device_id


def test_store_delete_removes_assignments_to_the_device(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fleet.sqlite'}")
    db.create_all()

    def enroll_row(replace: bool = False) -> queries.Credentials:
        with db.session() as s:
            return queries.enroll_device(
                s, hardware_id="hw-row", profile="rpi4", variant_preference=["int8-cpu"],
                tags={}, agent_version="0.1.0", replace=replace,
            )  # fmt: skip

    creds = enroll_row()
    with pytest.raises(ConflictError, match="--replace"):
        enroll_row()
    assert enroll_row(replace=True).device_id == creds.device_id
    with db.session() as s:
        s.add(
            Assignment(
                target_kind="device", target_value=creds.device_id, name="digits", release=1,
                created_at=utcnow(),
            )
        )  # fmt: skip
    with db.session() as s:
        gone = queries.delete_device(s, creds.device_id)
        assert gone.hardware_id == "hw-row"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Assignment)) == 0
        assert queries.list_devices(s) == []
    db.dispose()

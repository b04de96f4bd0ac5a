"""The device hot paths (check-in, events, event batches) over HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from agent.protocol.api import (
    CHECKIN_PATH,
    EVENTS_BATCH_PATH,
    EVENTS_PATH,
    MAX_EVENT_BATCH,
    EnrollResponse,
    InstalledModel,
    checkin_body,
)
from server.app import ServerHandle
from server.db.tables import Assignment, Event, utcnow
from server.telemetry.bandwidth import Download

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = ",".join(str(i) for i in range(10))
SHA = "cd" * 32


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def server(
    request: pytest.FixtureRequest, server_factory: Callable[..., ServerHandle], tmp_path: Path
) -> ServerHandle:
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    handle = server_factory(tmp_path, db_url=db_url)
    assert handle.db.dialect == request.param
    return handle


def op(server: ServerHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.operator_token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def enroll(
    server: ServerHandle,
    hw: str,
    tags: dict[str, str],
    prefs: tuple[str, ...] = ("int8-cpu",),
    replace: bool = False,
    *,
    proof: str | None = None,  # the device's current token: a takeover needs it
) -> EnrollResponse:
    body: dict[str, Any] = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": hw,
        "profile": "x86-gateway",
        "variant_preference": list(prefs),
        "tags": tags,
        "agent_version": "0.1.0",
        "replace": replace,
    }
    headers = {"Authorization": f"Bearer {proof}"} if proof else {}
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return EnrollResponse.from_json(resp.json())


def publish(server: ServerHandle, release: int, variant: str) -> None:
    model = FIXTURES / f"digits_int8_r{release}.tflite"
    resp = requests.post(
        f"{server.url}/api/v1/models",
        data={"name": "digits", "release": str(release), "variant": variant, "labels": LABELS,
              "input_range": "0,1"},
        files={"file": (model.name, model.read_bytes())},
        headers=op(server),
        timeout=60,
    )
    assert resp.status_code == 201, resp.text


def assign(server: ServerHandle, release: int, **target: str) -> None:
    body = {"name": "digits", "release": release, **target}
    resp = requests.post(
        f"{server.url}/api/v1/assignments", json=body, headers=op(server), timeout=10
    )
    assert resp.status_code == 201, resp.text


def checkin(
    server: ServerHandle,
    device_id: str,
    token: str,
    installed: InstalledModel | None = None,
    state: str = "idle",
) -> requests.Response:
    return requests.post(
        server.url + CHECKIN_PATH.format(device_id=device_id),
        json=checkin_body(state, installed, "0.3.1"),
        headers=bearer(token),
        timeout=10,
    )


def desired(server: ServerHandle, dev: EnrollResponse) -> tuple[int, str] | None:
    """(release, variant) the check-in names; the operator's view must name the same."""
    resp = checkin(server, dev.device_id, dev.device_token)
    assert resp.status_code == 200, resp.text
    target = resp.json()["desired"]
    shown = device(server, dev.device_id)["desired"]
    assert shown == target
    if target is None:
        return None
    assert target["target_path"] == f"models/digits/{target['release']}/{target['variant']}.tflite"
    return target["release"], target["variant"]


def device(server: ServerHandle, device_id: str) -> dict[str, Any]:
    resp = requests.get(f"{server.url}/api/v1/devices/{device_id}", headers=op(server), timeout=10)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def seen(row: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(row["last_seen"].replace("Z", "+00:00"))


def stored_events(server: ServerHandle, device_id: str) -> list[tuple[str, str | None, Any]]:
    """Every event of the device in id order (the order the rollout engine folds them)."""
    with server.db.session() as s:
        rows = s.execute(
            select(Event.type, Event.state, Event.detail, Event.source)
            .where(Event.device_id == device_id, Event.type != "enrolled")
            .order_by(Event.id)
        ).all()
    assert all(r.source == "http" for r in rows)
    return [(r.type, r.state, r.detail) for r in rows]


def post_batch(
    server: ServerHandle, device_id: str, token: str, events: list[dict[str, Any]]
) -> requests.Response:
    return requests.post(
        server.url + EVENTS_BATCH_PATH.format(device_id=device_id),
        json={"events": events},
        headers=bearer(token),
        timeout=10,
    )


def download_report(update_id: str, sent: int) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "via": "delta",
        "name": "digits",
        "release": 2,
        "variant": "int8-cpu",
        "bytes_downloaded": sent,
        "target_bytes": 10_000,
    }


def test_checkin_resolves_device_then_tag_assignments_by_preference(server: ServerHandle) -> None:
    publish(server, 1, "int8-xnnpack")
    publish(server, 1, "int8-cpu")
    publish(server, 2, "int8-cpu")
    a = enroll(
        server, "hw-a", {"store": "7", "region": "eu"}, ("edgetpu", "int8-xnnpack", "int8-cpu")
    )
    b = enroll(server, "hw-b", {"store": "8"}, ("int8-cpu",))
    c = enroll(server, "hw-c", {}, ("int8-cpu",))
    d = enroll(server, "hw-d", {"store": "7"}, ("int8-xnnpack",))
    assert [desired(server, x) for x in (a, b, c, d)] == [None] * 4

    assign(server, 1, tag="store=7")
    # The first published variant of the device's own preference order.
    assert [desired(server, x) for x in (a, b, c, d)] == [
        (1, "int8-xnnpack"),
        None,
        None,
        (1, "int8-xnnpack"),
    ]
    assign(server, 2, tag="region=eu")  # the newest of a's tag assignments wins
    assign(server, 1, tag="store=8")
    assert desired(server, a) == (2, "int8-cpu")
    assert desired(server, b) == (1, "int8-cpu")

    assign(server, 1, device_id=a.device_id)  # a device assignment beats any tag, even newer
    assign(server, 2, tag="store=7")
    assert desired(server, a) == (1, "int8-xnnpack")
    assign(server, 2, device_id=c.device_id)
    assert desired(server, c) == (2, "int8-cpu")
    # It decides even when its release has none of the device's variants: no fallback to tags.
    assign(server, 2, device_id=d.device_id)
    assert desired(server, d) is None
    assign(server, 1, device_id=d.device_id)
    assert desired(server, d) == (1, "int8-xnnpack")
    # Nor when nothing of its release is published (the rollout engine writes rows directly).
    with server.db.session() as s:
        s.add(
            Assignment(
                target_kind="device",
                target_value=b.device_id,
                name="digits",
                release=9,
                created_at=utcnow(),
            )
        )
    assert desired(server, b) is None


def test_checkin_records_state_installed_model_and_last_seen(server: ServerHandle) -> None:
    cam = enroll(server, "hw-row", {"site": "lab"})
    enrolled = device(server, cam.device_id)
    installed = InstalledModel("digits", 3, "int8-cpu", SHA, "b")
    resp = checkin(server, cam.device_id, cam.device_token, installed, state="verify")
    assert resp.status_code == 200 and resp.json() == {"desired": None, "poll_interval_s": 1.0}
    row = device(server, cam.device_id)
    assert (row["state"], row["agent_version"]) == ("verify", "0.3.1")
    assert row["installed"] == {
        "name": "digits",
        "release": 3,
        "variant": "int8-cpu",
        "sha256": SHA,
        "slot": "b",
    }
    assert seen(row) > seen(enrolled)
    assert checkin(server, cam.device_id, cam.device_token).status_code == 200
    again = device(server, cam.device_id)
    assert again["installed"] is None and again["state"] == "idle"
    assert seen(again) >= seen(row)


def test_wrong_tokens_are_401_and_another_devices_are_403(server: ServerHandle) -> None:
    a = enroll(server, "hw-tok-a", {})
    b = enroll(server, "hw-tok-b", {})
    before = device(server, b.device_id)
    unknown = checkin(server, a.device_id, "not-a-device-token")
    assert unknown.status_code == 401
    assert unknown.json() == {"error": "device token is invalid"}
    assert unknown.headers["www-authenticate"] == "Bearer"
    crossed = checkin(server, b.device_id, a.device_token, state="install")
    assert crossed.status_code == 403
    assert crossed.json() == {"error": "this device token belongs to another device"}
    assert checkin(server, a.device_id, server.operator_token).status_code == 401
    assert device(server, b.device_id) == before  # a refused check-in records nothing

    event = {"type": "commit", "state": "commit", "detail": {}}
    for path in (EVENTS_PATH, EVENTS_BATCH_PATH):
        url = server.url + path.format(device_id=b.device_id)
        body: dict[str, Any] = event if path == EVENTS_PATH else {"events": [event]}
        for token, status in ((a.device_token, 403), ("nope", 401), (b.mqtt.password, 401)):
            resp = requests.post(url, json=body, headers=bearer(token), timeout=10)
            assert resp.status_code == status, (path, resp.text)
        assert requests.post(url, json=body, timeout=10).status_code == 401
    assert stored_events(server, b.device_id) == []

    # Re-enrolling with its token as proof rotates the token: the old one is dead.
    again = enroll(server, "hw-tok-a", {}, replace=True, proof=a.device_token)
    assert checkin(server, a.device_id, a.device_token).status_code == 401
    assert checkin(server, again.device_id, again.device_token).status_code == 200


def test_event_batch_stores_every_event_in_order_and_counts_downloads(
    server: ServerHandle,
) -> None:
    cam = enroll(server, "hw-batch", {})
    steps: list[dict[str, Any]] = [
        {"type": "update", "state": "download", "detail": {"seq": 0}},
        {"type": "download", "state": "download", "detail": download_report("u-1", 1_200)},
        {"type": "update", "state": "verify", "detail": {"seq": 2}},
        {"type": "update", "state": "idle"},
    ]
    resp = post_batch(server, cam.device_id, cam.device_token, steps)
    assert resp.status_code == 201 and resp.json() == {"stored": 4}
    assert stored_events(server, cam.device_id) == [
        (e["type"], e.get("state"), e.get("detail", {})) for e in steps
    ]

    # The same download report again (MQTT and HTTP both carry it) is counted once.
    full = [
        {"type": "note", "state": None, "detail": {"seq": i}} for i in range(MAX_EVENT_BATCH - 2)
    ]
    full += [
        {"type": "download", "detail": download_report("u-1", 1_200)},
        {"type": "download", "detail": download_report("u-2", 3_000)},
    ]
    resp = post_batch(server, cam.device_id, cam.device_token, full)
    assert resp.status_code == 201 and resp.json() == {"stored": MAX_EVENT_BATCH}
    single = requests.post(
        server.url + EVENTS_PATH.format(device_id=cam.device_id),
        json={"type": "download", "detail": download_report("u-3", 500)},
        headers=bearer(cam.device_token),
        timeout=10,
    )
    assert single.status_code == 201 and single.json() == {"stored": True}
    events = stored_events(server, cam.device_id)
    assert len(events) == 4 + MAX_EVENT_BATCH + 1
    assert [e[2]["seq"] for e in events[4 : 4 + MAX_EVENT_BATCH - 2]] == list(
        range(MAX_EVENT_BATCH - 2)
    )
    assert events[-1] == ("download", None, download_report("u-3", 500))

    with server.db.session() as s:
        counted = s.execute(
            select(Download.update_id, Download.bytes_downloaded)
            .where(Download.device_id == cam.device_id)
            .order_by(Download.update_id)
        ).all()
    assert [tuple(r) for r in counted] == [("u-1", 1_200), ("u-2", 3_000), ("u-3", 500)]
    # And the operator's bandwidth report adds them up (on either database).
    report = requests.get(f"{server.url}/api/v1/bandwidth", headers=op(server), timeout=10)
    assert report.status_code == 200, report.text
    fleet = report.json()["fleet"]
    assert (fleet["updates"], fleet["deltas"], fleet["bytes_sent"]) == (3, 3, 4_700)


def test_event_batch_rejects_empty_oversized_and_invalid_batches(server: ServerHandle) -> None:
    cam = enroll(server, "hw-bad-batch", {})
    event = {"type": "update", "state": "download", "detail": {}}
    empty = post_batch(server, cam.device_id, cam.device_token, [])
    assert empty.status_code == 422
    assert empty.json()["error"].startswith("invalid request: events: ")
    assert "at least 1 item" in empty.json()["error"]
    over = post_batch(server, cam.device_id, cam.device_token, [event] * (MAX_EVENT_BATCH + 1))
    assert over.status_code == 422
    assert f"at most {MAX_EVENT_BATCH} items" in over.json()["error"]
    bad = [event, event, {"type": "-bad type", "detail": {}}, event]
    wrong = post_batch(server, cam.device_id, cam.device_token, bad)
    assert wrong.status_code == 422 and "events.2.type" in wrong.json()["error"]
    strict = post_batch(server, cam.device_id, cam.device_token, [{**event, "detail": "x"}])
    assert strict.status_code == 422 and "events.0.detail" in strict.json()["error"]
    not_a_list = requests.post(
        server.url + EVENTS_BATCH_PATH.format(device_id=cam.device_id),
        json=event,
        headers=bearer(cam.device_token),
        timeout=10,
    )
    assert not_a_list.status_code == 422 and "events" in not_a_list.json()["error"]
    assert stored_events(server, cam.device_id) == []  # a bad batch stores none of its events

"""REST v1 against a real uvicorn server on 127.0.0.1 (SQLite, embedded broker, real TUF repo)."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from agent.common.errors import ServerRequestError
from agent.protocol.api import CheckinResponse, EnrollResponse, InstalledModel, checkin_body
from agent.transport.device_api import DeviceClient
from server.app import ServerHandle

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_R1 = FIXTURES / "digits_int8_r1.tflite"
MODEL_R2 = FIXTURES / "digits_int8_r2.tflite"
LABELS = FIXTURES / "digits_labels.txt"


def op(server: ServerHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.operator_token}"}


def enroll(
    server: ServerHandle,
    hw: str,
    tags: dict[str, str] | None = None,
    prefs: tuple[str, ...] = ("int8-cpu",),
    replace: bool = False,
    *,
    proof: str | None = None,  # the device's current token: a takeover needs it
) -> EnrollResponse:
    body = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": hw,
        "profile": "x86-gateway",
        "variant_preference": list(prefs),
        "tags": tags or {},
        "agent_version": "0.1.0",
        "replace": replace,
    }
    headers = {"Authorization": f"Bearer {proof}"} if proof else {}
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return EnrollResponse.from_json(resp.json())


def checkin(
    server: ServerHandle, device_id: str, token: str, installed: InstalledModel | None = None
) -> requests.Response:
    return requests.post(
        f"{server.url}/api/v1/devices/{device_id}/checkin",
        json=checkin_body("idle", installed, "0.1.0"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def publish(server: ServerHandle, model: Path, release: int, name: str = "digits") -> Any:
    with open(model, "rb") as fh, open(LABELS, "rb") as labels:
        return requests.post(
            f"{server.url}/api/v1/models",
            data={"name": name, "release": str(release), "variant": "int8-cpu",
                  "input_range": "0,1"},
            files={"file": (model.name, fh), "labels_file": ("labels.txt", labels)},
            headers=op(server),
            timeout=60,
        )


@pytest.fixture(scope="module")
def published(module_server: ServerHandle) -> ServerHandle:
    for release, model in ((1, MODEL_R1), (2, MODEL_R2)):
        resp = publish(module_server, model, release)
        assert resp.status_code == 201, resp.text
    return module_server


def test_enrollment_hands_out_credentials_and_the_pinned_root(module_server: ServerHandle) -> None:
    first = enroll(module_server, "hw-enroll-1", {"store": "1"})
    assert first.mqtt.username == first.device_id
    assert (first.mqtt.host, first.mqtt.port) == (module_server.mqtt_host, module_server.mqtt_port)
    assert first.tuf_root == json.loads(module_server.repo.root_bytes())
    assert first.tuf_root["signed"]["_type"] == "root"
    assert checkin(module_server, first.device_id, first.device_token).status_code == 200

    again = enroll(
        module_server, "hw-enroll-1", {"store": "2"}, replace=True, proof=first.device_token
    )
    assert again.device_id == first.device_id
    assert again.device_token != first.device_token
    assert again.mqtt.password != first.mqtt.password
    stale = checkin(module_server, first.device_id, first.device_token)
    assert stale.status_code == 401 and "invalid" in stale.json()["error"]
    assert checkin(module_server, again.device_id, again.device_token).status_code == 200

    bad = requests.post(
        f"{module_server.url}/api/v1/enroll",
        json={
            "token": "not-the-token",
            "hardware_id": "hw-x",
            "profile": "rpi4",
            "variant_preference": ["int8-cpu"],
            "agent_version": "0.1.0",
        },
        timeout=10,
    )
    assert bad.status_code == 401
    assert bad.json() == {"error": "enrollment token is invalid, expired or used up"}


def test_created_enrollment_token_has_limited_uses(module_server: ServerHandle) -> None:
    resp = requests.post(
        f"{module_server.url}/api/v1/enrollment-tokens",
        json={"max_uses": 1, "note": "one camera"},
        headers=op(module_server),
        timeout=10,
    )
    assert resp.status_code == 201, resp.text
    token = resp.json()["token"]
    body = {
        "token": token,
        "hardware_id": "hw-token-1",
        "profile": "rpi5",
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    url = f"{module_server.url}/api/v1/enroll"
    assert requests.post(url, json=body, timeout=10).status_code == 200
    second = requests.post(url, json={**body, "hardware_id": "hw-token-2"}, timeout=10)
    assert second.status_code == 401


def test_publish_assign_and_checkin_resolve_the_target(published: ServerHandle) -> None:
    server = published
    dup = publish(server, MODEL_R1, 1)
    assert dup.status_code == 409 and "already published" in dup.json()["error"]
    models = requests.get(f"{server.url}/api/v1/models", headers=op(server), timeout=10).json()
    assert [(m["release"], m["variant"]) for m in models if m["name"] == "digits"] == [
        (1, "int8-cpu"),
        (2, "int8-cpu"),
    ]
    r1 = next(m for m in models if m["release"] == 1)
    assert r1["sha256"] == hashlib.sha256(MODEL_R1.read_bytes()).hexdigest()
    assert r1["labels"] == LABELS.read_text().split()

    cam = enroll(server, "hw-resolve-1", {"store": "42"}, ("edgetpu", "int8-cpu"))
    assert CheckinResponse.from_json(checkin(server, cam.device_id, cam.device_token).json()) == (
        CheckinResponse(desired=None, poll_interval_s=1.0)
    )
    url = f"{server.url}/api/v1/assignments"
    tag = requests.post(
        url,
        json={"name": "digits", "release": 1, "tag": "store=42"},
        headers=op(server),
        timeout=10,
    )
    assert tag.status_code == 201, tag.text
    got = CheckinResponse.from_json(checkin(server, cam.device_id, cam.device_token).json())
    assert got.desired is not None
    assert (got.desired.release, got.desired.variant) == (1, "int8-cpu")
    assert got.desired.target_path == "models/digits/1/int8-cpu.tflite"

    direct = {"name": "digits", "release": 2, "device_id": cam.device_id}
    assert requests.post(url, json=direct, headers=op(server), timeout=10).status_code == 201
    got = CheckinResponse.from_json(checkin(server, cam.device_id, cam.device_token).json())
    assert got.desired is not None and got.desired.release == 2

    # The target the director names is served, signed bytes and all.
    sha = r1["sha256"]
    blob = requests.get(
        f"{server.url}/tuf/targets/models/digits/1/{sha}.int8-cpu.tflite", timeout=10
    )
    assert blob.status_code == 200 and hashlib.sha256(blob.content).hexdigest() == sha

    for body, status, words in (
        ({"name": "digits", "release": 9, "device_id": cam.device_id}, 404, "digits@9"),
        ({"name": "digits", "release": 1, "device_id": "dev-nope"}, 404, "no device"),
        ({"name": "nope", "release": 1, "tag": "a=b"}, 404, "nope@1"),
    ):
        resp = requests.post(url, json=body, headers=op(server), timeout=10)
        assert resp.status_code == status and words in resp.json()["error"]


def test_device_show_lists_state_events_and_desired(published: ServerHandle) -> None:
    server = published
    cam = enroll(server, "hw-show-1", {"site": "lab"})
    installed = InstalledModel("digits", 1, "int8-cpu", "ab" * 32, "a")
    assert checkin(server, cam.device_id, cam.device_token, installed).status_code == 200
    event = requests.post(
        f"{server.url}/api/v1/devices/{cam.device_id}/events",
        json={"type": "install", "state": "install", "detail": {"slot": "b"}},
        headers={"Authorization": f"Bearer {cam.device_token}"},
        timeout=10,
    )
    assert event.status_code == 201 and event.json() == {"stored": True}
    shown = requests.get(
        f"{server.url}/api/v1/devices/{cam.device_id}", headers=op(server), timeout=10
    )
    data = shown.json()
    assert data["installed"]["release"] == 1 and data["state"] == "idle"
    assert data["events"][0] == {
        "time": data["events"][0]["time"],
        "type": "install",
        "state": "install",
        "source": "http",
        "detail": {"slot": "b"},
    }
    listed = requests.get(
        f"{server.url}/api/v1/devices", params={"tag": "site=lab"}, headers=op(server), timeout=10
    ).json()
    assert [d["id"] for d in listed] == [cam.device_id]
    missing = requests.get(
        f"{server.url}/api/v1/devices/dev-missing", headers=op(server), timeout=10
    )
    assert missing.status_code == 404 and missing.json() == {"error": "no device 'dev-missing'"}


OPERATOR_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/api/v1/devices", {}),
    ("GET", "/api/v1/devices/dev-anything", {}),
    ("DELETE", "/api/v1/devices/dev-anything", {}),
    ("GET", "/api/v1/models", {}),
    ("POST", "/api/v1/models", {"data": {"name": "x", "release": "1", "variant": "int8-cpu"}}),
    ("POST", "/api/v1/assignments", {"json": {"name": "digits", "release": 1, "tag": "a=b"}}),
    ("POST", "/api/v1/enrollment-tokens", {"json": {}}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), OPERATOR_CALLS)
def test_operator_endpoints_refuse_missing_or_wrong_tokens(
    module_server: ServerHandle, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    device = enroll(module_server, f"hw-op-401-{method}-{path}")  # once per parameter
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {module_server.operator_token}"},
        {"Authorization": f"Bearer {device.device_token}"},
    ):
        resp = requests.request(
            method, module_server.url + path, headers=headers, timeout=10, **kwargs
        )
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"] and resp.headers["www-authenticate"] == "Bearer"


def test_a_device_token_cannot_act_as_another_device(module_server: ServerHandle) -> None:
    a = enroll(module_server, "hw-cross-a")
    b = enroll(module_server, "hw-cross-b")
    resp = checkin(module_server, b.device_id, a.device_token)
    assert resp.status_code == 403
    assert resp.json() == {"error": "this device token belongs to another device"}
    event = requests.post(
        f"{module_server.url}/api/v1/devices/{b.device_id}/events",
        json={"type": "commit", "state": "commit", "detail": {}},
        headers={"Authorization": f"Bearer {a.device_token}"},
        timeout=10,
    )
    assert event.status_code == 403
    assert checkin(module_server, a.device_id, module_server.operator_token).status_code == 401


def test_tuf_files_support_range_requests(module_server: ServerHandle) -> None:
    root = (module_server.repo.metadata_dir / "root.json").read_bytes()
    url = f"{module_server.url}/tuf/metadata/root.json"
    full = requests.get(url, timeout=10)
    assert full.status_code == 200 and full.content == root
    assert full.headers["accept-ranges"] == "bytes"
    part = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=10)
    assert part.status_code == 206 and part.content == root[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(root)}"
    tail = requests.get(url, headers={"Range": f"bytes={len(root) - 7}-"}, timeout=10)
    assert tail.status_code == 206 and tail.content == root[-7:]
    beyond = requests.get(url, headers={"Range": f"bytes={len(root) + 5}-"}, timeout=10)
    assert beyond.status_code == 416
    one = requests.get(f"{module_server.url}/tuf/metadata/1.root.json", timeout=10)
    assert one.status_code == 200 and json.loads(one.content)["signed"]["version"] == 1
    assert (
        requests.get(f"{module_server.url}/tuf/metadata/9.root.json", timeout=10).status_code == 404
    )


def raw_get(server: ServerHandle, path: str) -> tuple[int, bytes]:
    """Send ``path`` byte for byte; requests would normalise away the ``..``."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_tuf_paths_cannot_escape_the_repository(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    secret = module_server.operator_token.encode()
    key = (module_server.config.keys_dir / "targets.pem").read_bytes()  # type: ignore[operator]
    outside = tmp_path / "outside.txt"
    outside.write_bytes(secret)
    (module_server.repo.targets_dir / "escape.txt").symlink_to(outside)
    for path in (
        "/tuf/targets/../../operator.token",
        "/tuf/targets/%2e%2e/%2e%2e/operator.token",
        "/tuf/targets/models/..%2f..%2f..%2foperator.token",
        "/tuf/targets/..%2F..%2Fkeys/targets.pem",
        "/tuf/targets/%2fetc%2fpasswd",
        "/tuf/targets//etc/passwd",
        "/tuf/targets/.lock",
        "/tuf/targets/escape.txt",
        "/tuf/metadata/..%2f..%2foperator.token",
        "/tuf/metadata/%2e%2e%2fkeys%2froot.pem",
        "/tuf/metadata/../keys/root.pem",
        "/tuf/metadata/root.json%00.txt",
    ):
        status, body = raw_get(module_server, path)
        assert 400 <= status < 500, (path, status)
        assert secret not in body and key not in body and b"root:" not in body, path


@pytest.mark.production
def test_the_server_runs_on_postgresql(
    server_factory: Callable[..., ServerHandle], tmp_path: Path, pg_url: str
) -> None:
    server = server_factory(tmp_path, db_url=pg_url)
    assert server.db.dialect == "postgresql"
    resp = publish(server, MODEL_R1, 1)
    assert resp.status_code == 201, resp.text
    cam = enroll(server, "hw-pg", {"store": "5"})
    assign = {"name": "digits", "release": 1, "tag": "store=5"}
    resp = requests.post(
        f"{server.url}/api/v1/assignments", json=assign, headers=op(server), timeout=10
    )
    assert resp.status_code == 201
    got = CheckinResponse.from_json(checkin(server, cam.device_id, cam.device_token).json())
    assert got.desired is not None and got.desired.target_path == "models/digits/1/int8-cpu.tflite"
    other = enroll(server, "hw-pg-2")
    assert checkin(server, other.device_id, cam.device_token).status_code == 403


def test_the_agents_own_client_speaks_this_api(published: ServerHandle) -> None:
    server = published
    client = DeviceClient(server.url)
    token = server.config.enrollment_tokens[0]
    enrolled = client.enroll(token, "hw-agent-client", "rpi4", ["int8-cpu"], {"fleet": "agent"})
    device = DeviceClient(server.url, enrolled.device_id, enrolled.device_token)
    assign = {"name": "digits", "release": 2, "device_id": enrolled.device_id}
    resp = requests.post(
        f"{server.url}/api/v1/assignments", json=assign, headers=op(server), timeout=10
    )
    assert resp.status_code == 201
    answer = device.checkin("idle", None)
    assert answer.desired is not None and answer.desired.release == 2
    device.event("update_available", "download", {"target": answer.desired.target_path})
    with pytest.raises(ServerRequestError) as info:
        DeviceClient(server.url, "dev-someone-else", enrolled.device_token).checkin("idle", None)
    assert info.value.status == 403


def test_labels_may_be_a_comma_list_or_a_json_file(published: ServerHandle) -> None:
    labels = LABELS.read_text().split()
    as_json = json.dumps(labels).encode()
    for name, text, labels_file in (
        ("digits-csv", ",".join(labels), None),
        ("digits-json", None, ("l.json", as_json)),
    ):
        data = {"name": name, "release": "1", "variant": "int8-cpu", "input_range": "0,1"}
        files: dict[str, tuple[str, bytes]] = {"file": ("m.tflite", MODEL_R1.read_bytes())}
        if text is not None:
            data["labels"] = text
        if labels_file is not None:
            files["labels_file"] = labels_file
        resp = requests.post(
            f"{published.url}/api/v1/models",
            data=data,
            files=files,
            headers=op(published),
            timeout=60,
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["labels"] == labels
    wrong = requests.post(
        f"{published.url}/api/v1/models",
        data={"name": "digits-few", "release": "1", "variant": "int8-cpu", "labels": "a,b",
              "input_range": "0,1"},
        files={"file": ("m.tflite", MODEL_R1.read_bytes())},
        headers=op(published),
        timeout=60,
    )
    assert wrong.status_code == 422 and "2 labels given but output 0 has 10 classes" in wrong.text

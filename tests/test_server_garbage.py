"""Garbage at every REST endpoint gets a 4xx with a clear JSON error, never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from server.app import ServerHandle

ServerFactory = Callable[..., ServerHandle]

GOOD_ENROLL: dict[str, Any] = {
    "token": "filled-in-per-server",
    "hardware_id": "hw-garbage",
    "profile": "rpi4",
    "variant_preference": ["int8-cpu"],
    "tags": {"store": "1"},
    "agent_version": "0.1.0",
}
GOOD_CHECKIN: dict[str, Any] = {
    "state": "idle",
    "installed": {
        "name": "digits",
        "release": 1,
        "variant": "int8-cpu",
        "sha256": "ab" * 32,
        "slot": "a",
    },
    "agent_version": "0.1.0",
}
GOOD_EVENT: dict[str, Any] = {"type": "install", "state": "install", "detail": {"a": 1}}
GOOD_ASSIGN: dict[str, Any] = {"name": "digits", "release": 1, "tag": "store=1"}
GOOD_TOKEN: dict[str, Any] = {"max_uses": 3, "expires_in_s": 60.0, "note": "x"}

RAW_BODIES: list[bytes] = [
    b"",
    b"{",
    b"\xff\xfe\x00garbage",
    b"null",
    b"[]",
    b"123",
    b'"a string"',
    b'{"a": NaN}',
    b"[" * 5000 + b"]" * 5000,
    b'{"token": "x"' + b", " * 10 + b"}",
]

BAD_STR: list[Any] = [None, 12, 1.5, True, [], {}, "", "x" * 5000, "white space\n"]
BAD_POSITIVE_INT: list[Any] = [None, "1", 1.5, True, [], {}, 0, -1, 10**12]
# Per endpoint: field -> values that must each be refused with a 4xx.
BAD_FIELDS: dict[str, dict[str, list[Any]]] = {
    "enroll": {
        "token": [None, 12, True, [], {}, "", "x" * 5000],
        "hardware_id": BAD_STR,
        "profile": [*BAD_STR, "UPPER", "../etc"],
        "variant_preference": [None, "int8-cpu", 12, {}, [], [12], ["bogus"], ["int8-cpu"] * 2],
        "tags": ["x", 12, [], {"k": 12}, {"bad key": "v"}, {"k": "v=w"}, {"k": ""}],
        "agent_version": BAD_STR,
    },
    "checkin": {
        "state": [12, True, [], {}, "", "x" * 100, "bad state"],
        "installed": [
            "x",
            12,
            [],
            {},
            {**GOOD_CHECKIN["installed"], "sha256": "zz"},
            {**GOOD_CHECKIN["installed"], "release": "1"},
            {**GOOD_CHECKIN["installed"], "variant": "quantum"},
            {**GOOD_CHECKIN["installed"], "name": "../x"},
        ],
        "agent_version": BAD_STR,
    },
    "events": {
        "type": BAD_STR,
        "state": [12, True, [], {}, "", "bad state"],
        "detail": [None, "x", 12, [], True],
    },
    "assign": {
        "name": [*BAD_STR, "Digits"],
        "release": BAD_POSITIVE_INT,
        "tag": [12, True, [], {}, "", "novalue", "k=", "=v", "k=v w", "x" * 300],
    },
    "token": {
        "max_uses": ["1", 1.5, True, [], {}, 0, -1, 10**12],
        "expires_in_s": ["1", True, [], {}, 0, -1, 1e30],
        "note": [12, True, [], {}, "x" * 300],
    },
}
REQUIRED: dict[str, set[str]] = {
    "enroll": {"token", "hardware_id", "profile", "variant_preference", "agent_version"},
    "checkin": {"state", "agent_version"},
    "events": {"type"},
    "assign": {"name", "release"},
    "token": set(),
}


def mutations(name: str, good: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each required field missing, and each field replaced by each of its bad values."""
    for key in REQUIRED[name]:
        yield f"missing {key}", {k: v for k, v in good.items() if k != key}
    for key, values in BAD_FIELDS[name].items():
        for value in values:
            yield f"{key}={str(value)[:20]!r}", {**good, key: value}


class Endpoint:
    def __init__(self, name: str, path: str, good: dict[str, Any], auth: str) -> None:
        self.name, self.path, self.good, self.auth = name, path, good, auth


@pytest.fixture(scope="module")
def ctx(module_server: ServerHandle) -> dict[str, Any]:
    body = {**GOOD_ENROLL, "token": module_server.config.enrollment_tokens[0]}
    device = requests.post(f"{module_server.url}/api/v1/enroll", json=body, timeout=10).json()
    return {
        "server": module_server,
        "device": device,
        "enroll_token": module_server.config.enrollment_tokens[0],
    }


def endpoints(ctx: dict[str, Any]) -> list[Endpoint]:
    dev = ctx["device"]["device_id"]
    return [
        Endpoint(
            "enroll",
            "/api/v1/enroll",
            # Another hardware id, so enrolling it never rotates the checkin device's token.
            {**GOOD_ENROLL, "hardware_id": "hw-other", "token": ctx["enroll_token"]},
            "none",
        ),
        Endpoint("checkin", f"/api/v1/devices/{dev}/checkin", GOOD_CHECKIN, "device"),
        Endpoint("events", f"/api/v1/devices/{dev}/events", GOOD_EVENT, "device"),
        Endpoint("assign", "/api/v1/assignments", GOOD_ASSIGN, "operator"),
        Endpoint("token", "/api/v1/enrollment-tokens", GOOD_TOKEN, "operator"),
    ]


def headers_for(ctx: dict[str, Any], auth: str) -> dict[str, str]:
    token = {
        "none": None,
        "device": ctx["device"]["device_token"],
        "operator": ctx["server"].operator_token,
    }[auth]
    return {"Authorization": f"Bearer {token}"} if token else {}


def assert_clear_4xx(resp: requests.Response, what: str) -> None:
    assert 400 <= resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), what
    assert len(body["error"]) > 5, what
    assert "Traceback" not in resp.text and "sqlalchemy" not in resp.text.lower(), what


def test_garbage_bodies_at_each_json_endpoint(ctx: dict[str, Any]) -> None:
    server: ServerHandle = ctx["server"]
    for ep in endpoints(ctx):
        headers = {**headers_for(ctx, ep.auth), "Content-Type": "application/json"}
        for raw in RAW_BODIES:
            if ep.name == "token" and raw in (b"", b"null"):
                continue  # the token request's body is optional: these are valid
            resp = requests.post(server.url + ep.path, data=raw, headers=headers, timeout=10)
            assert_clear_4xx(resp, f"{ep.name} {raw[:20]!r}")


def test_wrong_types_and_missing_fields_at_each_json_endpoint(ctx: dict[str, Any]) -> None:
    server: ServerHandle = ctx["server"]
    for ep in endpoints(ctx):
        headers = headers_for(ctx, ep.auth)
        for what, body in mutations(ep.name, ep.good):
            resp = requests.post(server.url + ep.path, json=body, headers=headers, timeout=10)
            assert_clear_4xx(resp, f"{ep.name} {what}")
        extra = requests.post(
            server.url + ep.path, json={**ep.good, "unexpected": 1}, headers=headers, timeout=10
        )
        # Devices may send newer fields; operator typos are refused.
        if ep.auth == "operator":
            assert_clear_4xx(extra, f"{ep.name} unexpected field")
        else:
            assert extra.status_code < 300, f"{ep.name}: {extra.text}"


def test_assignment_needs_exactly_one_target(ctx: dict[str, Any]) -> None:
    server: ServerHandle = ctx["server"]
    headers = headers_for(ctx, "operator")
    url = f"{server.url}/api/v1/assignments"
    for body in (
        {"name": "digits", "release": 1},
        {"name": "digits", "release": 1, "tag": "a=b", "device_id": "dev-x"},
    ):
        resp = requests.post(url, json=body, headers=headers, timeout=10)
        assert_clear_4xx(resp, str(body))
        assert "exactly one of device_id or tag" in resp.json()["error"]


def test_validation_errors_name_the_field_without_echoing_secrets(ctx: dict[str, Any]) -> None:
    server: ServerHandle = ctx["server"]
    body = {**GOOD_ENROLL, "token": 42, "variant_preference": ["int8-cpu", "quantum"]}
    body.pop("profile")
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error.startswith("invalid request: ")
    assert "token: Input should be a valid string" in error
    assert "profile: Field required" in error
    assert "unknown variant 'quantum'" in error
    secret = "super-secret-" + "s" * 300
    resp = requests.post(
        f"{server.url}/api/v1/enroll", json={**GOOD_ENROLL, "token": secret}, timeout=10
    )
    assert resp.status_code == 422 and secret not in resp.text
    not_json = requests.post(
        f"{server.url}/api/v1/enroll",
        data=b"{",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert not_json.json() == {"error": "invalid request: request body is not valid JSON"}


def test_oversized_bodies_are_refused_before_parsing(ctx: dict[str, Any]) -> None:
    server: ServerHandle = ctx["server"]
    limit = server.config.max_json_bytes
    big = json.dumps({**GOOD_EVENT, "detail": {"blob": "x" * (limit + 10)}}).encode()
    for ep in endpoints(ctx):
        headers = {**headers_for(ctx, ep.auth), "Content-Type": "application/json"}
        resp = requests.post(server.url + ep.path, data=big, headers=headers, timeout=30)
        assert resp.status_code == 413, ep.name
        assert resp.json() == {"error": f"request body is too large (limit {limit} bytes)"}

        def chunks() -> Iterator[bytes]:  # no Content-Length: the stream itself is counted
            for start in range(0, len(big), 65536):
                yield big[start : start + 65536]

        resp = requests.post(server.url + ep.path, data=chunks(), headers=headers, timeout=30)
        assert resp.status_code == 413, f"{ep.name} chunked"
        assert resp.json()["error"].startswith("request body is too large")


def test_garbage_model_uploads(ctx: dict[str, Any]) -> None:
    server: ServerHandle = ctx["server"]
    url = f"{server.url}/api/v1/models"
    headers = headers_for(ctx, "operator")
    good = {"name": "garbage", "release": "1", "variant": "int8-cpu"}
    cases: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
        ("not a model", good, {"file": ("m.tflite", b"\x00" * 64)}, "TFL3"),
        ("empty file", good, {"file": ("m.tflite", b"")}, "model"),
        ("no file", good, {}, "file: Field required"),
        ("bad name", {**good, "name": "Bad Name"}, {"file": ("m", b"x")}, "name"),
        ("bad release", {**good, "release": "one"}, {"file": ("m", b"x")}, "release"),
        ("zero release", {**good, "release": "0"}, {"file": ("m", b"x")}, "release"),
        ("bad variant", {**good, "variant": "gpu9"}, {"file": ("m", b"x")}, "variant"),
        ("bad fp32", {**good, "fp32_length": "-5"}, {"file": ("m", b"x")}, "fp32_length"),
        ("binary labels", good, {"file": ("m", b"x"), "labels_file": ("l", b"\xff\xfe")}, "UTF-8"),
        (
            "labels twice",
            {**good, "labels": "a,b"},
            {"file": ("m", b"x"), "labels_file": ("l", b"a")},
            "not both",
        ),
    ]
    for what, data, files, words in cases:
        resp = requests.post(url, data=data, files=files or None, headers=headers, timeout=30)
        assert_clear_4xx(resp, what)
        assert words in resp.json()["error"], (what, resp.json())
        assert str(server.config.data_dir) not in resp.text, what
    for raw, ctype in (
        (b"garbage", "multipart/form-data; boundary=xyz"),
        (b"--xyz\r\nContent-Disposition: form-data\r\n\r\n", "multipart/form-data; boundary=xyz"),
        (b"garbage", "multipart/form-data"),
        (b'{"name": "x"}', "application/json"),
    ):
        resp = requests.post(url, data=raw, headers={**headers, "Content-Type": ctype}, timeout=30)
        assert_clear_4xx(resp, f"raw multipart {raw[:20]!r}")


def test_oversized_model_upload_is_refused(server_factory: ServerFactory, tmp_path: Path) -> None:
    module_server = server_factory(tmp_path, max_upload_bytes=256 * 1024)
    limit = module_server.config.max_upload_bytes
    blob = b"\x00" * 1024
    total = limit // len(blob) + 2

    def stream() -> Iterator[bytes]:
        boundary = b"--b0undary\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="m"\r\n\r\n'
        for _ in range(total):
            yield blob
        yield b"\r\n--b0undary--\r\n"

    resp = requests.post(
        f"{module_server.url}/api/v1/models",
        data=stream(),
        headers={
            "Authorization": f"Bearer {module_server.operator_token}",
            "Content-Type": "multipart/form-data; boundary=b0undary",
        },
        timeout=120,
    )
    assert resp.status_code == 413
    assert resp.json() == {"error": f"request body is too large (limit {limit} bytes)"}


def test_unknown_routes_and_methods_answer_json(module_server: ServerHandle) -> None:
    for method, path, status in (
        ("GET", "/api/v1/nope", 404),
        ("DELETE", "/api/v1/devices", 405),
        ("GET", "/api/v1/enroll", 405),
    ):
        resp = requests.request(method, module_server.url + path, timeout=10)
        assert resp.status_code == status
        assert isinstance(resp.json()["error"], str)


def test_page_offsets_beyond_any_list_are_a_422_not_a_500(module_server: ServerHandle) -> None:
    headers = {"Authorization": f"Bearer {module_server.operator_token}"}
    huge = 9223372036854775808  # one past a signed 64-bit integer
    for path in ("/api/v1/devices", "/api/v1/rollouts"):
        resp = requests.get(module_server.url + path, params={"offset": huge}, headers=headers,
                            timeout=10)
        assert resp.status_code == 422, (path, resp.status_code, resp.text[:200])
        assert "offset" in resp.json()["error"]
        ok = requests.get(module_server.url + path, params={"offset": 2**31 - 1},
                          headers=headers, timeout=10)
        assert ok.status_code == 200 and ok.json() == []

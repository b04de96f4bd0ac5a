"""Who may re-enroll a device, credential rotation, and rate limits (issue 13, item 5).

A multi-use enrollment token plus a hardware id must not let anyone re-key a
device and lock the real one out: a takeover needs the device's current token or
an operator's one-time approval. Devices rotate their own credentials. Enrollment
and check-ins are rate limited per enrollment token and per device (429 +
Retry-After). Real servers over HTTP, the embedded broker, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from mosquitto_proc import connack
from sqlalchemy import update

from agent.cli import main as agent_main
from agent.identity import load_identity
from server.api.rate_limit import BucketSpec, KeyedLimiter, take
from server.app import ServerHandle
from server.cli import main as cli_main
from server.db import queries
from server.db.tables import ReenrollApproval, utcnow
from server.errors import ConfigError, RateLimitedError
from server.main import build_parser, config_from_args

ServerFactory = Callable[..., ServerHandle]


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, server_factory: ServerFactory, tmp_path: Path) -> Any:
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return server_factory(tmp_path / "server", db_url=db_url)


def enroll(
    server: ServerHandle,
    hw: str,
    *,
    replace: bool = False,
    proof: str | None = None,
    token: str | None = None,
) -> requests.Response:
    body = {
        "token": token or server.config.enrollment_tokens[0],
        "hardware_id": hw,
        "profile": "rpi4",
        "variant_preference": ["int8-cpu"],
        "tags": {},
        "agent_version": "0.1.0",
        "replace": replace,
    }
    headers = {"Authorization": f"Bearer {proof}"} if proof is not None else {}
    return requests.post(f"{server.url}/api/v1/enroll", json=body, headers=headers, timeout=10)


def enrolled(server: ServerHandle, hw: str, **kw: Any) -> dict[str, Any]:
    resp = enroll(server, hw, **kw)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def checkin(server: ServerHandle, device_id: str, token: str) -> requests.Response:
    return requests.post(
        f"{server.url}/api/v1/devices/{device_id}/checkin",
        json={"state": "idle", "agent_version": "0.1.0"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def rotate(server: ServerHandle, device_id: str, token: str) -> requests.Response:
    return requests.post(
        f"{server.url}/api/v1/devices/{device_id}/credentials",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def mqtt_ok(server: ServerHandle, device_id: str, password: str) -> bool:
    return not connack(server.mqtt_host, server.mqtt_port, device_id, password).is_failure


def operator_cli(
    server: ServerHandle, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    code = cli_main(["--server", server.url, "--token", server.operator_token, *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- re-enrollment needs proof ------------------------------------------------------------------


def test_lockout_attack_is_refused_and_the_real_device_keeps_working(server: ServerHandle) -> None:
    real = enrolled(server, "hw-cam-1")
    bystander = enrolled(server, "hw-cam-2")
    device_id = real["device_id"]

    # Enrollment token + hardware id + replace, and no proof: refused, saying what is needed.
    attack = enroll(server, "hw-cam-1", replace=True)
    assert attack.status_code == 409
    message = attack.json()["error"]
    assert f"enrolled as {device_id}" in message
    assert "current device token" in message and "Authorization: Bearer" in message
    assert f"edgefleet device approve-reenroll {device_id}" in message
    # Another device's token is no proof either, and is named as the wrong one.
    wrong = enroll(server, "hw-cam-1", replace=True, proof=bystander["device_token"])
    assert wrong.status_code == 409
    assert f"not {device_id}'s current device token" in wrong.json()["error"]

    # The real device is untouched: HTTP and MQTT still work, nothing was re-keyed.
    assert checkin(server, device_id, real["device_token"]).status_code == 200
    assert mqtt_ok(server, device_id, real["mqtt"]["password"])
    with server.db.session() as s:
        types = [e.type for e in queries.recent_events(s, device_id, 10)]
    assert "reenrolled" not in types


def test_reenroll_with_the_current_token_rotates_and_revokes_the_old(
    server: ServerHandle,
) -> None:
    first = enrolled(server, "hw-cam-3")
    device_id = first["device_id"]
    again = enrolled(server, "hw-cam-3", replace=True, proof=first["device_token"])
    assert again["device_id"] == device_id
    assert again["device_token"] != first["device_token"]

    assert checkin(server, device_id, first["device_token"]).status_code == 401
    assert not mqtt_ok(server, device_id, first["mqtt"]["password"])
    assert checkin(server, device_id, again["device_token"]).status_code == 200
    assert mqtt_ok(server, device_id, again["mqtt"]["password"])
    # The spent token proves nothing any more.
    assert enroll(server, "hw-cam-3", replace=True, proof=first["device_token"]).status_code == 409


def test_operator_approval_admits_one_reenrollment_and_expires(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    lost = enrolled(server, "hw-reflashed")
    device_id = lost["device_id"]
    url = f"{server.url}/api/v1/devices/{device_id}/reenroll-approval"
    assert requests.post(url, json={}, timeout=10).status_code == 401  # operator only

    code, out, err = operator_cli(
        server, capsys, "device", "approve-reenroll", device_id, "--ttl", "1h"
    )
    assert code == 0, err
    assert f"device {device_id} may re-enroll once" in out
    code, out, err = operator_cli(
        server, capsys, "device", "approve-reenroll", device_id, "--ttl", "10m", "--json"
    )
    assert code == 0, err
    expires = datetime.fromisoformat(json.loads(out)["expires_at"])
    assert timedelta(minutes=9) < expires - datetime.now(timezone.utc) <= timedelta(minutes=10)

    again = enrolled(server, "hw-reflashed", replace=True)  # no token: the approval admits it
    assert again["device_id"] == device_id
    assert checkin(server, device_id, lost["device_token"]).status_code == 401
    assert checkin(server, device_id, again["device_token"]).status_code == 200
    assert enroll(server, "hw-reflashed", replace=True).status_code == 409  # used up

    # An approval past its expiry admits nothing (moved into the past, not waited for).
    headers = {"Authorization": f"Bearer {server.operator_token}"}
    resp = requests.post(url, json={"ttl_s": 60}, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    with server.db.session() as s:
        s.execute(update(ReenrollApproval).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert enroll(server, "hw-reflashed", replace=True).status_code == 409
    assert checkin(server, device_id, again["device_token"]).status_code == 200

    code, _, err = operator_cli(server, capsys, "device", "approve-reenroll", "dev-none")
    assert code == 1 and "404" in err
    code, _, err = operator_cli(
        server, capsys, "device", "approve-reenroll", device_id, "--ttl", "9d"
    )
    assert code == 1 and "--ttl" in err


# --- rotation -----------------------------------------------------------------------------------


def test_rotation_retires_the_old_token_and_mqtt_password(server: ServerHandle) -> None:
    dev = enrolled(server, "hw-rotating")
    other = enrolled(server, "hw-other")
    device_id = dev["device_id"]
    assert rotate(server, device_id, other["device_token"]).status_code == 403
    assert rotate(server, device_id, "not-a-token").status_code == 401

    resp = rotate(server, device_id, dev["device_token"])
    assert resp.status_code == 200, resp.text
    new = resp.json()
    assert new["device_id"] == device_id and new["mqtt"]["username"] == device_id
    assert (new["mqtt"]["host"], new["mqtt"]["port"]) == (server.mqtt_host, server.mqtt_port)
    assert new["device_token"] != dev["device_token"]

    assert checkin(server, device_id, dev["device_token"]).status_code == 401
    assert rotate(server, device_id, dev["device_token"]).status_code == 401
    assert not mqtt_ok(server, device_id, dev["mqtt"]["password"])
    assert checkin(server, device_id, new["device_token"]).status_code == 200
    assert mqtt_ok(server, device_id, new["mqtt"]["password"])
    assert checkin(server, other["device_id"], other["device_token"]).status_code == 200
    with server.db.session() as s:
        assert "credentials_rotated" in [e.type for e in queries.recent_events(s, device_id, 5)]


def test_agent_rotates_and_reenrolls_with_its_own_credentials(
    server_factory: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(tmp_path / "server")
    root = server.repo.metadata_dir / "1.root.json"

    def agent(name: str, *argv: str) -> tuple[int, str, str]:
        code = agent_main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    def agent_enroll(name: str, *extra: str) -> tuple[int, str, str]:
        return agent(
            name, "enroll", "--server", server.url, "--token", server.config.enrollment_tokens[0],
            "--root", str(root), "--config", str(tmp_path / name / "agent.toml"),
            "--state-dir", str(tmp_path / name / "state"), "--profile", "x86-gateway",
            "--hardware-id", "hw-agent", *extra,
        )  # fmt: skip

    code, _, err = agent_enroll("cam")
    assert code == 0, err
    state = tmp_path / "cam" / "state"
    first = load_identity(state)

    code, out, err = agent(
        "cam", "rotate-credentials", "--config", str(tmp_path / "cam/agent.toml")
    )
    assert code == 0, err
    assert f"rotated the credentials of {first.device_id}" in out
    rotated = load_identity(state)
    assert rotated.device_id == first.device_id and rotated.server == first.server
    assert rotated.device_token != first.device_token
    assert rotated.mqtt.password != first.mqtt.password
    assert stat.S_IMODE((state / "device.json").stat().st_mode) == 0o600
    assert checkin(server, first.device_id, first.device_token).status_code == 401
    assert checkin(server, first.device_id, rotated.device_token).status_code == 200
    assert not mqtt_ok(server, first.device_id, first.mqtt.password)
    assert mqtt_ok(server, first.device_id, rotated.mqtt.password)

    # The device re-enrolls itself: its current token goes along without being asked for.
    code, _, err = agent_enroll("cam", "--replace")
    assert code == 0, err
    again = load_identity(state)
    assert again.device_id == first.device_id and again.device_token != rotated.device_token
    assert checkin(server, first.device_id, rotated.device_token).status_code == 401

    # Another state directory claiming the same hardware id has no proof: refused.
    code, _, err = agent_enroll("intruder", "--replace")
    assert code == 2 and "409" in err and "approve-reenroll" in err
    assert not (tmp_path / "intruder" / "state" / "device.json").exists()
    assert checkin(server, first.device_id, again.device_token).status_code == 200


# --- rate limits --------------------------------------------------------------------------------


def test_an_enrollment_flood_gets_429_with_retry_after(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "server", enroll_rate_per_s=0.1, enroll_burst=3)
    for i in range(3):
        assert enroll(server, f"hw-flood-{i}").status_code == 200
    flooded = enroll(server, "hw-flood-3")
    assert flooded.status_code == 429
    assert 1 <= int(flooded.headers["Retry-After"]) <= 10
    assert "too many enrollments with this token" in flooded.json()["error"]
    # Refused before the token was counted or a row written; another token is unaffected.
    headers = {"Authorization": f"Bearer {server.operator_token}"}
    fresh = requests.post(
        f"{server.url}/api/v1/enrollment-tokens", json={}, headers=headers, timeout=10
    ).json()["token"]
    assert enroll(server, "hw-flood-3", token=fresh).status_code == 200
    devices = requests.get(f"{server.url}/api/v1/devices", headers=headers, timeout=10).json()
    assert len(devices) == 4


def test_a_devices_checkin_flood_gets_429_and_other_devices_are_unaffected(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "server", checkin_rate_per_s=0.1, checkin_burst=5)
    noisy, quiet = enrolled(server, "hw-noisy"), enrolled(server, "hw-quiet")
    statuses = [checkin(server, noisy["device_id"], noisy["device_token"]) for _ in range(6)]
    assert [r.status_code for r in statuses] == [200] * 5 + [429]
    assert 1 <= int(statuses[-1].headers["Retry-After"]) <= 10
    assert checkin(server, quiet["device_id"], quiet["device_token"]).status_code == 200
    # A stranger who knows the device id cannot spend the device's budget (keyed by token).
    assert checkin(server, quiet["device_id"], "forged").status_code == 401
    assert checkin(server, quiet["device_id"], quiet["device_token"]).status_code == 200


def test_rate_limit_flags_reach_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["run", "--data", str(tmp_path), "--enroll-rate", "2", "--enroll-burst", "7",
         "--checkin-rate", "0", "--checkin-burst", "3"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.enroll_rate_per_s, cfg.enroll_burst) == (2.0, 7)
    assert (cfg.checkin_rate_per_s, cfg.checkin_burst) == (0.0, 3)
    defaults = config_from_args(build_parser().parse_args(["run", "--data", str(tmp_path)]))
    assert defaults.checkin_rate_per_s >= 2 and defaults.enroll_burst >= 300


# --- the bucket itself --------------------------------------------------------------------------


def test_bucket_admits_the_burst_then_the_rate() -> None:
    spec = BucketSpec(rate_per_s=2.0, burst=3)
    tokens, wait = take(spec, 3.0, 0.0)
    assert (tokens, wait) == (2.0, 0.0)
    assert take(spec, 0.0, 0.25) == (0.5, 0.25)  # half a token: wait for the other half
    assert take(spec, 0.0, 0.5) == (0.0, 0.0)
    assert take(spec, 0.0, 1000.0) == (2.0, 0.0)  # refill stops at the burst
    assert take(spec, 1.0, -5.0) == (0.0, 0.0)  # a clock going backwards adds nothing


def test_keyed_limiter_separates_keys_and_stays_bounded() -> None:
    limiter = KeyedLimiter("t", BucketSpec(rate_per_s=1.0, burst=2), max_keys=3)
    assert [limiter.wait_s("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.wait_s("b", now=10.0) == 0.0
    assert limiter.wait_s("a", now=11.0) == 0.0  # one token came back
    for key in "cdef":
        limiter.wait_s(key, now=11.0)
    assert len(limiter) == 3
    with pytest.raises(RateLimitedError) as caught:
        for _ in range(3):
            limiter.check("g", "things")
    assert caught.value.status == 429 and caught.value.retry_after_s == 1
    off = KeyedLimiter("off", BucketSpec(rate_per_s=0.0, burst=0), max_keys=1)
    assert all(off.wait_s("x", now=1.0) == 0.0 for _ in range(100)) and len(off) == 0
    for bad in ({"rate_per_s": -1.0, "burst": 1}, {"rate_per_s": 1.0, "burst": 0}):
        with pytest.raises(ConfigError):
            BucketSpec(**bad)

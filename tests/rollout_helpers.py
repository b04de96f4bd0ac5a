"""Drive rollouts the way devices and operators do: REST with tokens, MQTT telemetry.

Simulated devices here speak the real wire protocol (enroll, check-in,
update events, golden-set events, telemetry windows over MQTT with their own
credentials); nothing reaches into the server's internals.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
import requests
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import topics
from agent.protocol.api import InstalledModel, checkin_body
from agent.protocol.manifest import model_target_path
from server.app import ServerHandle
from server.rollout.service import ServiceConfig, TickResult, tick

FIXTURES = Path(__file__).parent / "fixtures"
T = TypeVar("T")
TIMEOUT_S = 30.0




@dataclass
class SimDevice:
    device_id: str
    token: str
    mqtt_password: str
    profile: str
    tags: dict[str, str]
    installed: int | None = None  # the release this device runs (what it reports)


class Fleet:
    """An operator and a set of simulated devices against one (or several) server URLs."""

    def __init__(self, url: str, operator_token: str, enrollment_token: str) -> None:
        self.url = url
        self.enrollment_token = enrollment_token
        self.http = requests.Session()
        self.op_headers = {"Authorization": f"Bearer {operator_token}"}
        self.sha: dict[int, str] = {}

    # --- operator ------------------------------------------------------------------
    def call(self, method: str, path: str, expect: int = 200, url: str | None = None,
             **kwargs: Any) -> Any:
        resp = self.http.request(method, (url or self.url) + path, headers=self.op_headers,
                                 timeout=60, **kwargs)
        assert resp.status_code == expect, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def publish(self, release: int, name: str = "digits") -> None:
        model = FIXTURES / f"digits_int8_r{release}.tflite"
        with open(model, "rb") as fh:
            out = self.call(
                "POST", "/api/v1/models", expect=201, files={"file": (model.name, fh)},
                data={"name": name, "release": str(release), "variant": "int8-cpu",
                      "labels": ",".join(str(i) for i in range(10)), "input_range": "0,1"},
            )
        self.sha[release] = out["sha256"]

    def create(self, expect: int = 201, **body: Any) -> Any:
        return self.call("POST", "/api/v1/rollouts", expect=expect, json=body)

    def rollout(self, rollout_id: str) -> Any:
        return self.call("GET", f"/api/v1/rollouts/{rollout_id}")

    def act(self, rollout_id: str, action: str, expect: int = 200) -> Any:
        return self.call("POST", f"/api/v1/rollouts/{rollout_id}/{action}", expect=expect)

    # --- devices -------------------------------------------------------------------
    def enroll(self, count: int, *, profile: str = "x86-gateway",
               tags: Callable[[int], dict[str, str]] | None = None) -> list[SimDevice]:
        devices = []
        for i in range(count):
            device_tags = tags(i) if tags else {"fleet": "test"}
            body = {
                "token": self.enrollment_token,
                "hardware_id": f"hw-{secrets.token_hex(6)}",
                "profile": profile,
                "variant_preference": ["int8-cpu"],
                "tags": device_tags,
                "agent_version": "0.1.0",
            }
            resp = self.http.post(self.url + "/api/v1/enroll", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
            out = resp.json()
            devices.append(SimDevice(out["device_id"], out["device_token"],
                                     out["mqtt"]["password"], profile, device_tags))
        return devices

    def _device(self, dev: SimDevice, path: str, body: dict[str, Any], url: str | None,
                expect: int) -> Any:
        resp = self.http.post(
            f"{url or self.url}/api/v1/devices/{dev.device_id}/{path}", json=body,
            headers={"Authorization": f"Bearer {dev.token}"}, timeout=30,
        )
        assert resp.status_code == expect, resp.text
        return resp.json()

    def checkin_reply(self, dev: SimDevice, url: str | None = None) -> dict[str, Any]:
        """Check in (reporting the release the device runs); the whole answer."""
        model = None
        if dev.installed is not None:
            model = InstalledModel("digits", dev.installed, "int8-cpu", self.sha[dev.installed],
                                   "a")
        out: dict[str, Any] = self._device(dev, "checkin", checkin_body("idle", model, "0.1.0"),
                                           url, 200)
        return out

    def checkin(self, dev: SimDevice, url: str | None = None) -> dict[str, Any] | None:
        """Check in; the desired target."""
        desired: dict[str, Any] | None = self.checkin_reply(dev, url)["desired"]
        return desired

    def desired_release(self, dev: SimDevice, url: str | None = None) -> int | None:
        desired = self.checkin(dev, url)
        return None if desired is None else int(desired["release"])

    def event(self, dev: SimDevice, type_: str, state: str | None, detail: dict[str, Any],
              url: str | None = None) -> None:
        body = {"type": type_, "state": state, "detail": detail}
        self._device(dev, "events", body, url, 201)

    def install(self, dev: SimDevice, release: int, *, outcome: str = "commit",
                url: str | None = None) -> None:
        """The agent's update event sequence for ``release``, then a check-in.

        ``outcome``: ``commit``, ``fail`` (download fails, back to idle) or
        ``rollback`` (health check fails after the switch).
        """
        target = model_target_path("digits", release, "int8-cpu")

        def step(state: str, reason: str | None = None) -> None:
            self.event(dev, "update", state, {"target": target, "slot": "b", "reason": reason},
                       url)

        step("download")
        if outcome == "fail":
            step("idle", "download: connection reset")
            self.checkin(dev, url)
            return
        for state in ("verify", "install", "smoke_test", "health"):
            step(state)
        if outcome == "rollback":
            step("rollback", "health: invoke errors")
            step("idle", "health: invoke errors")
            self.checkin(dev, url)
            return
        step("commit")
        step("idle")
        dev.installed = release
        self.checkin(dev, url)

    def bring_to(self, devices: Iterable[SimDevice], release: int) -> None:
        """Assign ``release`` by tag and let each device install it."""
        for dev in devices:
            assert self.desired_release(dev) == release, dev.device_id
            self.install(dev, release)


class Telemetry:
    """Telemetry windows over MQTT with each device's own credentials (QoS 1)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.clients: dict[str, paho.Client] = {}

    def _client(self, dev: SimDevice) -> paho.Client:
        client = self.clients.get(dev.device_id)
        if client is None:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=dev.device_id,
                                 protocol=paho.MQTTv311)
            client.username_pw_set(dev.device_id, dev.mqtt_password)
            client.connect(self.host, self.port)
            client.loop_start()
            self.clients[dev.device_id] = client
        return client

    def window(self, dev: SimDevice, release: int, *, p95_ms: float, power_mw: float,
               errors: int = 0, ts: float | None = None, repeat: int = 3,
               source: str = "sensor") -> None:
        """``repeat`` identical windows: a gate judges a device from 3 windows on."""
        for i in range(repeat):
            self._window(dev, release, p95_ms=p95_ms, power_mw=power_mw,
                         errors=errors if i == 0 else 0, ts=None if ts is None else ts + i,
                         source=source)

    def _window(self, dev: SimDevice, release: int, *, p95_ms: float, power_mw: float,
                errors: int, ts: float | None, source: str) -> None:
        payload = {
            "window_s": 10.0, "inferences": 100, "errors": errors, "fps": 10.0,
            "invoke_ms": {"p50": p95_ms * 0.8, "p90": p95_ms * 0.95, "p95": p95_ms,
                          "p99": p95_ms * 1.1, "max": p95_ms * 1.2, "count": 100},
            "power": {"mw": power_mw, "source": source},
            "model": "digits", "release": release, "variant": "int8-cpu", "slot": "a",
            "ts": time.time() if ts is None else ts,
        }
        info = self._client(dev).publish(topics.topic(dev.device_id, "telemetry"),
                                         json.dumps(payload), qos=1)
        info.wait_for_publish(TIMEOUT_S)

    def results(self, dev: SimDevice, release: int, shadow: dict[str, Any] | None = None,
                counts: dict[str, int] | None = None) -> None:
        """A ``results`` window (class counts), with a shadow block when given."""
        counts = counts or {"0": 10}
        hist = [0] * 10
        hist[-1] = sum(counts.values())
        payload: dict[str, Any] = {"model": "digits", "release": release, "slot": "a",
                                   "class_counts": counts, "confidence_hist": hist,
                                   "last_top_k": []}
        if shadow is not None:
            payload["shadow"] = shadow
        info = self._client(dev).publish(topics.topic(dev.device_id, "results"),
                                         json.dumps(payload), qos=1)
        info.wait_for_publish(TIMEOUT_S)

    def close(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()
        self.clients.clear()


def published_fleet(server: ServerHandle) -> Fleet:
    """A ``Fleet`` on ``server`` with releases 1 and 2 published and 1 assigned to fleet=test."""
    f = Fleet(server.url, server.operator_token, server.config.enrollment_tokens[0])
    f.publish(1)
    f.publish(2)
    f.call("POST", "/api/v1/assignments", expect=201,
           json={"name": "digits", "release": 1, "tag": "fleet=test"})
    return f


def tick_once(server: ServerHandle, rollout_id: str, **kw: Any) -> TickResult:
    """One engine tick of ``rollout_id`` now (the tests' servers tick once an hour)."""
    result = tick(server.db, rollout_id, ServiceConfig.from_server(server.config), **kw)
    assert result is not None
    return result

"""``GET /metrics``: fleet gauges from real telemetry, on SQLite and PostgreSQL, never anonymous."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from mosquitto_proc import Peer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from promtool import promtool_problems

from agent.protocol import topics
from server.app import ServerHandle

WAIT_S = 20.0
METRICS_TOKEN = "metrics-" + secrets.token_urlsafe(16)
DASHBOARD = Path(__file__).parent.parent / "dashboards" / "grafana-edgefleet.json"


def window(seq: int, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "seq": seq,
        "ts": time.time(),
        "window_s": 10.0,
        "inferences": 300,
        "fps": 30.0,
        "invoke_ms": {"p50": 3.0, "p90": 4.0, "p95": 5.0, "p99": 7.0, "max": 9.0, "count": 300},
        "e2e_ms": {"p50": 4.0, "p90": 5.0, "p95": 6.0, "p99": 8.0, "max": 10.0, "count": 300},
        "power": {"mw": 2500.0, "source": "sensor", "mj_per_inference": 8.0},
        "thermal": {"max_c": 60.0, "throttled": False, "flags": []},
        "model": "digits",
        "release": 2,
    }
    payload.update(overrides)
    return payload


SLOW = {"p50": 20.0, "p90": 30.0, "p95": 34.0, "p99": 38.0, "max": 40.0, "count": 300}


def enroll(server: ServerHandle, hw: str, profile: str) -> dict[str, Any]:
    body = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": hw,
        "profile": profile,
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    reply: dict[str, Any] = resp.json()
    return reply


def send(dev: dict[str, Any], messages: list[tuple[str, Any]]) -> None:
    mq = dev["mqtt"]
    peer = Peer(mq["host"], mq["port"], mq["username"], mq["password"])
    try:
        for channel, payload in messages:
            body = payload if isinstance(payload, bytes) else json.dumps(payload)
            peer.publish(topics.topic(dev["device_id"], channel), body)
    finally:
        peer.close()


def scrape(server: ServerHandle, token: str | None = METRICS_TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{server.url}/metrics", headers=headers, timeout=10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> ServerHandle:
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    factory: Callable[..., ServerHandle] = request.getfixturevalue("server_factory")
    return factory(
        tmp_path / "server", db_url=db_url, metrics_token=METRICS_TOKEN, metrics_cache_s=0
    )


def test_metrics_show_the_fleet_with_power_sources_and_merged_latency(server: ServerHandle) -> None:
    pi, jetson = enroll(server, "hw-pi", "rpi4"), enroll(server, "hw-jetson", "jetson-orin-nano")
    enroll(server, "hw-quiet", "rpi4")  # enrolled just now: seen, so online
    hot = {"max_c": 80.0, "throttled": True, "flags": ["soft_temp_limit"]}
    send(pi, [("state", {"status": "online"})] + [("telemetry", window(i)) for i in (1, 2)])
    third = window(3, thermal=hot)
    send(pi, [("telemetry", third), ("telemetry", third)])  # a QoS 1 repeat
    estimate = {"mw": 900.0, "source": "estimate", "mj_per_inference": 3.0}
    send(jetson, [("telemetry", window(1, power=estimate, invoke_ms=SLOW)), ("state", b"offline")])

    assert server.writer is not None
    deadline = time.monotonic() + WAIT_S
    while server.writer.stats.stored < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    resp = scrape(server)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    found = samples(resp.text)
    release = {"model": "digits", "release": "2"}

    assert value(found, "edgefleet_devices", profile="rpi4") == 2
    assert value(found, "edgefleet_devices", profile="jetson-orin-nano") == 1
    assert value(found, "edgefleet_devices_online", profile="rpi4") == 2
    assert value(found, "edgefleet_devices_online", profile="jetson-orin-nano") is None  # offline
    assert value(found, "edgefleet_power_mw", profile="rpi4", source="sensor", **release) == 2500
    assert (
        value(found, "edgefleet_power_mw", profile="jetson-orin-nano", source="estimate", **release)
        == 900
    )
    assert value(found, "edgefleet_power_mw", profile="rpi4", source="estimate", **release) is None
    mj = "edgefleet_energy_per_inference_mj"
    assert value(found, mj, profile="rpi4", source="sensor", **release) == 8
    assert value(found, mj, profile="jetson-orin-nano", source="estimate", **release) == 3
    # 900 fast inferences (p95 5 ms) and 300 slow ones (20-40 ms): the fleet p95 is a slow one.
    fleet_p95 = value(found, "edgefleet_latency_p95_seconds", kind="invoke", **release)
    assert fleet_p95 is not None and 0.020 < fleet_p95 <= 0.040
    by_profile = "edgefleet_latency_p95_by_profile_seconds"
    pi_p95 = value(found, by_profile, profile="rpi4", kind="invoke", **release)
    assert pi_p95 == pytest.approx(0.005, rel=0.1)
    assert value(found, by_profile, profile="rpi4", kind="e2e", **release) == pytest.approx(
        0.006, rel=0.1
    )
    assert value(found, "edgefleet_throttled_devices", profile="rpi4") == 1
    assert value(found, "edgefleet_throttled_devices", profile="jetson-orin-nano") == 0
    assert value(found, "edgefleet_temperature_max_celsius", profile="rpi4") == 80
    assert value(found, "edgefleet_devices_reporting", profile="rpi4", **release) == 1
    assert value(found, "edgefleet_ingest_messages_total", result="stored") == 6
    assert value(found, "edgefleet_ingest_messages_total", result="duplicate") == 1
    assert value(found, "edgefleet_ingest_windows_total") == 4
    assert value(found, "edgefleet_ingest_connected") == 1
    # The private registry: nothing leaks into the process-global one.
    assert not any(m.name.startswith("edgefleet") for m in REGISTRY.collect())
    # Every metric the Grafana dashboard queries is one the server serves.
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v.get("definition", "") for v in dashboard["templating"]["list"]]
    queried = set(re.findall(r"\bedgefleet_[a-z0-9_]+", " ".join(exprs)))
    # Field accuracy needs results windows and a validated release: test_accuracy_drift.py
    # checks the dashboard's edgefleet_accuracy_* queries against a fleet that has them, and
    # test_simulator_shadow.py the edgefleet_shadow_* ones against a rollout that shadows.
    queried = {q for q in queried if not q.startswith(("edgefleet_accuracy_", "edgefleet_shadow_"))}
    served = {name for name, _labels in found}
    assert queried and queried <= served, queried - served
    assert promtool_problems(resp.text) == ""


def test_metrics_need_a_bearer_token(server: ServerHandle) -> None:
    assert scrape(server, None).status_code == 401
    assert scrape(server, "x" * 40).status_code == 401
    assert scrape(server, server.operator_token).status_code == 200
    assert scrape(server, METRICS_TOKEN).status_code == 200
    for header in (
        f"Basic {METRICS_TOKEN}",
        f"Token {METRICS_TOKEN}",
        "Bearer",
        "Bearer " + "a" * 5000,
    ):
        resp = requests.get(f"{server.url}/metrics", headers={"Authorization": header}, timeout=10)
        assert resp.status_code == 401, header
        assert resp.json()["error"]
    # The metrics token is read-only: it is not an operator token.
    devices = requests.get(
        f"{server.url}/api/v1/devices",
        headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
        timeout=10,
    )
    assert devices.status_code == 401

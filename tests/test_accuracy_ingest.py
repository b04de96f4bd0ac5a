"""``results`` windows become hourly accuracy rows; garbage is dropped and counted.

Real server on loopback, real MQTT (the embedded broker, and PostgreSQL with
Mosquitto for production), a real paho client publishing as an enrolled device.
The ordering barrier: a broker delivers one client's messages in order, so once
the last good window is stored every earlier message has been judged.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion
from waiting import WAIT_S, eventually, wait_for

from agent.protocol import topics
from server.app import ServerHandle
from server.db.tables import utcnow
from server.telemetry import accuracy_store

GOOD = {"model": "digits", "release": 1, "slot": "a", "last_top_k": [["3", 0.9]]}
GARBAGE: list[Any] = [
    {"top1": "3", "count": 7},
    {**GOOD, "class_counts": {"3": -1}, "confidence_hist": [0] * 10},
    {**GOOD, "class_counts": {"x" * 500: 1}, "confidence_hist": [0] * 9 + [1]},
    {**GOOD, "class_counts": {str(i): 1 for i in range(5000)}, "confidence_hist": [0] * 10},
    {**GOOD, "class_counts": {"3": 1}, "confidence_hist": [0] * 9},
    {**GOOD, "release": "1", "class_counts": {"3": 1}, "confidence_hist": [0] * 9 + [1]},
    {**GOOD, "class_counts": {"3": 1}, "confidence_hist": [0] * 9 + [50]},
]


@pytest.fixture(params=["embedded", "production"])
def server(request: pytest.FixtureRequest, server_factory: Callable[..., ServerHandle],
           tmp_path: Path) -> ServerHandle:  # fmt: skip
    if request.param == "production":
        db_url = request.getfixturevalue("pg_url")
        mqtt_url = request.getfixturevalue("mosquitto_url")
        return server_factory(tmp_path / "server", db_url=db_url, mqtt_url=mqtt_url)
    return server_factory(tmp_path / "server")


@pytest.fixture
def device(server: ServerHandle) -> Iterator[tuple[str, paho.Client]]:
    body = {"token": server.config.enrollment_tokens[0], "profile": "rpi4",
            "hardware_id": f"hw-acc-{secrets.token_hex(4)}",
            "variant_preference": ["int8-cpu"], "agent_version": "0.1.0"}  # fmt: skip
    enrolled = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10).json()
    mqtt = enrolled["mqtt"]
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}",
                         protocol=paho.MQTTv311)  # fmt: skip
    client.username_pw_set(mqtt["username"], mqtt["password"])
    client.connect(mqtt["host"], mqtt["port"])
    client.loop_start()
    yield enrolled["device_id"], client
    client.disconnect()
    client.loop_stop()


def get(server: ServerHandle, path: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {server.operator_token}"}
    return requests.get(server.url + path, headers=headers, timeout=30)


def window(counts: dict[str, int], hist: list[int]) -> dict[str, Any]:
    return {**GOOD, "class_counts": counts, "confidence_hist": hist}


def test_windows_are_summed_per_hour_and_garbage_is_dropped_and_counted(
    server: ServerHandle, device: tuple[str, paho.Client]
) -> None:
    device_id, client = device
    assert server.ingest is not None
    before = server.ingest.results.snapshot()

    def send(payload: Any) -> None:
        topic = topics.topic(device_id, "results")
        client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(WAIT_S)

    send(window({"3": 5, "7": 2}, [0] * 8 + [1, 6]))
    for payload in GARBAGE:
        send(payload)
    send(window({"3": 1, "1": 4}, [0, 0, 0, 0, 0, 2, 0, 0, 0, 3]))

    path = f"/api/v1/devices/{device_id}/accuracy"
    shown = wait_for(
        "both good windows summed",
        lambda: (
            (d := get(server, path).json())["releases"]
            and d["releases"][0]["inferences"] == 12
            and d
        ),
    )
    assert server.ingest.results.snapshot()["rejected"] - before["rejected"] == len(GARBAGE)
    results = server.ingest.results
    assert eventually(lambda: results.snapshot()["stored"] - before["stored"] == 2)
    row = shown["releases"][0]
    assert (row["model"], row["release"]) == ("digits", 1)
    assert row["class_counts"] == {"1": 4, "3": 6, "7": 2}
    assert row["confidence_hist"] == [0, 0, 0, 0, 0, 2, 0, 0, 1, 9]
    assert row["mean_confidence"] == pytest.approx((2 * 0.55 + 0.85 + 9 * 0.95) / 12, abs=1e-3)
    # Published without a validation set (here: not published at all): no reference, said so.
    assert row["drift"] is None and "--validation" in row["drift_reason"]
    assert shown["profile"] == "rpi4"

    fleet = get(server, "/api/v1/accuracy").json()
    (release,) = [r for r in fleet["releases"] if r["model"] == "digits"]
    assert release["profile"] == "rpi4" and release["devices"] == 1
    assert release["inferences"] == 12 and release["drift"] is None
    assert release["drifting_devices"] == [] and release["golden_set_accuracy"] is None

    metrics = get(server, "/metrics").text
    rejected = re.search(r'^edgefleet_accuracy_results_total\{result="rejected"\} (\S+)$',
                         metrics, re.M)  # fmt: skip
    assert rejected is not None and float(rejected.group(1)) >= len(GARBAGE)
    assert re.search(
        r'^edgefleet_accuracy_inferences\{model="digits",profile="rpi4",release="1"\} 12\.0$',
        metrics, re.M,
    )  # fmt: skip
    assert get(server, "/api/v1/devices/no-such-device/accuracy").status_code == 404
    unauthorized = requests.get(server.url + "/api/v1/accuracy", timeout=10)
    assert unauthorized.status_code == 401
    # Retention: hours older than 30 days go; an hour still in the window stays.
    with server.db.session() as s:
        assert accuracy_store.prune(s, utcnow() - accuracy_store.RETENTION) == 0
        assert accuracy_store.prune(s, utcnow() + timedelta(hours=2)) == 1
    assert get(server, path).json()["releases"] == []

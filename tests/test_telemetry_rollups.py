"""Telemetry rollups: the latency sketch, window arithmetic, batched writes, retention, the API.

Batched writes run against SQLite and PostgreSQL (the ``pg_url`` fixture
skips without a database, or fails under EDGEFLEET_PRODUCTION=1).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from mosquitto_proc import Peer
from sqlalchemy import func, select

from agent.protocol import topics
from server.app import ServerHandle
from server.db import queries
from server.db.tables import Database, Event, TelemetryRollup, utcnow
from server.telemetry.storage import (
    IngestMessage,
    RollupConfig,
    RollupQuery,
    query_rollups,
    write_batch,
)
from server.telemetry.windows import Cursor, RollupValues, is_repeat, window_time
from server.telemetry.writer import RollupWriter

CFG = RollupConfig()


def window(**overrides: Any) -> dict[str, Any]:
    """A telemetry window as ``agent/telemetry/window.py`` builds it."""
    payload: dict[str, Any] = {
        "window_s": 10.0,
        "inferences": 300,
        "errors": 1,
        "fps": 30.0,
        "invoke_ms": {"p50": 3.0, "p90": 4.0, "p95": 5.0, "p99": 7.0, "max": 9.0, "count": 298},
        "e2e_ms": {"p50": 5.0, "p90": 6.0, "p95": 7.0, "p99": 9.0, "max": 12.0, "count": 298},
        "cpu_percent": 80.0,
        "rss_mb": 45.5,
        "power": {
            "mw": 2500.0,
            "max_mw": 2700.0,
            "source": "sensor",
            "mj_per_inference": 8.0,
            "mj_per_inference_above_idle": 3.0,
        },
        "thermal": {"max_c": 61.5, "throttled": False, "flags": []},
        "model": "digits",
        "release": 2,
        "variant": "int8-cpu",
        "slot": "a",
        "profile": "rpi4",
    }
    payload.update(overrides)
    return payload


# --- window arithmetic ---------------------------------------------------------------------


def test_rollup_values_sum_and_derive_means() -> None:
    values = RollupValues()
    values.add_window(window())
    values.add_window(
        window(fps=20.0, power={"mw": 1500.0, "source": "sensor", "mj_per_inference": 4.0})
    )
    assert (values.windows, values.inferences, values.errors) == (2, 600, 2)
    assert values.fps_mean == 25.0
    assert values.power_mw_mean == 2000.0
    assert values.mj_per_inference == pytest.approx(6.0)  # (8*300 + 4*300) / 600
    assert values.mj_per_inference_above_idle == pytest.approx(1.5)  # the second had none
    assert values.temp_max_c == 61.5 and values.throttled_windows == 0
    assert values.invoke_p95_ms() == pytest.approx(5.0, rel=0.1)
    assert values.power_mw_max == 2700.0 and values.rss_mb_max == 45.5


def test_missing_and_garbage_fields_count_as_absent_not_zero() -> None:
    values = RollupValues()
    values.add_window({"inferences": 10, "window_s": 1.0})  # an old agent: nothing optional
    values.add_window(
        {
            "inferences": "many",
            "fps": float("inf"),
            "cpu_percent": True,
            "rss_mb": -4,
            "power": {"mw": "2W", "source": "sensor"},
            "thermal": {"max_c": 9000, "throttled": "yes", "flags": "hot"},
            "invoke_ms": [1, 2],
            "outbox_dropped": -5,
        }
    )
    assert (values.windows, values.inferences) == (2, 10)
    assert values.cpu_windows == 0 and values.rss_mb_max is None
    assert values.power_windows == 0 and values.power_mw_mean is None
    assert values.mj_per_inference is None
    assert values.thermal_windows == 1 and values.throttled_windows == 0
    assert values.temp_max_c is None
    assert values.invoke == {} and values.invoke_p95_ms() is None
    assert values.outbox_dropped == 0


def test_throttle_flags_and_merge_equal_one_big_rollup() -> None:
    a, b, both = RollupValues(), RollupValues(), RollupValues()
    windows = [
        window(),
        window(thermal={"max_c": 80.0, "throttled": True, "flags": ["soft_temp_limit"]}),
        window(thermal={"max_c": 70.0, "flags": ["under_voltage"]}),
    ]
    for i, w in enumerate(windows):
        (a if i < 2 else b).add_window(w)
        both.add_window(w)
    merged = a.merge(b)
    assert merged.to_columns() == both.to_columns()
    assert merged.throttled_windows == 2 and merged.temp_max_c == 80.0


@pytest.mark.parametrize(
    ("seq", "ts", "cursor", "repeat"),
    [
        (5, 105.0, Cursor(), False),  # first message of a device
        (6, 106.0, Cursor(5, 105.0), False),  # the next one
        (5, 105.0, Cursor(5, 105.0), True),  # a QoS 1 redelivery
        (3, 103.0, Cursor(5, 105.0), True),  # a replay from before the cursor
        (4, None, Cursor(5, 105.0), True),  # no timestamp: order alone decides
        (1, 900.0, Cursor(5, 105.0), False),  # outbox reset: newer than anything seen
    ],
)
def test_repeats_by_outbox_position(
    seq: int, ts: float | None, cursor: Cursor, repeat: bool
) -> None:
    assert is_repeat(seq, ts, cursor) is repeat


def test_window_time_uses_a_plausible_device_clock_only() -> None:
    now = datetime(2026, 11, 3, 12, 0, 30, tzinfo=timezone.utc)
    earlier = now - timedelta(hours=2)
    assert window_time({"ts": earlier.timestamp()}, now, 86_400, 300) == earlier
    for ts in (now.timestamp() + 3600, now.timestamp() - 10 * 86_400, "noon", None, True):
        assert window_time({"ts": ts}, now, 86_400, 300) == now


# --- batched writes on both databases ------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'ef.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    database = Database(url)
    database.create_all()
    yield database
    database.dispose()


def enroll(db: Database, hw: str, profile: str = "rpi4") -> str:
    with db.session() as s:
        creds = queries.enroll_device(
            s,
            hardware_id=hw,
            profile=profile,
            variant_preference=["int8-cpu"],
            tags={},
            agent_version="0.1.0",
        )
    return creds.device_id


def msg(
    device: str, payload: dict[str, Any], channel: str = "telemetry", **kw: Any
) -> IngestMessage:
    return IngestMessage(device, channel, payload, kw.pop("at", utcnow()), **kw)


def rollups(db: Database, **filters: Any) -> list[Any]:
    q = RollupQuery(
        since=utcnow() - timedelta(days=2), until=utcnow() + timedelta(days=1), **filters
    )
    with db.session() as s:
        rows, _ = query_rollups(s, q)
    return rows


def test_a_batch_dedupes_rolls_up_and_keeps_the_latest(db: Database) -> None:
    cam, other = enroll(db, "hw-1"), enroll(db, "hw-2", profile="jetson-orin-nano")
    now = time.time()
    batch = [
        msg(cam, window(seq=1, ts=now)),
        msg(cam, window(seq=2, ts=now, fps=20.0)),
        msg(cam, window(seq=2, ts=now, fps=20.0)),  # QoS 1 repeat
        msg(cam, {"type": "update", "state": "commit", "seq": 3, "ts": now}, "events"),
        msg(cam, window(seq=4, ts=now, release=3, outbox_dropped=7)),
        msg(other, window(seq=1, ts=now, power={"mw": 900.0, "source": "estimate"})),
        msg("dev-unknown", window(seq=1)),
    ]
    with db.session() as s:
        result = write_batch(s, batch, CFG)
    assert (len(result.accepted), result.duplicates, result.rejected) == (5, 1, 1)
    assert (result.windows, result.outbox_dropped) == (4, 7)

    rows = {(r.device_id, r.release, r.power_source): r for r in rollups(db)}
    assert set(rows) == {(cam, 2, "sensor"), (cam, 3, "sensor"), (other, 2, "estimate")}
    r2 = rows[(cam, 2, "sensor")]
    assert (r2.windows, r2.inferences, r2.fps_sum, r2.profile) == (2, 600, 50.0, "rpi4")
    assert rows[(other, 2, "estimate")].profile == "jetson-orin-nano"
    assert rows[(cam, 3, "sensor")].outbox_dropped == 7
    with db.session() as s:
        latest = {t.channel: t.payload for t in queries.latest_telemetry(s, cam)}
        events = [e.type for e in s.scalars(select(Event).where(Event.device_id == cam))]
        last_seen = queries.get_device(s, cam).last_seen
    assert latest["telemetry"]["seq"] == 4 and latest["events"]["state"] == "commit"
    assert "update" in events and "outbox_dropped" in events
    assert last_seen is not None

    # A later batch merges into the same minute, and the cursor survives between batches.
    with db.session() as s:
        again = write_batch(
            s, [msg(cam, window(seq=4, ts=now)), msg(cam, window(seq=5, ts=now))], CFG
        )
    assert (len(again.accepted), again.duplicates) == (1, 1)
    r2 = {(r.device_id, r.release): r for r in rollups(db)}[(cam, 2)]
    assert (r2.windows, r2.inferences) == (3, 900)
    assert RollupValues.from_row(r2).invoke_p95_ms() == pytest.approx(5.0, rel=0.1)


def test_rollup_queries_filter_and_truncate(db: Database) -> None:
    a, b = enroll(db, "hw-a"), enroll(db, "hw-b", profile="coral-dev")
    base = time.time() - 3600
    batch = [msg(a, window(seq=i, ts=base + 60 * i)) for i in range(1, 6)]
    batch += [msg(b, window(seq=1, ts=base, model="people", release=7))]
    with db.session() as s:
        write_batch(s, batch, CFG)
    assert len(rollups(db)) == 6
    assert len(rollups(db, device_id=a)) == 5
    assert [r.device_id for r in rollups(db, profile="coral-dev")] == [b]
    assert [r.device_id for r in rollups(db, model="people", release=7)] == [b]
    assert rollups(db, release=99) == []
    q = RollupQuery(since=utcnow() - timedelta(days=1), until=utcnow(), device_id=a, limit=2)
    with db.session() as s:
        rows, truncated = query_rollups(s, q)
    assert len(rows) == 2 and truncated
    assert rows[0].bucket < rows[1].bucket


def test_retention_prunes_old_buckets(db: Database) -> None:
    cam = enroll(db, "hw-old")
    old = utcnow() - timedelta(days=10)
    with db.session() as s:
        write_batch(s, [msg(cam, window(seq=1), at=old), msg(cam, window(seq=2))], CFG)
    writer = RollupWriter(db, RollupConfig(retention_s=5 * 86_400))
    assert writer.prune() == 1
    assert len(rollups(db)) == 1
    assert writer.stats.pruned == 1


def test_the_writer_acks_after_commit_in_order_and_flushes_on_stop(db: Database) -> None:
    cam = enroll(db, "hw-writer")
    writer = RollupWriter(db, RollupConfig(flush_interval_s=0.05, flush_max_messages=7))
    acked: list[int] = []
    seen: list[int] = []
    lock = threading.Lock()

    def ack(seq: int) -> Callable[[], None]:
        def done() -> None:
            with db.session() as s:  # the message is committed before its ack
                stored = s.scalar(select(func.sum(TelemetryRollup.windows)))
            assert stored is not None and stored >= 1
            with lock:
                acked.append(seq)

        return done

    writer.add_listener(lambda m: seen.append(m.payload["seq"]))
    writer.start()
    for seq in range(1, 41):
        writer.submit(msg(cam, window(seq=seq), ack=ack(seq)))
    writer.submit(msg(cam, window(seq=40), ack=ack(40)))  # a repeat is acknowledged too
    writer.stop()
    assert acked == [*range(1, 41), 40]  # in order, each after its commit
    assert seen == list(range(1, 41))
    assert writer.stats.stored == 40 and writer.stats.duplicates == 1
    assert writer.stats.batches >= 6  # at most 7 per transaction
    assert sum(r.windows for r in rollups(db)) == 40
    with pytest.raises(Exception, match="stopped"):
        writer.submit(msg(cam, window(seq=41)))


def test_a_poison_message_is_dropped_alone(db: Database) -> None:
    """NaN is valid to Python's json but not to PostgreSQL: that message alone is refused."""
    cam = enroll(db, "hw-poison")
    writer = RollupWriter(db, RollupConfig(flush_interval_s=0.05))
    acked: list[str] = []
    writer.start()
    writer.submit(msg(cam, window(seq=1), ack=lambda: acked.append("good")))
    poison = {"seq": 2, "top1": float("nan")}
    writer.submit(msg(cam, poison, "results", ack=lambda: acked.append("poison")))
    writer.submit(msg(cam, window(seq=3), ack=lambda: acked.append("good")))
    writer.stop()
    assert acked.count("good") == 2 and acked.count("poison") == 1  # none left for redelivery
    assert sum(r.windows for r in rollups(db)) == 2
    assert writer.stats.rejected == (1 if db.dialect == "postgresql" else 0)


# --- the REST API -------------------------------------------------------------------------------


def _publish_windows(server: ServerHandle, count: int) -> tuple[str, dict[str, str]]:
    body = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": "hw-api",
        "profile": "rpi4",
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    dev = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10).json()
    mq = dev["mqtt"]
    peer = Peer(mq["host"], mq["port"], mq["username"], mq["password"])
    try:
        for seq in range(1, count + 1):
            payload = json.dumps(window(seq=seq, ts=time.time()))
            peer.publish(topics.topic(dev["device_id"], "telemetry"), payload)
    finally:
        peer.close()
    return dev["device_id"], {"Authorization": f"Bearer {server.operator_token}"}


def test_telemetry_api_returns_rollups_and_refuses_garbage(module_server: ServerHandle) -> None:
    device_id, auth = _publish_windows(module_server, 3)
    url = f"{module_server.url}/api/v1/telemetry"
    deadline = time.monotonic() + 20
    while True:
        page = requests.get(url, params={"device": device_id}, headers=auth, timeout=10).json()
        if sum(r["windows"] for r in page["rollups"]) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (row,) = page["rollups"]
    assert (row["windows"], row["inferences"], row["model"], row["release"]) == (
        3,
        900,
        "digits",
        2,
    )
    assert row["power"]["source"] == "sensor" and row["power"]["mw_mean"] == 2500.0
    assert row["power"]["mj_per_inference"] == 8.0
    assert row["invoke_p95_ms"] == pytest.approx(5.0, rel=0.1) and row["temp_max_c"] == 61.5
    assert page["bucket_s"] == 60 and page["truncated"] is False
    for params in (
        {"release": "digits@2"},
        {"release": "2", "model": "digits"},
        {"profile": "rpi4"},
    ):
        found = requests.get(url, params={**params, "device": device_id}, headers=auth, timeout=10)
        assert found.json()["count"] == 1, params
    none = requests.get(
        url, params={"device": device_id, "release": "digits@3"}, headers=auth, timeout=10
    )
    assert none.json()["count"] == 0

    assert requests.get(url, timeout=10).status_code == 401
    assert (
        requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    )
    for params in (
        {"device": "../etc/passwd"},
        {"profile": "RPi 4"},
        {"release": "two"},
        {"release": "digits@0"},
        {"release": "people@2", "model": "digits"},
        {"since": "yesterday"},
        {"until": "2026-13-45T99:00"},
        {"since": "2026-11-02T10:00:00Z", "until": "2026-11-02T09:00:00Z"},
        {"limit": "0"},
        {"limit": "1000000"},
    ):
        resp = requests.get(url, params=params, headers=auth, timeout=10)
        assert resp.status_code == 422, (params, resp.text)
        assert resp.json()["error"]

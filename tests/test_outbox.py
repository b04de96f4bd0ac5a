"""SQLite outbox: order, restart survival, overflow accounting, concurrent put/ack."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import cast

import pytest

from agent.transport.outbox import Outbox, OutboxConfig, OutboxError

TOPIC = "edgefleet/v1/devices/cam-1/telemetry"
ROW = len(TOPIC) + 64  # per-message overhead with the default config


def test_put_peek_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        seqs = [box.put(TOPIC, f"m{i}".encode()) for i in range(5)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        assert [m.payload for m in box.peek(3)] == [b"m0", b"m1", b"m2"]
        assert [m.payload for m in box.peek(10, after=seqs[2])] == [b"m3", b"m4"]
        assert box.ack(seqs[1]) is True
        assert box.ack(seqs[1]) is False  # a duplicate PUBACK is harmless
        assert [m.seq for m in box.peek(10)] == [seqs[0], *seqs[2:]]
        assert len(box) == 4
        assert box.bytes_used == sum(2 + ROW for _ in range(4))


def test_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    box = Outbox(path)
    first = box.put(TOPIC, b"\x00binary\xff")
    box.put("edgefleet/v1/devices/cam-1/events", b'{"event":"commit"}')
    box.ack(first)
    used = box.bytes_used
    box.close()
    reopened = Outbox(path)
    messages = reopened.peek(10)
    assert [(m.topic, m.payload) for m in messages] == [
        ("edgefleet/v1/devices/cam-1/events", b'{"event":"commit"}')
    ]
    assert reopened.bytes_used == used
    assert reopened.put(TOPIC, b"later") > messages[0].seq
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_overflow_drops_oldest_and_counts_persistently(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    payload = b"x" * 100
    config = OutboxConfig(max_bytes=10 * (100 + ROW))  # exactly ten messages fit
    box = Outbox(path, config)
    seqs = [box.put(TOPIC, payload) for _ in range(25)]
    assert len(box) == 10
    assert [m.seq for m in box.peek(100)] == seqs[-10:]  # the newest survive, in order
    assert box.bytes_used <= config.max_bytes
    assert box.dropped_pending == 15
    box.close()
    box = Outbox(path, config)  # the count survives a restart
    assert box.take_dropped() == 15
    assert box.take_dropped() == 0
    box.put(TOPIC, payload)
    assert box.take_dropped() == 1 and box.dropped_total == 16
    box.close()


def test_big_message_evicts_several_small_ones(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", OutboxConfig(max_bytes=1000, row_overhead_bytes=0)) as box:
        small = [box.put("t", b"s" * 99) for _ in range(10)]  # 100 bytes each
        box.put("t", b"B" * 349)  # needs 350: the four oldest go
        assert [m.seq for m in box.peek(20)][:6] == small[4:]
        assert box.take_dropped() == 4


def test_dropped_in_flight_message_cannot_be_acked(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", OutboxConfig(max_bytes=2 * (1 + ROW))) as box:
        first = box.put(TOPIC, b"a")
        in_flight = box.peek(1)
        box.put(TOPIC, b"b")
        box.put(TOPIC, b"c")  # evicts "a" while it is being published
        assert in_flight[0].seq == first
        assert box.ack(first) is False
        assert box.take_dropped() == 1


@pytest.mark.parametrize(
    ("topic", "payload", "message"),
    [("", b"x", "non-empty string"), (TOPIC, "text", "must be bytes"),
     (TOPIC, b"x" * 5000, "exceeds the outbox bound")],
)
def test_bad_messages_are_refused_loudly(
    tmp_path: Path, topic: str, payload: object, message: str
) -> None:
    with Outbox(tmp_path / "o.db", OutboxConfig(max_bytes=4096)) as box:
        with pytest.raises(OutboxError, match=message):
            box.put(topic, cast(bytes, payload))  # garbage on purpose
        assert len(box) == 0


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(OutboxError, match="is unreadable"):
        Outbox(path, OutboxConfig(recover_corrupt=False))
    with Outbox(path) as box:
        box.put(TOPIC, b"fresh")
        assert len(box) == 1
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1


def test_concurrent_put_and_ack_keeps_order(tmp_path: Path) -> None:
    total = 1500
    box = Outbox(tmp_path / "o.db")
    produced: list[int] = []
    delivered: list[bytes] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            for i in range(total):
                produced.append(box.put(TOPIC, str(i).encode()))
        except BaseException as err:
            errors.append(err)
        finally:
            done.set()

    def publisher() -> None:
        try:
            while True:
                finished = done.is_set()
                batch = box.peek(50)
                for message in batch:
                    delivered.append(message.payload)
                    assert box.ack(message.seq)
                if finished and not batch:
                    return
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=producer), threading.Thread(target=publisher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert delivered == [str(i).encode() for i in range(total)]
    assert produced == sorted(produced)
    assert len(box) == 0 and box.bytes_used == 0 and box.take_dropped() == 0
    box.close()

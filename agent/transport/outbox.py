"""Bounded on-disk message queue for MQTT while the broker is unreachable.

SQLite in WAL mode, one row per message (``seq`` never reused, so an ack can
never hit a newer message). Publishers ``put``; the MQTT side replays
``peek(n)`` in ``seq`` order at QoS 1 and ``ack``s each message on PUBACK.
When the logical size (payload + topic + a fixed per-row overhead) would pass
``max_bytes``, the OLDEST messages are deleted and counted in a persistent
counter; ``take_dropped()`` hands that count to the next message. Nothing is
dropped silently. One connection behind a lock makes it safe to ``put`` from
the inference thread while the MQTT callback thread ``ack``s.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from agent.common.errors import TelemetryError

logger = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('dropped_pending', 0), ('dropped_total', 0);
"""


class OutboxError(TelemetryError):
    """The outbox file cannot be opened or a message cannot be queued."""


@dataclass(frozen=True)
class OutboxConfig:
    max_bytes: int = 16 * 1024 * 1024
    row_overhead_bytes: int = 64  # counted per message so tiny messages still cost something
    busy_timeout_s: float = 5.0
    synchronous: str = "NORMAL"  # WAL+NORMAL survives crashes; FULL also survives power loss
    recover_corrupt: bool = True  # move an unreadable file aside and start empty

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.row_overhead_bytes < 0 or self.busy_timeout_s <= 0:
            raise ValueError(f"invalid outbox limits: {self}")
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"invalid outbox synchronous mode {self.synchronous!r}")


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: str | Path, config: OutboxConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or OutboxConfig()
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as err:
            if not self.config.recover_corrupt:
                raise OutboxError(f"outbox {self.path} is unreadable: {err}") from err
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            logger.error("outbox %s is unreadable (%s); moved aside to %s, starting empty",
                         self.path, err, aside)
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._db = self._open()
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM outbox").fetchone()
        self._bytes, count = int(row[0]), int(row[1])
        if count:
            logger.info("outbox %s holds %s queued messages (%s bytes)",
                        self.path, count, self._bytes)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path, timeout=self.config.busy_timeout_s, isolation_level=None,
            check_same_thread=False,  # every use is under self._lock
        )
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("outbox %s: WAL unavailable, using journal mode %s", self.path, mode)
            db.execute(f"PRAGMA synchronous={self.config.synchronous}")
            db.executescript(_SCHEMA)
            db.execute("SELECT seq, topic, payload, size FROM outbox LIMIT 0").fetchall()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM outbox_meta WHERE key = ?", (key,))
                   .fetchone()[0])

    def put(self, topic: str, payload: bytes) -> int:
        """Queue a message and return its ``seq``; oldest messages make room if needed."""
        if not isinstance(topic, str) or not topic:
            raise OutboxError(f"outbox topic must be a non-empty string, got {topic!r}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise OutboxError(f"outbox payload must be bytes, got {type(payload).__name__}")
        body = bytes(payload)
        size = len(body) + len(topic.encode("utf-8")) + self.config.row_overhead_bytes
        if size > self.config.max_bytes:
            raise OutboxError(
                f"message of {size} bytes on {topic} exceeds the outbox bound of "
                f"{self.config.max_bytes} bytes"
            )
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                raise OutboxError(f"outbox {self.path}: cannot start a write: {err}") from err
            try:
                dropped, freed = self._make_room(size)
                cursor = self._db.execute(
                    "INSERT INTO outbox (topic, payload, size) VALUES (?, ?, ?)",
                    (topic, body, size),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                self._db.execute("ROLLBACK")
                raise OutboxError(f"outbox {self.path}: cannot queue on {topic}: {err}") from err
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._bytes += size - freed
            seq = cursor.lastrowid
        if dropped:
            logger.warning("outbox full (%s bytes): dropped %s oldest message(s)",
                           self.config.max_bytes, dropped)
        assert seq is not None
        return seq

    def _make_room(self, size: int) -> tuple[int, int]:
        """Delete the oldest rows until ``size`` more bytes fit; count them. In a transaction."""
        need = self._bytes + size - self.config.max_bytes
        if need <= 0:
            return 0, 0
        freed = dropped = 0
        last = None
        for seq, row_size in self._db.execute("SELECT seq, size FROM outbox ORDER BY seq"):
            freed += int(row_size)
            dropped += 1
            last = seq
            if freed >= need:
                break
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        self._db.execute(
            "UPDATE outbox_meta SET value = value + ? "
            "WHERE key IN ('dropped_pending', 'dropped_total')",
            (dropped,),
        )
        return dropped, freed

    def peek(self, n: int = 100, after: int = 0) -> list[OutboxMessage]:
        """Up to ``n`` oldest messages with ``seq > after``, in order, without removing them."""
        if n <= 0:
            raise ValueError(f"peek needs n > 0, got {n}")
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, n),
            ).fetchall()
        return [OutboxMessage(int(seq), str(topic), bytes(payload)) for seq, topic, payload in rows]

    def ack(self, seq: int) -> bool:
        """Remove a delivered message; False if it is gone already (acked or dropped)."""
        with self._lock:
            # SELECT then DELETE rather than RETURNING: older boards ship SQLite < 3.35.
            row = self._db.execute("SELECT size FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._bytes -= int(row[0])
            return True

    def take_dropped(self) -> int:
        """Messages dropped since the last call; the count is reset (persistently)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            count = self._meta("dropped_pending")
            self._db.execute("UPDATE outbox_meta SET value = 0 WHERE key = 'dropped_pending'")
            self._db.execute("COMMIT")
        return count

    @property
    def dropped_pending(self) -> int:
        with self._lock:
            return self._meta("dropped_pending")

    @property
    def dropped_total(self) -> int:
        """Every message ever dropped for space, across restarts."""
        with self._lock:
            return self._meta("dropped_total")

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

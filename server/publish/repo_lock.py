"""The lock around every read-modify-write of the TUF repository.

Each change re-reads the metadata, bumps versions and re-signs: two writers
interleaving would sign two different ``targets.json`` with the same version,
and one publish would vanish. So writers take one lock that spans every
process that may write the same repository:

- ``FileLock``: ``flock`` on a file in the data directory; enough for one box
  (SQLite, one server process, CLI tools beside it).
- ``AdvisoryLock``: a PostgreSQL session advisory lock; spans API worker
  processes and replicas on other hosts that share the database and the
  artifact store. It is held on a connection of its own (autocommit, so no
  transaction stays open), and dies with that connection if the process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from server.errors import ServerError

log = logging.getLogger(__name__)

__all__ = [
    "AdvisoryLock",
    "FileLock",
    "ProcessWideLock",
    "RepoLock",
    "RepoLockError",
    "advisory_key",
]


class RepoLockError(ServerError):
    """The repository lock could not be taken (database or file system trouble)."""


def advisory_key(name: str) -> int:
    """A stable signed 32-bit key derived from ``name`` (the lock's first half)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


TUF_REPO_LOCK = advisory_key("edgefleet:tuf-repository")
# A whole publish (check, sign, record, build deltas) is one step for the fleet: two
# workers must not both find a release new and both publish it. A key of its own,
# because a publish takes the repository lock inside it.
PUBLISH_LOCK = advisory_key("edgefleet:publish")


class RepoLock(Protocol):
    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Block until this process holds the lock; release on exit."""

    def describe(self) -> str: ...


class FileLock:
    """``flock(LOCK_EX)`` on ``path``: every process on this host that opens it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"flock {self.path}"

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+b")  # noqa: SIM115 - closed below, after unlocking
        except OSError as err:
            raise RepoLockError(f"cannot open lock file {self.path}: {err}") from err
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# The second half is the schema: one fleet per schema, and fleets in other
# schemas of the same database (tests, staging) never wait for each other.
_LOCK = "SELECT pg_advisory_lock(:k, hashtext(current_schema()))"
_UNLOCK = "SELECT pg_advisory_unlock(:k, hashtext(current_schema()))"


class AdvisoryLock:
    """``pg_advisory_lock(key, schema)`` on a dedicated connection from ``engine``."""

    def __init__(self, engine: Engine, key: int = TUF_REPO_LOCK) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("advisory locks need PostgreSQL")
        self.engine = engine
        self.key = key

    def describe(self) -> str:
        return f"pg_advisory_lock({self.key}, <schema>)"

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as err:
            raise RepoLockError(f"no database connection for the repository lock: {err}") from err
        with conn:
            try:
                conn.execute(text(_LOCK), {"k": self.key})
            except SQLAlchemyError as err:
                raise RepoLockError(f"cannot take the repository lock: {err}") from err
            try:
                yield
            finally:
                try:
                    conn.execute(text(_UNLOCK), {"k": self.key})
                except SQLAlchemyError as err:
                    # A session lock outlives the transaction: drop the connection
                    # so the server ends the session, and the lock with it.
                    log.warning("releasing the repository lock failed (%s); closing it", err)
                    conn.invalidate()


class ProcessWideLock:
    """A plain ``with`` lock (like ``threading.Lock``) that also holds ``inner``.

    The thread lock comes first, so one process's threads queue here rather
    than each opening a database session to wait in.
    """

    def __init__(self, inner: RepoLock) -> None:
        self.inner = inner
        self._thread_lock = threading.Lock()
        self._held: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            held = self.inner.hold()
            held.__enter__()
        except BaseException:
            self._thread_lock.release()
            raise
        self._held = held

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        try:
            if held is not None:
                held.__exit__(exc_type, exc, tb)
        finally:
            self._thread_lock.release()

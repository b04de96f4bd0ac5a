"""TUF repository writes from several processes: nothing lost, versions strictly increase.

Two OS processes publish, revoke and re-sign the timestamp concurrently, many times.
On SQLite (one box) they share the repository directory and its flock. On PostgreSQL
they stand for two replicas on two hosts: each has its own working directory (so no
flock is shared) and only the database's advisory lock and the artifact store are
common. Afterwards the repository must be one consistent history that the agent's
own TUF client verifies.
"""

from __future__ import annotations

import fcntl
import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from tuf.api.metadata import Metadata
from tuf_sim import RepoServer

from agent.update.download import DownloadLimits, download, target_url
from agent.update.trust import TrustClient
from server.db.tables import Database
from server.publish.artifact_store import LocalStore
from server.publish.keys import init_keys
from server.publish.repo_lock import (
    PUBLISH_LOCK,
    TUF_REPO_LOCK,
    AdvisoryLock,
    FileLock,
    ProcessWideLock,
    RepoLock,
)
from server.publish.tuf_repo import TufRepository

ROUNDS = 25  # per process; each round is a publish, every 5th also a revoke and a re-sign
FAST = DownloadLimits(retries=1, backoff_base_s=0.01, timeout_s=10)


def _writer(work: str, keys: str, store_dir: str, db_url: str | None, name: str) -> list[str]:
    """One process's share: returns the target paths it left published."""
    store = LocalStore(Path(store_dir))
    db = Database(db_url) if db_url else None
    lock: RepoLock = AdvisoryLock(db.engine) if db else FileLock(Path(work) / ".lock")
    repo = TufRepository.open(Path(work), Path(keys), store=store, lock=lock)
    kept: list[str] = []
    for i in range(ROUNDS):
        path = f"{name}/t{i}.bin"
        repo.add_target(path, f"{name} {i}".encode() * 100, {"round": i})
        kept.append(path)
        if i % 5 == 4:
            repo.remove_target(kept.pop(0))
            # Timestamp-only re-sign: due once less than half its day remains.
            repo.refresh(datetime.now(timezone.utc) + timedelta(hours=13))
    if db is not None:
        db.dispose()
    return kept


def _md(store: LocalStore, name: str) -> Metadata[Any]:
    return Metadata.from_bytes(store.read(f"metadata/{name}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


def test_concurrent_writers_keep_one_consistent_history(
    tmp_path: Path, backend: str | None
) -> None:
    keys, store_dir = tmp_path / "keys", tmp_path / "repo"
    init_keys(keys)
    store = LocalStore(store_dir)
    TufRepository.create(store_dir, keys, store=store)
    # PostgreSQL: separate working directories, as on two hosts; SQLite: one directory.
    works = [tmp_path / f"host{i}" for i in (1, 2)] if backend else [store_dir, store_dir]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        jobs = [
            pool.apply_async(_writer, (str(w), str(keys), str(store_dir), backend, f"p{i}"))
            for i, w in enumerate(works)
        ]
        kept = [path for job in jobs for path in job.get(timeout=300)]

    timestamp = _md(store, "timestamp.json")
    snapshot = _md(store, f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    latest_targets = snapshot.signed.meta["targets.json"].version
    # Each publish and revoke is one targets version: none was lost or signed twice.
    changes = 2 * (ROUNDS + ROUNDS // 5)
    assert latest_targets == 1 + changes
    # Every version exists, in order, each a strict successor holding what came before.
    previous: set[str] = set()  # version 1 is the empty repository
    for version in range(2, latest_targets + 1):
        targets = _md(store, f"{version}.targets.json")
        assert targets.signed.version == version
        now = set(targets.signed.targets)
        assert len(now ^ previous) == 1, f"targets v{version} is not one change from v{version - 1}"
        previous = now
    assert previous == set(kept)
    # Snapshot and timestamp reference the newest versions; the timestamp was re-signed too.
    assert not store.path(f"metadata/{snapshot.signed.version + 1}.snapshot.json").exists()
    assert snapshot.signed.version == 1 + changes
    # Re-signs add timestamp versions; one may find the other's fresh enough and skip.
    assert 1 + changes < timestamp.signed.version <= 1 + changes + 2 * (ROUNDS // 5)

    # The agent's TUF client accepts the result and every surviving target verifies.
    root = store.read("metadata/1.root.json")
    with RepoServer(store_dir) as srv:
        client = TrustClient(tmp_path / "device" / "tuf", srv.url, root)
        client.refresh()
        for path in kept:
            info = client.target_info(path)
            dest = tmp_path / "device" / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            download(target_url(srv.url, info.path, info.sha256), dest, info.length,
                     info.sha256, FAST)  # fmt: skip
            client.verify_file(info, dest)


def test_a_writer_signs_from_the_store_not_its_stale_copy(tmp_path: Path, pg_url: str) -> None:
    """Two instances on different hosts: the second sees the first's publish before signing."""
    keys = tmp_path / "keys"
    init_keys(keys)
    store = LocalStore(tmp_path / "bucket")
    db = Database(pg_url)
    try:
        one = TufRepository.create(tmp_path / "a", keys, store=store, lock=AdvisoryLock(db.engine))
        two = TufRepository.open(tmp_path / "b", keys, store=store, lock=AdvisoryLock(db.engine))
        one.add_target("m/one.bin", b"1", {})
        two.add_target("m/two.bin", b"2", {})  # its copy was loaded before "one" existed
        assert set(one.targets()) == {"m/one.bin", "m/two.bin"}
        assert one.versions()["targets"] == 3
        # Target bytes published by the other host are fetched into this host's cache.
        assert two.target_file("m/one.bin").read_bytes() == b"1"
        assert two.target_file("m/one.bin").is_relative_to(tmp_path / "b")
    finally:
        db.dispose()


def test_the_publish_lock_excludes_other_sessions_and_processes(
    tmp_path: Path, pg_url: str
) -> None:
    db = Database(pg_url)
    try:
        lock = ProcessWideLock(AdvisoryLock(db.engine, PUBLISH_LOCK))
        probe = text("SELECT pg_try_advisory_lock(:k, hashtext(current_schema()))")
        release = text("SELECT pg_advisory_unlock(:k, hashtext(current_schema()))")
        with db.engine.connect() as other:
            with lock:
                assert other.execute(probe, {"k": PUBLISH_LOCK}).scalar() is False
                # The repository lock is another key: a publish may take it inside.
                assert other.execute(probe, {"k": TUF_REPO_LOCK}).scalar() is True
                other.execute(release, {"k": TUF_REPO_LOCK})
            assert other.execute(probe, {"k": PUBLISH_LOCK}).scalar() is True
            other.execute(release, {"k": PUBLISH_LOCK})
    finally:
        db.dispose()
    flock = ProcessWideLock(FileLock(tmp_path / ".publish.lock"))
    with flock, open(tmp_path / ".publish.lock", "a+b") as other_fd, pytest.raises(BlockingIOError):
        fcntl.flock(other_fd.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".publish.lock", "a+b") as other_fd:
        fcntl.flock(other_fd.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again

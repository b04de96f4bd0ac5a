"""The server's TUF repository on disk, built with python-tuf's Metadata API.

Consistent snapshots in an artifact store (``server.publish.artifact_store``: the
local ``repo_dir`` by default, or S3): ``metadata/`` holds ``N.root.json``,
``root.json``, ``N.targets.json``, ``N.snapshot.json`` and ``timestamp.json``;
``targets/`` holds ``<dir>/<sha256>.<basename>``. Each change writes target
bytes, then targets, snapshot and last timestamp.json, each atomically:
timestamp.json is the commit point, so a crash shows the old or the new
repository, never a mix.

Every change runs under a thread lock plus a ``RepoLock`` spanning processes
(an flock in ``repo_dir``, or a PostgreSQL advisory lock for API workers and
replicas), and reloads the metadata from the store once it holds the lock, so
nothing is ever signed from a stale in-memory copy. With a remote store,
``repo_dir/targets`` is a cache of the target bytes this process needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import SerializationError

from agent.common.atomic import commit_file
from agent.protocol.custom_fields import TargetInfo
from server.errors import (
    ConflictError,
    InvalidInputError,
    KeyStoreError,
    NotFoundError,
    ServerError,
)
from server.publish.artifact_store import ArtifactStore, ArtifactStoreError, LocalStore
from server.publish.keys import ROLES, load_signers
from server.publish.repo_lock import FileLock, RepoLock
from server.publish.tuf_rules import (
    ExpiryPolicy,
    Source,
    check_custom,
    check_target_path,
    chunks,
    info_of,
    stored_name,
    target_key,
    with_dependents,
)

logger = logging.getLogger(__name__)

__all__ = ["ExpiryPolicy", "TargetInfo", "TufRepoError", "TufRepository"]


class TufRepoError(ServerError):
    """The repository on disk is missing, corrupt or not signed by our keys."""


class TufRepository:
    """A signed TUF repository; use ``create()`` or ``open()``."""

    def __init__(
        self,
        repo_dir: Path,
        keys_dir: Path,
        expiry: ExpiryPolicy | None,
        store: ArtifactStore | None = None,
        lock: RepoLock | None = None,
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"  # with a remote store: a cache
        self.store = store or LocalStore(self.repo_dir)
        self.process_lock = lock or FileLock(self.repo_dir / ".lock")
        self.expiry = expiry or ExpiryPolicy()
        self._signers = load_signers(keys_dir)
        self._lock = threading.RLock()
        self._root: Metadata[Root]
        self._targets: Metadata[Targets]
        self._snapshot: Metadata[Snapshot]
        self._timestamp: Metadata[Timestamp]

    @classmethod
    def create(
        cls,
        repo_dir: Path,
        keys_dir: Path,
        expiry: ExpiryPolicy | None = None,
        store: ArtifactStore | None = None,
        lock: RepoLock | None = None,
    ) -> TufRepository:
        """Start a new repository: root v1 with every role's key, empty targets."""
        repo = cls(repo_dir, keys_dir, expiry, store, lock)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        now = datetime.now(timezone.utc)
        root = Root(expires=now + repo.expiry.root, consistent_snapshot=True)
        for role in ROLES:
            root.add_key(repo._signers[role].public_key, role)
        repo._root = Metadata(root)
        repo._targets = Metadata(Targets(expires=now))
        repo._snapshot = Metadata(Snapshot(expires=now))
        repo._timestamp = Metadata(Timestamp(expires=now))
        with repo._exclusive():
            # Checked under the lock: replicas starting together create it once.
            if cls.exists(repo.repo_dir, repo.store, "root.json"):
                raise ConflictError(f"a TUF repository already exists in {repo.where}")
            repo._write_root()
            repo._commit({"targets"}, now, bump=False)
        logger.info("created TUF repository in %s", repo.where)
        return repo

    @classmethod
    def open(
        cls,
        repo_dir: Path,
        keys_dir: Path,
        expiry: ExpiryPolicy | None = None,
        store: ArtifactStore | None = None,
        lock: RepoLock | None = None,
    ) -> TufRepository:
        repo = cls(repo_dir, keys_dir, expiry, store, lock)
        with repo._lock:
            repo._load()
        for role in ROLES:
            keyids = repo._root.signed.roles[role].keyids
            if repo._signers[role].public_key.keyid not in keyids:
                raise KeyStoreError(
                    f"the {role} key in {keys_dir} is not the one {repo_dir} root trusts"
                )
        return repo

    @staticmethod
    def exists(
        repo_dir: Path, store: ArtifactStore | None = None, name: str = "timestamp.json"
    ) -> bool:
        try:
            (store or LocalStore(Path(repo_dir))).read(f"metadata/{name}")
        except NotFoundError:
            return False
        return True

    @property
    def where(self) -> str:
        return self.store.describe()

    def metadata_bytes(self, name: str) -> bytes:
        """Metadata file ``name`` as stored now (NotFoundError when absent)."""
        return self.store.read(f"metadata/{name}")

    def _write_metadata(self, name: str, data: bytes) -> None:
        self.store.write(f"metadata/{name}", data)

    def _read(self, name: str) -> Metadata[Any]:
        try:
            return Metadata.from_bytes(self.metadata_bytes(name))
        except (NotFoundError, ArtifactStoreError, RepositoryError, ValueError) as err:
            raise TufRepoError(
                f"TUF metadata {name} in {self.where} is missing or unreadable: {err}"
            ) from err

    def _load(self) -> None:
        root: Metadata[Root] = self._read("root.json")
        timestamp: Metadata[Timestamp] = self._read("timestamp.json")
        snapshot: Metadata[Snapshot] = self._read(
            f"{timestamp.signed.snapshot_meta.version}.snapshot.json"
        )
        targets_meta = snapshot.signed.meta.get("targets.json")
        if targets_meta is None:
            raise TufRepoError(f"snapshot in {self.where} does not list targets.json")
        targets: Metadata[Targets] = self._read(f"{targets_meta.version}.targets.json")
        try:
            root.verify_delegate(Root.type, root)
            root.verify_delegate(Timestamp.type, timestamp)
            root.verify_delegate(Snapshot.type, snapshot)
            root.verify_delegate(Targets.type, targets)
        except RepositoryError as err:
            raise TufRepoError(f"{self.where} fails to verify: {err}") from err
        self._root, self._timestamp = root, timestamp
        self._snapshot, self._targets = snapshot, targets

    def _reload_if_changed(self) -> None:
        """Pick up a commit made by another process or replica sharing this store."""
        on_disk: Metadata[Timestamp] = self._read("timestamp.json")
        if on_disk.signed.version != self._timestamp.signed.version:
            self._load()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock, self.process_lock.hold():
            yield

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive, freshly loaded from the store, and rolled back on failure."""
        with self._exclusive():
            # Another process or replica may have committed since our last look.
            self._load()
            try:
                yield
            except BaseException as err:
                # A half-applied change must not linger in memory: the store
                # (committed at timestamp.json) is the truth.
                self._load()
                if isinstance(err, OSError | SerializationError | ArtifactStoreError):
                    raise TufRepoError(f"cannot update {self.where}: {err}") from err
                raise

    def _write_root(self) -> None:
        self._root.sign(self._signers["root"])
        data = self._root.to_bytes()
        self._write_metadata(f"{self._root.signed.version}.root.json", data)
        self._write_metadata("root.json", data)

    def _commit(self, roles: set[str], now: datetime, bump: bool = True) -> None:
        """Bump, re-sign and write ``roles`` in dependency order; timestamp last."""
        roles = with_dependents(roles)
        if "targets" in roles:
            self._bump(self._targets, "targets", now, bump)
            data = self._targets.to_bytes()
            version = self._targets.signed.version
            self._write_metadata(f"{version}.targets.json", data)
            meta = MetaFile.from_data(version, data, ["sha256"])
            self._snapshot.signed.meta["targets.json"] = meta
        if "snapshot" in roles:
            self._bump(self._snapshot, "snapshot", now, bump)
            data = self._snapshot.to_bytes()
            version = self._snapshot.signed.version
            self._write_metadata(f"{version}.snapshot.json", data)
            self._timestamp.signed.snapshot_meta = MetaFile.from_data(version, data, ["sha256"])
        if "timestamp" in roles:
            self._bump(self._timestamp, "timestamp", now, bump)
            self._write_metadata("timestamp.json", self._timestamp.to_bytes())

    def _bump(self, md: Metadata[Any], role: str, now: datetime, bump: bool) -> None:
        if bump:
            md.signed.version += 1
        md.signed.expires = now + self.expiry.lifetime(role)
        md.sign(self._signers[role])

    def _store(self, path: str, source: Source) -> tuple[Path, TargetFile]:
        """Copy ``source`` into the content-addressed store, hashing as it goes."""
        folder = self.targets_dir / path.rpartition("/")[0]
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming.", dir=folder)
        tmp = Path(tmp_name)
        digest, length = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks(source):
                    digest.update(chunk)
                    length += len(chunk)
                    out.write(chunk)
            os.chmod(tmp, 0o644)
            sha256 = digest.hexdigest()
            final = self.targets_dir / stored_name(path, sha256)
            commit_file(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.store.upload(target_key(path, sha256), final)
        return final, TargetFile(length, {"sha256": sha256}, path)

    def _drop(self, target: TargetFile) -> None:
        """Delete a replaced or revoked target's bytes from the store and the cache."""
        stored = stored_name(target.path, target.hashes["sha256"])
        self.store.delete(f"targets/{stored}")
        (self.targets_dir / stored).unlink(missing_ok=True)

    def add_target(self, path: str, source: Source, custom: dict[str, Any]) -> TargetInfo:
        return self.add_targets([(path, source, custom)])[0]

    def add_targets(self, items: Sequence[tuple[str, Source, dict[str, Any]]]) -> list[TargetInfo]:
        """Add (or replace) several targets with a single metadata bump."""
        checked = [(check_target_path(p), s, check_custom(c)) for p, s, c in items]
        if len({p for p, _, _ in checked}) != len(checked):
            raise InvalidInputError("the same target path appears twice in one batch")
        with self._mutating():
            replaced: list[TargetFile] = []
            new_files: list[TargetFile] = []
            for path, source, custom in checked:
                _, target = self._store(path, source)
                target.unrecognized_fields["custom"] = custom
                old = self._targets.signed.targets.get(path)
                if old is not None and old.hashes["sha256"] != target.hashes["sha256"]:
                    replaced.append(old)
                new_files.append(target)
            for target in new_files:
                self._targets.signed.targets[target.path] = target
            self._commit({"targets"}, datetime.now(timezone.utc))
            for stale in replaced:
                self._drop(stale)
        logger.info("published targets: %s", ", ".join(p for p, _, _ in checked))
        return [info_of(t) for t in new_files]

    def remove_target(self, path: str) -> None:
        """Revoke ``path``: devices refuse it from their next refresh on."""
        with self._mutating():
            old = self._targets.signed.targets.pop(path, None)
            if old is None:
                raise NotFoundError(f"target {path!r} is not in the repository")
            self._commit({"targets"}, datetime.now(timezone.utc))
            self._drop(old)
        logger.info("revoked target %s", path)

    def targets(self) -> dict[str, TargetInfo]:
        with self._lock:
            self._reload_if_changed()
            return {p: info_of(t) for p, t in self._targets.signed.targets.items()}

    def target_info(self, path: str) -> TargetInfo:
        with self._lock:
            self._reload_if_changed()
            target = self._targets.signed.targets.get(path)
            if target is None:
                raise NotFoundError(f"target {path!r} is not in the repository")
            return info_of(target)

    def target_file(self, path: str) -> Path:
        """A local file with the bytes of signed target ``path`` (fetched if not cached)."""
        with self._lock:
            target = self._targets.signed.targets.get(path)
            if target is None:
                raise NotFoundError(f"target {path!r} is not in the repository")
            return self.stored_file(stored_name(path, target.hashes["sha256"]))

    def stored_file(self, stored: str) -> Path:
        """The local copy of ``targets/<stored>`` (a content-addressed name), fetched on a miss."""
        local = self.targets_dir / stored
        if not local.is_file():
            self.store.download(f"targets/{stored}", local)
        return local

    def root_bytes(self) -> bytes:
        """The current root.json, byte for byte: what devices pin."""
        return self.metadata_bytes("root.json")

    def _roles(self) -> dict[str, Metadata[Any]]:
        return dict(
            zip(ROLES, (self._root, self._targets, self._snapshot, self._timestamp), strict=True)
        )

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {role: md.signed.version for role, md in self._roles().items()}

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign roles close to expiry; call periodically. Returns the roles re-signed."""
        now = now or datetime.now(timezone.utc)
        with self._mutating():
            margin = self.expiry.refresh_fraction
            due = with_dependents(
                {
                    role
                    for role, md in self._roles().items()
                    if md.signed.expires - now < self.expiry.lifetime(role) * margin
                }
            )
            if "root" in due:
                # Also bump timestamp: it is what other processes watch for changes.
                due.add("timestamp")
                self._root.signed.version += 1
                self._root.signed.expires = now + self.expiry.root
                self._write_root()
            if due - {"root"}:
                self._commit(due - {"root"}, now)
        if due:
            logger.info("re-signed TUF roles close to expiry: %s", ", ".join(sorted(due)))
        return sorted(due)

"""The server's TUF repository on disk, built with python-tuf's Metadata API.

Consistent snapshots, served as plain files under /tuf/: ``metadata/`` holds
``N.root.json``, ``root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json``; ``targets/`` holds ``<dir>/<sha256>.<basename>``.
Each change writes target bytes, then targets, snapshot and last timestamp.json,
all atomically: timestamp.json is the commit point, so a crash shows the old or
the new repository, never a mix. A thread lock plus an flock on ``.lock``
serialise publishers; state is reloaded when another process committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import SerializationError

from agent.common.atomic import atomic_write, commit_file
from agent.protocol.custom_fields import TargetInfo, decode_custom, encode_custom
from server.errors import (
    ConflictError,
    InvalidInputError,
    KeyStoreError,
    NotFoundError,
    ServerError,
)
from server.publish.keys import ROLES, load_signers

logger = logging.getLogger(__name__)

__all__ = ["ExpiryPolicy", "TargetInfo", "TufRepoError", "TufRepository"]

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_TARGET_PATH = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_COPY_CHUNK = 1024 * 1024
Source = Path | bytes


class TufRepoError(ServerError):
    """The repository on disk is missing, corrupt or not signed by our keys."""


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's signature is valid, and when to re-sign early.

    A role is re-signed by ``refresh()`` once less than ``refresh_fraction``
    of its lifetime remains, so devices never see it expire while the server
    runs. Short timestamp/snapshot lifetimes bound how long an attacker can
    freeze a device on stale metadata.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    refresh_fraction: float = 0.5

    def __post_init__(self) -> None:
        for role in ROLES:
            if self.lifetime(role) <= timedelta(0):
                raise ValueError(f"{role} expiry must be positive")
        if not 0.0 < self.refresh_fraction < 1.0:
            raise ValueError("refresh_fraction must be between 0 and 1")

    def lifetime(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value


def check_target_path(path: str) -> str:
    if not isinstance(path, str) or len(path) > 512 or not _TARGET_PATH.match(path):
        raise InvalidInputError(
            f"target path {path!r} must be relative segments of [A-Za-z0-9._-] "
            "each starting with a letter or digit"
        )
    return path


def _stored_name(path: str, sha256: str) -> str:
    dirname, sep, basename = path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


def _info(target: TargetFile) -> TargetInfo:
    custom = decode_custom(target.custom) if isinstance(target.custom, dict) else {}
    return TargetInfo(target.path, target.length, target.hashes["sha256"], custom)


def _check_custom(custom: dict[str, Any]) -> dict[str, Any]:
    """Validate and encode for signing (canonical JSON has no floats)."""
    if not isinstance(custom, dict):
        raise InvalidInputError("target custom metadata must be a JSON object")
    try:
        data: dict[str, Any] = encode_custom(custom)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"target custom metadata is not plain JSON: {err}") from err
    return data


class TufRepository:
    """A signed TUF repository; use ``create()`` or ``open()``."""

    def __init__(self, repo_dir: Path, keys_dir: Path, expiry: ExpiryPolicy | None) -> None:
        self.repo_dir = Path(repo_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self.expiry = expiry or ExpiryPolicy()
        self._signers = load_signers(keys_dir)
        self._lock = threading.RLock()
        self._root: Metadata[Root]
        self._targets: Metadata[Targets]
        self._snapshot: Metadata[Snapshot]
        self._timestamp: Metadata[Timestamp]

    @classmethod
    def create(
        cls, repo_dir: Path, keys_dir: Path, expiry: ExpiryPolicy | None = None
    ) -> TufRepository:
        """Start a new repository: root v1 with every role's key, empty targets."""
        repo = cls(repo_dir, keys_dir, expiry)
        if (repo.metadata_dir / "root.json").exists():
            raise ConflictError(f"a TUF repository already exists in {repo.repo_dir}")
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
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
            repo._write_root()
            repo._commit({"targets"}, now, bump=False)
        logger.info("created TUF repository in %s", repo.repo_dir)
        return repo

    @classmethod
    def open(
        cls, repo_dir: Path, keys_dir: Path, expiry: ExpiryPolicy | None = None
    ) -> TufRepository:
        repo = cls(repo_dir, keys_dir, expiry)
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
    def exists(repo_dir: Path) -> bool:
        return (Path(repo_dir) / "metadata" / "timestamp.json").is_file()

    def _read(self, name: str) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except (OSError, RepositoryError, ValueError) as err:
            raise TufRepoError(f"TUF metadata {path} is missing or unreadable: {err}") from err

    def _load(self) -> None:
        root: Metadata[Root] = self._read("root.json")
        timestamp: Metadata[Timestamp] = self._read("timestamp.json")
        snapshot: Metadata[Snapshot] = self._read(
            f"{timestamp.signed.snapshot_meta.version}.snapshot.json"
        )
        targets_meta = snapshot.signed.meta.get("targets.json")
        if targets_meta is None:
            raise TufRepoError(f"snapshot in {self.metadata_dir} does not list targets.json")
        targets: Metadata[Targets] = self._read(f"{targets_meta.version}.targets.json")
        try:
            root.verify_delegate(Root.type, root)
            root.verify_delegate(Timestamp.type, timestamp)
            root.verify_delegate(Snapshot.type, snapshot)
            root.verify_delegate(Targets.type, targets)
        except RepositoryError as err:
            raise TufRepoError(f"{self.metadata_dir} fails to verify: {err}") from err
        self._root, self._timestamp = root, timestamp
        self._snapshot, self._targets = snapshot, targets

    def _reload_if_changed(self) -> None:
        """Pick up a commit made by another process sharing this directory."""
        on_disk: Metadata[Timestamp] = self._read("timestamp.json")
        if on_disk.signed.version != self._timestamp.signed.version:
            self._load()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock, open(self.repo_dir / ".lock", "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive, up to date, and rolled back to the disk state on failure."""
        with self._exclusive():
            self._reload_if_changed()
            try:
                yield
            except BaseException as err:
                # A half-applied change must not linger in memory: the disk
                # (committed at timestamp.json) is the truth.
                self._load()
                if isinstance(err, OSError | SerializationError):
                    raise TufRepoError(f"cannot update {self.repo_dir}: {err}") from err
                raise

    def _write_root(self) -> None:
        self._root.sign(self._signers["root"])
        data = self._root.to_bytes()
        atomic_write(self.metadata_dir / f"{self._root.signed.version}.root.json", data)
        atomic_write(self.metadata_dir / "root.json", data)

    def _commit(self, roles: set[str], now: datetime, bump: bool = True) -> None:
        """Bump, re-sign and write ``roles`` in dependency order; timestamp last."""
        roles = _with_dependents(roles)
        if "targets" in roles:
            self._bump(self._targets, "targets", now, bump)
            data = self._targets.to_bytes()
            version = self._targets.signed.version
            atomic_write(self.metadata_dir / f"{version}.targets.json", data)
            meta = MetaFile.from_data(version, data, ["sha256"])
            self._snapshot.signed.meta["targets.json"] = meta
        if "snapshot" in roles:
            self._bump(self._snapshot, "snapshot", now, bump)
            data = self._snapshot.to_bytes()
            version = self._snapshot.signed.version
            atomic_write(self.metadata_dir / f"{version}.snapshot.json", data)
            self._timestamp.signed.snapshot_meta = MetaFile.from_data(version, data, ["sha256"])
        if "timestamp" in roles:
            self._bump(self._timestamp, "timestamp", now, bump)
            atomic_write(self.metadata_dir / "timestamp.json", self._timestamp.to_bytes())

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
                for chunk in _chunks(source):
                    digest.update(chunk)
                    length += len(chunk)
                    out.write(chunk)
            os.chmod(tmp, 0o644)
            sha256 = digest.hexdigest()
            final = self.targets_dir / _stored_name(path, sha256)
            commit_file(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final, TargetFile(length, {"sha256": sha256}, path)

    def add_target(self, path: str, source: Source, custom: dict[str, Any]) -> TargetInfo:
        return self.add_targets([(path, source, custom)])[0]

    def add_targets(self, items: Sequence[tuple[str, Source, dict[str, Any]]]) -> list[TargetInfo]:
        """Add (or replace) several targets with a single metadata bump."""
        checked = [(check_target_path(p), s, _check_custom(c)) for p, s, c in items]
        if len({p for p, _, _ in checked}) != len(checked):
            raise InvalidInputError("the same target path appears twice in one batch")
        with self._mutating():
            replaced: list[Path] = []
            new_files: list[TargetFile] = []
            for path, source, custom in checked:
                stored, target = self._store(path, source)
                target.unrecognized_fields["custom"] = custom
                old = self._targets.signed.targets.get(path)
                if old is not None and self.target_file(path) != stored:
                    replaced.append(self.target_file(path))
                new_files.append(target)
            for target in new_files:
                self._targets.signed.targets[target.path] = target
            self._commit({"targets"}, datetime.now(timezone.utc))
            for stale in replaced:
                stale.unlink(missing_ok=True)
        logger.info("published targets: %s", ", ".join(p for p, _, _ in checked))
        return [_info(t) for t in new_files]

    def remove_target(self, path: str) -> None:
        """Revoke ``path``: devices refuse it from their next refresh on."""
        with self._mutating():
            if path not in self._targets.signed.targets:
                raise NotFoundError(f"target {path!r} is not in the repository")
            stored = self.target_file(path)
            del self._targets.signed.targets[path]
            self._commit({"targets"}, datetime.now(timezone.utc))
            stored.unlink(missing_ok=True)
        logger.info("revoked target %s", path)

    def targets(self) -> dict[str, TargetInfo]:
        with self._lock:
            self._reload_if_changed()
            return {p: _info(t) for p, t in self._targets.signed.targets.items()}

    def target_info(self, path: str) -> TargetInfo:
        with self._lock:
            self._reload_if_changed()
            target = self._targets.signed.targets.get(path)
            if target is None:
                raise NotFoundError(f"target {path!r} is not in the repository")
            return _info(target)

    def target_file(self, path: str) -> Path:
        """Where the stored bytes of signed target ``path`` live."""
        with self._lock:
            target = self._targets.signed.targets.get(path)
            if target is None:
                raise NotFoundError(f"target {path!r} is not in the repository")
            return self.targets_dir / _stored_name(path, target.hashes["sha256"])

    def root_bytes(self) -> bytes:
        """The current root.json, byte for byte: what devices pin."""
        with self._lock:
            return (self.metadata_dir / "root.json").read_bytes()

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
            due = _with_dependents(
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


def _with_dependents(roles: set[str]) -> set[str]:
    """A new targets needs a new snapshot, which needs a new timestamp."""
    roles = set(roles)
    if "targets" in roles:
        roles.add("snapshot")
    if "snapshot" in roles:
        roles.add("timestamp")
    return roles


def _chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    try:
        with open(source, "rb") as handle:
            while chunk := handle.read(_COPY_CHUNK):
                yield chunk
    except OSError as err:
        raise InvalidInputError(f"cannot read target source {source}: {err}") from err

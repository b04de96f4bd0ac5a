"""server.publish.tuf_repo: the signed repository on disk, checked with python-tuf's own API."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata

from server.errors import ConflictError, InvalidInputError, KeyStoreError, NotFoundError
from server.publish.keys import init_keys
from server.publish.tuf_repo import ExpiryPolicy, TufRepoError, TufRepository

MODEL = Path(__file__).parent / "fixtures" / "digits_int8_r1.tflite"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def repo(tmp_path: Path, keys: Path) -> TufRepository:
    return TufRepository.create(tmp_path / "repo", keys)


def _md(repo: TufRepository, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def test_create_writes_signed_consistent_snapshot_layout(repo: TufRepository) -> None:
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "root.json",
        "timestamp.json",
    ]
    root = _md(repo, "root.json")
    assert root.signed.consistent_snapshot is True
    assert repo.root_bytes() == (repo.metadata_dir / "1.root.json").read_bytes()
    root.verify_delegate("root", root)
    for role, name in [
        ("targets", "1.targets.json"),
        ("snapshot", "1.snapshot.json"),
        ("timestamp", "timestamp.json"),
    ]:
        root.verify_delegate(role, _md(repo, name))
    assert repo.targets() == {}
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    now = datetime.now(timezone.utc)
    ts_left = _md(repo, "timestamp.json").signed.expires - now
    assert timedelta(hours=23) < ts_left <= timedelta(days=1)
    assert timedelta(days=364) < root.signed.expires - now <= timedelta(days=365)


def test_create_twice_is_a_conflict(repo: TufRepository, keys: Path) -> None:
    with pytest.raises(ConflictError, match="already exists"):
        TufRepository.create(repo.repo_dir, keys)


def test_add_target_stores_content_addressed_and_bumps_versions(repo: TufRepository) -> None:
    custom = {"kind": "model", "scale": 0.003921568859368563, "zero": 0.0, "n": [1, 2.5]}
    info = repo.add_target("models/d/1/int8-cpu.tflite", MODEL, custom)
    data = MODEL.read_bytes()
    assert info.length == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.custom == custom  # floats survive canonical JSON exactly
    stored = repo.targets_dir / "models/d/1" / f"{info.sha256}.int8-cpu.tflite"
    assert repo.target_file(info.path) == stored
    assert stored.read_bytes() == data
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    signed = _md(repo, "2.targets.json")
    _md(repo, "root.json").verify_delegate("targets", signed)
    assert signed.signed.targets[info.path].hashes == {"sha256": info.sha256}
    assert _md(repo, "timestamp.json").signed.snapshot_meta.version == 2
    assert repo.targets() == {info.path: info}


def test_batch_is_one_metadata_bump(repo: TufRepository) -> None:
    infos = repo.add_targets([("a/x.bin", b"one", {}), ("b/y.bin", b"two", {"k": "v"})])
    assert [i.path for i in infos] == ["a/x.bin", "b/y.bin"]
    assert repo.versions()["targets"] == 2
    assert set(repo.targets()) == {"a/x.bin", "b/y.bin"}
    with pytest.raises(InvalidInputError, match="twice"):
        repo.add_targets([("a/z", b"1", {}), ("a/z", b"2", {})])


def test_replacing_a_target_removes_the_old_bytes(repo: TufRepository) -> None:
    old = repo.target_file(repo.add_target("a/x.bin", b"old", {}).path)
    new_info = repo.add_target("a/x.bin", b"new", {})
    assert not old.exists()
    assert repo.target_file("a/x.bin").read_bytes() == b"new"
    assert repo.targets()["a/x.bin"] == new_info


def test_remove_target_revokes_and_deletes(repo: TufRepository) -> None:
    repo.add_target("a/x.bin", b"payload", {})
    stored = repo.target_file("a/x.bin")
    repo.remove_target("a/x.bin")
    assert "a/x.bin" not in repo.targets()
    assert not stored.exists()
    assert repo.versions()["targets"] == 3
    with pytest.raises(NotFoundError):
        repo.remove_target("a/x.bin")
    with pytest.raises(NotFoundError):
        repo.target_file("a/x.bin")


@pytest.mark.parametrize(
    "path", ["", "/abs/x", "../x", "a/../b", "a//b", ".hidden", "a/.b", "a b", "a\\b", "a/"]
)
def test_unsafe_target_paths_are_refused(repo: TufRepository, path: str) -> None:
    with pytest.raises(InvalidInputError, match="target path"):
        repo.add_target(path, b"x", {})
    assert repo.versions()["targets"] == 1


@pytest.mark.parametrize("custom", [{"x": {1, 2}}, {"x": float("nan")}, {1: "a"}, ["list"]])
def test_custom_must_be_plain_json(repo: TufRepository, custom: object) -> None:
    with pytest.raises(InvalidInputError, match="custom metadata"):
        repo.add_target("a/x.bin", b"x", custom)  # type: ignore[arg-type]


def test_missing_source_file_leaves_repo_unchanged(repo: TufRepository, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read target source"):
        repo.add_target("a/x.bin", tmp_path / "missing.bin", {})
    assert repo.targets() == {} and repo.versions()["targets"] == 1
    assert not any(p.is_file() for p in repo.targets_dir.rglob("*"))


def test_open_sees_state_and_requires_the_same_keys(
    repo: TufRepository, keys: Path, tmp_path: Path
) -> None:
    info = repo.add_target("a/x.bin", b"payload", {"v": 1.5})
    reopened = TufRepository.open(repo.repo_dir, keys)
    assert reopened.targets() == {"a/x.bin": info}
    assert reopened.root_bytes() == repo.root_bytes()
    other = tmp_path / "other-keys"
    init_keys(other)
    with pytest.raises(KeyStoreError, match="not the one"):
        TufRepository.open(repo.repo_dir, other)


def test_open_refuses_missing_or_tampered_metadata(repo: TufRepository, keys: Path) -> None:
    with pytest.raises(TufRepoError, match="missing"):
        TufRepository.open(repo.repo_dir / "nothing", keys)
    path = repo.metadata_dir / "1.targets.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["targets"]["evil"] = {"length": 1, "hashes": {"sha256": "00" * 32}}
    path.write_text(json.dumps(doc))
    with pytest.raises(TufRepoError, match="fails to verify"):
        TufRepository.open(repo.repo_dir, keys)


def test_two_instances_on_one_directory_do_not_lose_publishes(
    repo: TufRepository, keys: Path
) -> None:
    other = TufRepository.open(repo.repo_dir, keys)
    repo.add_target("a/one.bin", b"1", {})
    other.add_target("a/two.bin", b"2", {})
    assert set(repo.targets()) == {"a/one.bin", "a/two.bin"}
    assert repo.versions() == other.versions()


def test_refresh_resigns_only_what_is_near_expiry(repo: TufRepository, keys: Path) -> None:
    now = datetime.now(timezone.utc)
    assert repo.refresh(now) == []
    assert repo.refresh(now + timedelta(hours=13)) == ["timestamp"]
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 2}
    assert repo.refresh(now + timedelta(days=4)) == ["snapshot", "timestamp"]
    assert repo.refresh(now + timedelta(days=50)) == ["snapshot", "targets", "timestamp"]
    assert repo.refresh(now + timedelta(days=200)) == ["root", "snapshot", "targets", "timestamp"]
    assert repo.versions() == {"root": 2, "targets": 3, "snapshot": 4, "timestamp": 5}
    root2 = _md(repo, "2.root.json")
    _md(repo, "1.root.json").verify_delegate("root", root2)  # chained from v1
    assert repo.root_bytes() == (repo.metadata_dir / "2.root.json").read_bytes()
    assert TufRepository.open(repo.repo_dir, keys).versions() == repo.versions()


def test_expiry_policy_validation() -> None:
    with pytest.raises(ValueError, match="timestamp expiry"):
        ExpiryPolicy(timestamp=timedelta(0))
    with pytest.raises(ValueError, match="refresh_fraction"):
        ExpiryPolicy(refresh_fraction=1.0)
    policy = ExpiryPolicy(targets=timedelta(days=10))
    assert policy.lifetime("targets") == timedelta(days=10)

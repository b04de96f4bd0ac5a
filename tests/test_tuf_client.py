"""Server repository -> real HTTP on 127.0.0.1 -> agent TrustClient + downloader.

The attacks are written the way an attacker would: by rewriting files the
server serves, signed with a key that is wrong, or right but expired.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf_sim import RepoServer, resign

from agent.common.errors import VerificationError
from agent.protocol.custom_fields import TargetInfo
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import ModelManifest, model_target_path
from agent.update.download import DownloadLimits, download, target_url
from agent.update.trust import TrustClient, TrustUnavailableError, verify_file
from server.publish.keys import init_keys, load_signers
from server.publish.registry import check_golden, load_labels, publish_model
from server.publish.tuf_repo import TufRepository

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "digits_int8_r1.tflite"
TARGET = model_target_path("digits", 1, "int8-cpu")
FAST = DownloadLimits(retries=1, backoff_base_s=0.01, timeout_s=5)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def repo(tmp_path: Path, keys: Path) -> TufRepository:
    repo = TufRepository.create(tmp_path / "repo", keys)
    publish_model(
        repo, MODEL, "digits", 1, "int8-cpu", load_labels(FIXTURES / "digits_labels.txt"),
        input_options=ContractOptions(value_range=(0.0, 1.0)),
    )  # fmt: skip
    return repo


@pytest.fixture
def server(repo: TufRepository) -> Iterator[RepoServer]:
    with RepoServer(repo.repo_dir) as srv:
        yield srv


def _client(tmp_path: Path, srv: RepoServer, root: bytes | None) -> TrustClient:
    return TrustClient(tmp_path / "device" / "tuf", srv.url, root)


def _fetch(srv: RepoServer, info: TargetInfo, dest: Path) -> None:
    url = target_url(srv.url, info.path, info.sha256)
    download(url, dest, info.length, info.sha256, FAST)


def test_publish_refresh_download_verify(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    client = _client(tmp_path, server, repo.root_bytes())
    client.refresh()
    info = client.target_info(TARGET)
    assert info.length == MODEL.stat().st_size
    manifest = ModelManifest.from_custom(info.custom)
    assert (manifest.name, manifest.release, manifest.variant) == ("digits", 1, "int8-cpu")
    assert manifest.sha256 == info.sha256 and manifest.labels == tuple("0123456789")
    assert manifest.inputs[0].scale == repo.targets()[TARGET].custom["inputs"][0]["scale"]
    dest = tmp_path / "device" / "model.tflite"
    _fetch(server, info, dest)
    client.verify_file(info, dest)
    assert dest.read_bytes() == MODEL.read_bytes()
    check_golden(dest, manifest)  # the smoke test the device will run passes
    # Metadata requests follow the consistent-snapshot names.
    paths = [h.path for h in server.hits]
    assert "/tuf/metadata/timestamp.json" in paths and "/tuf/metadata/2.targets.json" in paths


def test_cached_root_is_trusted_without_a_pin(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    _client(tmp_path, server, repo.root_bytes()).refresh()
    assert (
        _client(tmp_path, server, None).target_info(TARGET).sha256 == repo.targets()[TARGET].sha256
    )


def test_no_pin_and_no_cache_is_refused(tmp_path: Path, server: RepoServer) -> None:
    with pytest.raises(VerificationError, match="no pinned root"):
        _client(tmp_path, server, None).refresh()


@pytest.mark.parametrize("root", [b"", b"garbage", b'{"signed": {}, "signatures": []}'])
def test_garbage_pinned_root_is_refused(tmp_path: Path, server: RepoServer, root: bytes) -> None:
    with pytest.raises(VerificationError, match="pinned root is invalid"):
        _client(tmp_path, server, root).refresh()


def test_bit_flipped_target_is_refused(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    stored = repo.target_file(TARGET)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    client = _client(tmp_path, server, repo.root_bytes())
    info = client.target_info(TARGET)
    dest = tmp_path / "device" / "model.tflite"
    with pytest.raises(VerificationError, match="sha256"):
        _fetch(server, info, dest)
    assert not dest.exists() and not dest.with_name("model.tflite.part").exists()
    # The same bytes reaching disk another way are refused by verify_file too.
    dest.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="does not match signed"):
        verify_file(info, dest)
    dest.write_bytes(bytes(data[:-1]))
    with pytest.raises(VerificationError, match="signed length"):
        verify_file(info, dest)


def test_timestamp_signed_with_wrong_key_is_refused(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    attacker = CryptoSigner.generate_ed25519()

    def bump(md: Metadata[Any]) -> None:
        md.signed.version += 1

    resign(repo.metadata_dir / "timestamp.json", attacker, bump)
    with pytest.raises(VerificationError, match="UnsignedMetadataError"):
        _client(tmp_path, server, repo.root_bytes()).refresh()


def test_targets_signed_with_wrong_key_is_refused(
    tmp_path: Path, repo: TufRepository, keys: Path, server: RepoServer
) -> None:
    """An attacker holding snapshot+timestamp keys still cannot add a target."""
    md_dir, legit = repo.metadata_dir, load_signers(keys)
    evil = md_dir / "3.targets.json"
    shutil.copy(md_dir / "2.targets.json", evil)

    def add_evil(md: Metadata[Any]) -> None:
        md.signed.version = 3
        md.signed.targets["evil.bin"] = TargetFile.from_data("evil.bin", b"evil")

    data = resign(evil, CryptoSigner.generate_ed25519(), add_evil)
    shutil.copy(md_dir / "2.snapshot.json", md_dir / "3.snapshot.json")

    def point_at_evil(md: Metadata[Any]) -> None:
        md.signed.version = 3
        md.signed.meta["targets.json"] = MetaFile.from_data(3, data, ["sha256"])

    snap = resign(md_dir / "3.snapshot.json", legit["snapshot"], point_at_evil)

    def point_at_snapshot(md: Metadata[Any]) -> None:
        md.signed.version += 1
        md.signed.snapshot_meta = MetaFile.from_data(3, snap, ["sha256"])

    resign(md_dir / "timestamp.json", legit["timestamp"], point_at_snapshot)
    client = _client(tmp_path, server, repo.root_bytes())
    with pytest.raises(VerificationError, match="targets"):
        client.target_info("evil.bin")


def test_expired_timestamp_is_refused(
    tmp_path: Path, repo: TufRepository, keys: Path, server: RepoServer
) -> None:
    def expire(md: Metadata[Any]) -> None:
        md.signed.version += 1
        md.signed.expires = datetime.now(timezone.utc) - timedelta(hours=1)

    resign(repo.metadata_dir / "timestamp.json", load_signers(keys)["timestamp"], expire)
    with pytest.raises(VerificationError, match="ExpiredMetadataError"):
        _client(tmp_path, server, repo.root_bytes()).refresh()


def test_revoked_target_is_refused(tmp_path: Path, repo: TufRepository, server: RepoServer) -> None:
    client = _client(tmp_path, server, repo.root_bytes())
    assert client.target_info(TARGET).path == TARGET
    repo.remove_target(TARGET)
    client.refresh()
    with pytest.raises(VerificationError, match="not a signed target"):
        client.target_info(TARGET)
    with pytest.raises(VerificationError, match="not a signed target"):
        client.target_info("models/digits/9/int8-cpu.tflite")


def test_rollback_to_older_metadata_is_refused(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.remove_target(TARGET)
    _client(tmp_path, server, repo.root_bytes()).refresh()  # the device saw version 3
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)  # replay version 2
    with pytest.raises(VerificationError, match="BadVersionNumberError"):
        _client(tmp_path, server, repo.root_bytes()).refresh()


def test_rotated_root_is_followed_from_the_pinned_one(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    pinned = repo.root_bytes()
    assert "root" in repo.refresh(datetime.now(timezone.utc) + timedelta(days=300))
    client = _client(tmp_path, server, pinned)
    assert client.target_info(TARGET).sha256 == repo.targets()[TARGET].sha256
    assert (tmp_path / "device" / "tuf" / "root_history" / "2.root.json").exists()


def test_unreachable_server_is_transient(tmp_path: Path, repo: TufRepository) -> None:
    with RepoServer(repo.repo_dir) as srv:
        url = srv.url
    client = TrustClient(tmp_path / "tuf", url, repo.root_bytes())
    with pytest.raises(TrustUnavailableError):
        client.refresh()


def test_metadata_over_length_limit_is_refused(
    tmp_path: Path, repo: TufRepository, server: RepoServer
) -> None:
    from agent.update.trust import TrustLimits  # noqa: PLC0415

    client = TrustClient(
        tmp_path / "tuf", server.url, repo.root_bytes(), limits=TrustLimits(timestamp_max_length=64)
    )
    with pytest.raises(VerificationError, match="length limit"):
        client.refresh()

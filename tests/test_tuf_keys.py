"""server.publish.keys: Ed25519 role keys on disk, private to their owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from server.errors import KeyStoreError
from server.publish.keys import ROLES, init_keys, key_path, load_signers


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_private_keys_and_load_matches(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keyids = init_keys(keys)
    assert set(keyids) == set(ROLES)
    assert len(set(keyids.values())) == 4  # one distinct key per role
    assert _mode(keys) == 0o700
    for role in ROLES:
        path = key_path(keys, role)
        assert _mode(path) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    signers = load_signers(keys)
    assert {r: s.public_key.keyid for r, s in signers.items()} == keyids
    assert sorted(p.name for p in keys.iterdir()) == sorted(f"{r}.pem" for r in ROLES)


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = init_keys(tmp_path)
    before = key_path(tmp_path, "root").read_bytes()
    with pytest.raises(KeyStoreError, match="already holds keys"):
        init_keys(tmp_path)
    assert key_path(tmp_path, "root").read_bytes() == before
    second = init_keys(tmp_path, force=True)
    assert second["root"] != first["root"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    init_keys(tmp_path)
    os.chmod(key_path(tmp_path, "targets"), mode)
    with pytest.raises(KeyStoreError, match=r"targets\.pem has unsafe permissions"):
        load_signers(tmp_path)


def test_group_writable_key_dir_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    os.chmod(keys, 0o770)  # noqa: S103 - the unsafe mode under test
    with pytest.raises(KeyStoreError, match=r"key directory .* unsafe permissions"):
        load_signers(keys)


def test_missing_directory_and_missing_key(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="does not exist"):
        load_signers(tmp_path / "nope")
    init_keys(tmp_path)
    key_path(tmp_path, "snapshot").unlink()
    with pytest.raises(KeyStoreError, match=r"snapshot\.pem does not exist"):
        load_signers(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_garbage_key_is_refused(tmp_path: Path, content: bytes) -> None:
    init_keys(tmp_path)
    path = key_path(tmp_path, "timestamp")
    path.write_bytes(content)
    with pytest.raises(KeyStoreError, match="not an unencrypted PKCS#8 PEM"):
        load_signers(tmp_path)


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    key_path(tmp_path, "root").write_bytes(pem)
    with pytest.raises(KeyStoreError, match="not Ed25519"):
        load_signers(tmp_path)


def test_unknown_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="unknown TUF role"):
        key_path(tmp_path, "director")

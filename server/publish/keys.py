"""The TUF signing keys on disk: one Ed25519 PKCS#8 PEM file per top-level role.

Keys are private to the server user: files 0600 in a 0700 directory. Loading
refuses any key file that group or others can access, the way ssh refuses a
world-readable identity, because a leaked targets key lets anyone sign models.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

# securesystemslib re-exports without __all__, which mypy --strict cannot see.
from securesystemslib.signer import CryptoSigner

from agent.common.atomic import atomic_write
from server.errors import KeyStoreError

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
_MAX_KEY_FILE = 16 * 1024  # an Ed25519 PEM is ~120 bytes; anything huge is not a key


def key_path(keys_dir: Path, role: str) -> Path:
    if role not in ROLES:
        raise KeyStoreError(f"unknown TUF role {role!r}; expected one of {', '.join(ROLES)}")
    return Path(keys_dir) / f"{role}.pem"


def _keyid(private_key: Ed25519PrivateKey) -> str:
    return str(CryptoSigner(private_key).public_key.keyid)


def init_keys(keys_dir: Path, force: bool = False) -> dict[str, str]:
    """Generate one Ed25519 key per role; return ``{role: keyid}``.

    Refuses to replace existing keys unless ``force``: overwriting the root
    key orphans every device that pinned the old root.
    """
    keys_dir = Path(keys_dir)
    existing = [key_path(keys_dir, r) for r in ROLES if key_path(keys_dir, r).exists()]
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise KeyStoreError(f"{keys_dir} already holds keys ({names}); pass force to replace them")
    try:
        keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(keys_dir, KEY_DIR_MODE)
    except OSError as err:
        raise KeyStoreError(f"cannot create key directory {keys_dir}: {err}") from err
    keyids: dict[str, str] = {}
    for role in ROLES:
        private_key = Ed25519PrivateKey.generate()
        pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        try:
            atomic_write(key_path(keys_dir, role), pem, mode=KEY_FILE_MODE)
        except OSError as err:
            raise KeyStoreError(f"cannot write {role} key in {keys_dir}: {err}") from err
        keyids[role] = _keyid(private_key)
    logger.info("wrote TUF keys for %s in %s", ", ".join(ROLES), keys_dir)
    return keyids


def _check_private(path: Path, what: str, forbidden: int) -> os.stat_result:
    try:
        info = path.stat()
    except FileNotFoundError as err:
        raise KeyStoreError(f"{what} {path} does not exist (run `edgefleet keys init`)") from err
    except OSError as err:
        raise KeyStoreError(f"cannot stat {what} {path}: {err}") from err
    mode = stat.S_IMODE(info.st_mode)
    if mode & forbidden:
        raise KeyStoreError(
            f"{what} {path} has unsafe permissions {mode:04o}: group/other must have no "
            f"access (chmod {'0600' if what == 'key file' else '0700'} {path})"
        )
    return info


def load_signer(keys_dir: Path, role: str) -> CryptoSigner:
    path = key_path(keys_dir, role)
    info = _check_private(path, "key file", 0o077)
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_KEY_FILE:
        raise KeyStoreError(f"key file {path} is not a regular PEM file")
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise KeyStoreError(f"key file {path} is not an unencrypted PKCS#8 PEM key") from err
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyStoreError(f"key file {path} holds a {type(private_key).__name__}, not Ed25519")
    return CryptoSigner(private_key)


def load_signers(keys_dir: Path) -> dict[str, CryptoSigner]:
    """Load every role's signer, refusing keys that group or others can read."""
    keys_dir = Path(keys_dir)
    if not keys_dir.is_dir():
        raise KeyStoreError(f"key directory {keys_dir} does not exist (run `edgefleet keys init`)")
    # A group/other-writable directory lets someone swap a key file in.
    _check_private(keys_dir, "key directory", 0o022)
    return {role: load_signer(keys_dir, role) for role in ROLES}


def check_keys_dir(keys_dir: Path) -> dict[str, str]:
    """Check a key directory an operator named (``--keys``); return ``{role: keyid}``.

    Unlike the server's own ``DATA/keys``, a named directory is never filled in:
    a missing role means the wrong directory, and new keys there would sign
    metadata that no provisioned device trusts.
    """
    keys_dir = Path(keys_dir)
    if keys_dir.is_dir():
        missing = [r for r in ROLES if not key_path(keys_dir, r).exists()]
        if missing:
            names = ", ".join(f"{r} ({r}.pem)" for r in missing)
            raise KeyStoreError(
                f"key directory {keys_dir} lacks the {names} key; make all four with "
                f"`edgefleet keys init {keys_dir}`"
            )
    return {role: str(signer.public_key.keyid) for role, signer in load_signers(keys_dir).items()}

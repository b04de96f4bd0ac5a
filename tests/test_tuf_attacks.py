"""TUF attacks on a real agent, made by a tampering proxy in front of a real fleet server.

Each test enrolls a fresh agent through ``tuf_proxy.TamperingProxy`` and lets it
install release 1 through the transparent proxy. The repository then moves on
(a new signed version, as any publish makes), the device is assigned release
2, and the proxy attacks the update. Each test asserts that the attack is
refused with the right error, reported to the server as a failed update, and
that the device still runs the verified release 1 (installed release, the
active file's sha256, inferences still counted). Finally the proxy turns
transparent again and the same device installs release 2: the attack, and
nothing else, is what stopped it.

Attacks are built from the server's own repository and keys wherever an
attacker could have them (replayed genuine files), from a freshly generated
key where they could not.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Operator, enroll_agent
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root
from tuf_proxy import Hit, TamperingProxy, endless, flip_byte, replay, rewrite_metadata
from waiting import wait_for

from agent.daemon import Agent
from agent.protocol.manifest import model_target_path
from agent.update.trust import TrustLimits, file_sha256
from server.app import ServerHandle
from server.publish.tuf_repo import ExpiryPolicy

META = "/tuf/metadata/"
# Release 2's full file and its delta from release 1: an attack must hold for both.
R2_TARGETS = r"/tuf/targets/(models|deltas)/digits/2/.*"
FAST_UPDATE = "download_retries = 1\ndownload_backoff_s = 0.01\n"


@dataclass(frozen=True)
class Releases:
    r1: dict[str, Any]
    r2: dict[str, Any]
    old_versions: dict[str, int]  # the repository's versions when only release 1 was out
    old_timestamp: bytes


@pytest.fixture(scope="module")
def releases(module_server: ServerHandle) -> Releases:
    op = Operator(module_server.url, module_server.operator_token)
    r1 = op.publish(1)
    old_versions = module_server.repo.versions()
    old_timestamp = (module_server.repo.metadata_dir / "timestamp.json").read_bytes()
    r2 = op.publish(2)
    assert [d["base_release"] for d in r2["deltas"]] == [1]  # so attacks must cover deltas too
    return Releases(r1, r2, old_versions, old_timestamp)


@dataclass
class Device:
    agent: Agent
    proxy: TamperingProxy
    op: Operator
    server: ServerHandle
    releases: Releases

    @property
    def device_id(self) -> str:
        return self.agent.identity.device_id

    def new_repo_version(self) -> dict[str, int]:
        """A new signed repository version (targets, snapshot, timestamp), as a publish makes:
        the device must fetch fresh snapshot and targets metadata at its next update."""
        self.server.repo.add_target(f"attack/{secrets.token_hex(6)}.bin", b"filler", {})
        return self.server.repo.versions()

    def attacked_update(self) -> str:
        """Assign release 2 and check in under attack; the refusal reason."""
        self.op.assign(2, device=self.device_id)
        inferences = self.agent.worker.total_inferences
        assert self.agent.checkin_once() is False, "the attacked update was committed"
        reason = self.agent.updater.record.reason
        assert reason, "the update failed without a reason"
        self.assert_runs_release_1(inferences)
        self.assert_reported(reason)
        return reason

    def assert_runs_release_1(self, inferences_before: int) -> None:
        installed = self.agent.updater.installed()
        assert installed is not None
        assert (installed.release, installed.sha256) == (1, self.releases.r1["sha256"])
        slot = self.agent.slots.active()
        assert slot == installed.slot
        _, sha256 = file_sha256(self.agent.slots.model_path(slot))
        assert sha256 == self.releases.r1["sha256"]
        wait_for(
            "inferences on release 1 after the attack",
            lambda: self.agent.worker.total_inferences > inferences_before + 3,
        )

    def assert_reported(self, reason: str) -> None:
        """The server hears of the failed update, with the reason."""
        self.agent.flush_events()
        events = self.op.device(self.device_id)["events"]
        failed = [
            e
            for e in events
            if (e["type"], e["state"]) == ("update", "idle") and e["detail"].get("reason") == reason
        ]
        assert failed, f"no failed update event with {reason!r} in {events}"

    def update_once_honest(self) -> None:
        """The control: with the proxy transparent again, release 2 installs."""
        self.proxy.clear()
        assert self.agent.checkin_once() is True, self.agent.updater.record.reason
        installed = self.agent.updater.installed()
        assert installed is not None and installed.release == 2
        _, sha256 = file_sha256(self.agent.slots.model_path(installed.slot))
        assert sha256 == self.releases.r2["sha256"]


@pytest.fixture
def device(module_server: ServerHandle, releases: Releases, tmp_path: Path) -> Iterator[Device]:
    op = Operator(module_server.url, module_server.operator_token)
    with TamperingProxy(module_server.url) as proxy:
        agent = enroll_agent(
            proxy.url,
            module_server.config.enrollment_tokens[0],
            root_json=module_server.repo.metadata_dir / "1.root.json",
            work=tmp_path / f"cam-{secrets.token_hex(4)}",  # its own hardware id
            tags=(f"attack={tmp_path.name}",),
            extra=FAST_UPDATE,
        )
        agent.start()
        try:
            op.assign(1, device=agent.identity.device_id)
            assert agent.checkin_once() is True, agent.updater.record.reason
            yield Device(agent, proxy, op, module_server, releases)
        finally:
            agent.stop()


def test_rollback_to_older_signed_metadata_is_refused(device: Device) -> None:
    """A genuine timestamp from before release 2, replayed after the device saw newer ones."""
    old = json.loads(device.releases.old_timestamp)["signed"]["version"]
    device.new_repo_version()
    device.proxy.on(META + "timestamp.json", replay(device.releases.old_timestamp))
    reason = device.attacked_update()
    assert "BadVersionNumberError" in reason and f"version {old}" in reason
    assert device.proxy.tampered()
    device.update_once_honest()


def test_freeze_on_an_expired_timestamp_is_refused(device: Device) -> None:
    """A genuine, newer timestamp whose signature has expired: the device will not be frozen."""
    repo = device.server.repo
    policy = repo.expiry
    # The repository's expiry seam: a lifetime below TUF's one-second resolution signs
    # a timestamp that is already expired, so nothing has to wait for it.
    repo.expiry = ExpiryPolicy(timestamp=timedelta(microseconds=1))
    try:
        device.new_repo_version()
        stale = (repo.metadata_dir / "timestamp.json").read_bytes()
    finally:
        repo.expiry = policy
        assert "timestamp" in repo.refresh()  # the honest server re-signs at once
    expires = Metadata.from_bytes(stale).signed.expires
    assert expires <= datetime.now(timezone.utc)
    device.proxy.on(META + "timestamp.json", replay(stale))
    reason = device.attacked_update()
    assert "ExpiredMetadataError" in reason
    device.update_once_honest()


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_mix_and_match_metadata_is_refused(device: Device, role: str) -> None:
    """A genuine older snapshot (or targets) served under the name of the current one."""
    meta_dir = device.server.repo.metadata_dir
    old = (meta_dir / f"{device.releases.old_versions[role]}.{role}.json").read_bytes()
    new = device.new_repo_version()
    device.proxy.on(META + f"{new[role]}.{role}.json", replay(old))
    reason = device.attacked_update()
    assert "LengthOrHashMismatchError" in reason
    # The replayed file is what was refused: by its length or, when equal, its hash.
    assert f"Observed length {len(old)} " in reason or hashlib.sha256(old).hexdigest() in reason
    assert device.proxy.tampered()
    device.update_once_honest()


def test_another_releases_file_under_the_requested_name_is_refused(device: Device) -> None:
    """Release 1's genuine bytes (same length) answered for release 2's file and delta."""
    r1_bytes = device.server.repo.target_file(model_target_path("digits", 1, "int8-cpu"))
    device.new_repo_version()
    device.proxy.on(R2_TARGETS, replay(r1_bytes.read_bytes()))
    reason = device.attacked_update()
    assert "does not match expected" in reason and device.releases.r2["sha256"] in reason
    assert {h.path.split("/")[3] for h in device.proxy.tampered()} == {"models", "deltas"}
    device.update_once_honest()


def test_endless_target_stops_at_the_signed_length(device: Device) -> None:
    device.new_repo_version()
    device.proxy.on(R2_TARGETS, endless())
    reason = device.attacked_update()
    assert f"more than the allowed {device.releases.r2['length']} bytes" in reason

    def both_ended() -> list[Hit] | None:  # the delta's answer and the full file's
        hits = device.proxy.tampered()
        return hits if len(hits) == 2 else None

    hits = wait_for("both endless answers to end", both_ended)
    assert {h.path.split("/")[3] for h in hits} == {"models", "deltas"}
    # The agent hung up on each (the proxy's 64 MB safety cap was never reached).
    assert all(h.client_hung_up for h in hits) and not device.proxy.capped
    staging = device.agent.updater.staging
    assert sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) == 0
    device.update_once_honest()


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_endless_metadata_stops_at_its_length_bound(device: Device, role: str) -> None:
    """timestamp.json is bounded by the agent's maximum; snapshot and targets by the
    lengths signed in the timestamp and snapshot."""
    new = device.new_repo_version()
    name = "timestamp.json" if role == "timestamp" else f"{new[role]}.{role}.json"
    device.proxy.on(META + name, endless())
    reason = device.attacked_update()
    assert "exceeds its length limit" in reason
    hit = wait_for("the endless answer to end", device.proxy.tampered)[0]
    assert hit.client_hung_up and not device.proxy.capped
    if role == "timestamp":
        assert str(TrustLimits().timestamp_max_length) in reason
    device.update_once_honest()


def _attacker_root(genuine: bytes, attacker: CryptoSigner) -> Metadata[Root]:
    """The next root version, trusting only the attacker's key for every role."""
    md: Metadata[Root] = Metadata.from_bytes(genuine)
    root = md.signed
    for name, role in root.roles.items():
        for keyid in list(role.keyids):
            root.revoke_key(keyid, name)
        root.add_key(attacker.public_key, name)
    root.version += 1
    return md


def test_timestamp_signed_with_a_key_not_in_root_is_refused(device: Device) -> None:
    attacker = CryptoSigner.generate_ed25519()

    def newer(md: Metadata[Any]) -> None:
        md.signed.version += 1

    device.proxy.on(META + "timestamp.json", rewrite_metadata(newer, [attacker]))
    reason = device.attacked_update()
    assert "UnsignedMetadataError" in reason and "timestamp" in reason
    device.update_once_honest()


def test_root_rotation_to_a_key_not_in_root_is_refused(device: Device) -> None:
    """A next root.json that trusts only the attacker, signed by the attacker."""
    repo = device.server.repo
    attacker = CryptoSigner.generate_ed25519()
    evil = _attacker_root(repo.root_bytes(), attacker)
    evil.sign(attacker)
    device.proxy.on(META + f"{evil.signed.version}.root.json", replay(evil.to_bytes()))
    reason = device.attacked_update()
    assert "UnsignedMetadataError" in reason and "root" in reason
    device.update_once_honest()


@pytest.mark.parametrize("role", ["timestamp", "root"])
def test_metadata_below_its_signature_threshold_is_refused(device: Device, role: str) -> None:
    """Every role has threshold 1 with one key, so stripping the signature is the case:
    a newer timestamp, or a genuine next root (its content unchanged) with none."""
    repo = device.server.repo
    root: Metadata[Root] = Metadata.from_bytes(repo.root_bytes())
    assert root.signed.roles[role].threshold == 1 and len(root.signed.roles[role].keyids) == 1

    def newer(md: Metadata[Any]) -> None:
        md.signed.version += 1

    if role == "timestamp":
        device.proxy.on(META + "timestamp.json", rewrite_metadata(newer, []))
    else:
        root.signed.version += 1
        root.signatures.clear()
        device.proxy.on(META + f"{root.signed.version}.root.json", replay(root.to_bytes()))
    reason = device.attacked_update()
    assert "UnsignedMetadataError" in reason and role in reason
    device.update_once_honest()


def test_one_flipped_bit_in_the_model_is_refused(device: Device) -> None:
    device.new_repo_version()
    device.proxy.on(R2_TARGETS, flip_byte())
    reason = device.attacked_update()
    assert "does not match expected" in reason and device.releases.r2["sha256"] in reason
    assert {h.path.split("/")[3] for h in device.proxy.tampered()} == {"models", "deltas"}
    device.update_once_honest()

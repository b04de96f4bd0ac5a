"""The whole update chain on a device, with injected failures and simulated power cuts.

Real parts only: a python-tuf repository served over loopback HTTP, the
agent's TUF client and downloader, A/B slots on disk, LiteRT smoke tests and
a real inference thread. A "power cut" is raised right after the updater has
persisted its entry into a state; a fresh Updater on the same directory then
plays the part of the restarted agent.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf_sim import RepoServer

from agent.protocol.api import DesiredTarget
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import Golden, model_target_path
from agent.update.fetch import FetchLimits, TufFetcher
from agent.update.slots import SlotStore
from agent.update.smoke import RuntimeChoice, smoke_test
from agent.update.state_machine import MAX_RESTARTS, State, UpdateRecord
from agent.update.trust import TrustClient
from agent.update.updater import Updater
from agent.worker import InferenceWorker
from server.publish.keys import init_keys
from server.publish.registry import build_manifest, publish_model
from server.publish.tuf_repo import TufRepository

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = tuple(str(i) for i in range(10))
CHOICE = RuntimeChoice(runtime="litert", num_threads=1)


class PowerCut(BaseException):
    """Not an AgentError: nothing in the agent may catch it, like a real power cut."""


@dataclasses.dataclass
class Device:
    state_dir: Path
    server: RepoServer
    worker: InferenceWorker
    events: list[tuple[str, str, dict[str, Any]]]
    cut_at: State | None = None
    health_problem: str | None = None

    def updater(self) -> Updater:
        trust = TrustClient(self.state_dir / "tuf", self.server.url, _root(self.server))
        return Updater(
            self.state_dir,
            SlotStore(self.state_dir / "slots"),
            TufFetcher(trust, self.server.url, FetchLimits()),
            smoke_test=lambda path, manifest: smoke_test(path, manifest, CHOICE),
            activate=self.worker.swap,
            health_check=self._health,
            report=self._report,
        )

    def _health(self) -> str | None:
        return self.health_problem or self.worker.wait_healthy(10, timeout_s=30)

    def _report(self, kind: str, state: str, detail: dict[str, Any]) -> None:
        self.events.append((kind, state, detail))
        if self.cut_at is not None and kind == "update" and state == self.cut_at.value:
            self.cut_at = None
            raise PowerCut(state)

    def active_release(self) -> int | None:
        manifest = SlotStore(self.state_dir / "slots").active_manifest()
        return None if manifest is None else int(manifest["release"])


def _root(server: RepoServer) -> bytes:
    return (server.repo_dir / "metadata" / "1.root.json").read_bytes()


def desired(release: int) -> DesiredTarget:
    return DesiredTarget(
        model_target_path("digits", release, "int8-cpu"), "digits", release, "int8-cpu"
    )


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    init_keys(tmp_path / "keys")
    repo = TufRepository.create(tmp_path / "repo", tmp_path / "keys")
    for release in (1, 2):
        publish_model(
            repo, FIXTURES / f"digits_int8_r{release}.tflite", "digits", release, "int8-cpu",
            LABELS, input_options=ContractOptions(value_range=(0.0, 1.0)),
        )  # fmt: skip
    return repo


@pytest.fixture
def device(tmp_path: Path, repo: TufRepository) -> Iterator[Device]:
    worker = InferenceWorker(CHOICE, "synthetic", lambda _c, _p: None, window_s=60)
    worker.start()
    with RepoServer(repo.repo_dir) as server:
        dev = Device(tmp_path / "device", server, worker, [])
        assert dev.updater().update(desired(1)) is True
        assert dev.active_release() == 1
        yield dev
    worker.stop()


def test_update_commits_and_the_new_model_runs(device: Device) -> None:
    up = device.updater()
    assert up.update(desired(2)) is True
    assert device.active_release() == 2
    assert up.installed() is not None and up.installed().slot == "b"  # type: ignore[union-attr]
    assert up.record.state is State.IDLE
    states = [s for kind, s, _ in device.events if kind == "update"]
    assert states[-7:] == [
        "download",
        "verify",
        "install",
        "smoke_test",
        "health",
        "commit",
        "idle",
    ]
    assert device.worker.wait_healthy(5, timeout_s=10) is None
    assert not up.wants(desired(2))


# Where the power is cut -> the release running after the restart.
@pytest.mark.parametrize(
    ("cut", "after"),
    [
        (State.DOWNLOAD, 2),
        (State.VERIFY, 2),
        (State.INSTALL, 2),
        (State.SMOKE_TEST, 1),
        (State.HEALTH, 1),
        (State.COMMIT, 2),
    ],
)
def test_power_cut_then_restart_resumes_or_rolls_back(
    device: Device, cut: State, after: int
) -> None:
    device.cut_at = cut
    with pytest.raises(PowerCut):
        device.updater().update(desired(2))
    restarted = device.updater()
    assert restarted.record.state is cut
    restarted.resume()
    assert restarted.record.state is State.IDLE
    assert device.active_release() == after
    if after == 1:
        assert restarted.record.reason is not None and "restarted" in restarted.record.reason
        assert not (device.state_dir / "slots" / "b" / "manifest.json").exists()


def test_power_cut_during_rollback_finishes_the_rollback(device: Device) -> None:
    device.health_problem = "p95 latency 40% over baseline"
    device.cut_at = State.ROLLBACK
    with pytest.raises(PowerCut):
        device.updater().update(desired(2))
    restarted = device.updater()
    restarted.resume()
    assert device.active_release() == 1


def test_bit_flipped_target_is_refused_and_the_old_model_keeps_running(
    device: Device, repo: TufRepository
) -> None:
    stored = repo.target_file(model_target_path("digits", 2, "int8-cpu"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    before = device.worker.total_inferences
    up = device.updater()
    assert up.update(desired(2)) is False
    assert device.active_release() == 1
    assert "sha256" in (up.record.reason or "")
    assert up.failures[desired(2).target_path] == 1
    assert device.worker.wait_healthy(5, timeout_s=10) is None
    assert device.worker.total_inferences > before


def test_failed_smoke_test_rolls_back_and_reports_why(device: Device, repo: TufRepository) -> None:
    # A validly signed release whose golden output the model cannot reproduce.
    path = FIXTURES / "digits_int8_r2.tflite"
    manifest = build_manifest(
        path, "digits", 3, "int8-cpu", LABELS, input_options=ContractOptions(value_range=(0.0, 1.0))
    )
    wrong = bytes((b + 100) % 256 for b in manifest.golden.output)
    bad = dataclasses.replace(
        manifest, golden=Golden(manifest.golden.seed, base64.b64encode(wrong).decode(), 2)
    )
    repo.add_target(model_target_path("digits", 3, "int8-cpu"), path, bad.to_custom())
    up = device.updater()
    assert up.update(desired(3)) is False
    assert device.active_release() == 1
    assert "smoke_test" in (up.record.reason or "")
    states = [s for kind, s, _ in device.events if kind == "update"]
    assert "rollback" in states and "health" not in states[-4:]


def test_unhealthy_model_is_switched_back(device: Device) -> None:
    device.health_problem = "inference errors"
    up = device.updater()
    assert up.update(desired(2)) is False
    assert device.active_release() == 1
    assert device.worker.wait_healthy(5, timeout_s=10) is None


def test_revoked_target_is_refused_and_retries_are_bounded(
    device: Device, repo: TufRepository
) -> None:
    repo.remove_target(model_target_path("digits", 2, "int8-cpu"))
    up = device.updater()
    for _ in range(3):
        assert up.update(desired(2)) is False
    assert not up.wants(desired(2))
    assert device.active_release() == 1


def test_director_naming_a_mislabelled_target_is_refused(device: Device) -> None:
    lying = DesiredTarget(model_target_path("digits", 2, "int8-cpu"), "digits", 7, "int8-cpu")
    up = device.updater()
    assert up.update(lying) is False
    assert "signed as digits@2" in (up.record.reason or "")
    assert device.active_release() == 1


def test_a_state_that_keeps_crashing_the_agent_is_abandoned(device: Device) -> None:
    # Health keeps "crashing" the agent: after MAX_RESTARTS restarts the update is given up
    # (rolled back), not retried for ever.
    device.cut_at = State.INSTALL
    with pytest.raises(PowerCut):
        device.updater().update(desired(2))
    for _ in range(MAX_RESTARTS):
        device.cut_at = State.INSTALL  # the restart's resume crashes in the same state again
        with pytest.raises(PowerCut):
            device.updater().resume()
    final = device.updater()
    assert final.record.restarts == MAX_RESTARTS
    final.resume()
    assert final.record.state is State.IDLE and device.active_release() == 1
    assert f"agent restarted {MAX_RESTARTS + 1} times" in (final.record.reason or "")


def test_a_disk_error_in_a_step_is_a_failed_update_not_a_crash(device: Device) -> None:
    staging = device.state_dir / "staging"
    up = device.updater()
    shutil.rmtree(staging, ignore_errors=True)
    staging.write_text("a file where the staging directory should be")  # writes now fail
    assert up.update(desired(2)) is False
    assert up.record.state is State.IDLE and device.active_release() == 1
    assert up.record.reason
    staging.unlink()


def test_a_record_of_another_version_is_not_resumed(device: Device) -> None:
    record = device.state_dir / "update.json"
    data = UpdateRecord(state=State.COMMIT, target_path="x").to_json()
    record.write_text(json.dumps({**data, "version": 99}))
    up = device.updater()
    assert up.record.state is State.ROLLBACK  # refused, logged, rolled back (nothing to undo)
    up.resume()
    assert up.record.to_json()["state"] == "idle" and device.active_release() == 1

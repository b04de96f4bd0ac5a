"""The update chain, table-driven (Mender style): injected failures and simulated restarts.

Everything is real (python-tuf repository over loopback HTTP, the agent's TUF
client and downloader, A/B slots on disk, LiteRT smoke tests, an inference
thread); faults enter through the Updater's own seams (the fetcher, smoke
test and activate callables wrap the real ones and raise once, on cue) or
through the disk. A restart is a ``PowerCut`` raised as the updater reports
entering a state (after it persisted it); a fresh Updater on the same
directory is the restarted agent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import test_updater_chain as chain
from test_updater_chain import CHOICE, Device, PowerCut, _root, desired

from agent.protocol.api import DesiredTarget
from agent.protocol.manifest import ModelManifest
from agent.update.fetch import FetchLimits, TufFetcher
from agent.update.slots import SlotStore
from agent.update.smoke import smoke_test
from agent.update.state_machine import MAX_RESTARTS, State, UpdateRecord
from agent.update.trust import TrustClient
from agent.update.updater import FetchResult, Updater

repo, device = chain.repo, chain.device  # the chain's fixtures: a device running release 1


@dataclasses.dataclass
class Faults:
    """One exception to raise at one seam, once; and restarts to simulate, in order."""

    at: str | None = None
    exc: Exception | None = None
    cuts: list[State] = dataclasses.field(default_factory=list)

    def hit(self, seam: str) -> None:
        if self.at == seam and self.exc is not None:
            self.at = None
            raise self.exc


class FaultyFetcher:
    """The real TufFetcher, with a fault seam in front of each call."""

    def __init__(self, real: TufFetcher, faults: Faults) -> None:
        self.real, self.faults = real, faults

    def manifest_for(self, want: DesiredTarget) -> tuple[ModelManifest, dict[str, Any]]:
        self.faults.hit("download")
        return self.real.manifest_for(want)

    def fetch(self, record: UpdateRecord, want: DesiredTarget, dest: Path) -> FetchResult:
        return self.real.fetch(record, want, dest)

    def verify(self, record: UpdateRecord, path: Path) -> None:
        self.faults.hit("verify")
        self.real.verify(record, path)


def make_updater(dev: Device, faults: Faults) -> Updater:
    trust = TrustClient(dev.state_dir / "tuf", dev.server.url, _root(dev.server))

    def smoke(path: Path, manifest: ModelManifest) -> None:
        faults.hit("smoke_test")
        smoke_test(path, manifest, CHOICE)

    def activate(path: Path | None, manifest: dict[str, Any] | None) -> None:
        faults.hit("health")
        dev.worker.swap(path, manifest)

    def report(kind: str, state: str, detail: dict[str, Any]) -> None:
        dev.events.append((kind, state, detail))
        if kind == "update" and faults.cuts and state == faults.cuts[0].value:
            faults.cuts.pop(0)
            raise PowerCut(state)

    return Updater(
        dev.state_dir,
        SlotStore(dev.state_dir / "slots"),
        FaultyFetcher(TufFetcher(trust, dev.server.url, FetchLimits()), faults),
        smoke_test=smoke,
        activate=activate,
        health_check=lambda: dev.worker.wait_healthy(5, timeout_s=30),
        report=report,
    )


def _break_slot_b(dev: Device) -> None:
    (dev.state_dir / "slots" / "b" / "model.tflite").mkdir()  # the install's rename fails


def _break_failures_file(dev: Device) -> None:
    failures = dev.state_dir / "failures.json"
    failures.unlink(missing_ok=True)
    failures.mkdir()  # the commit's write fails


# (seam, exception or disk fault, whether the new model was switched in before it failed)
FAILURES: list[tuple[str, Any, bool]] = [
    ("download", RuntimeError("a bug in the fetcher"), False),
    ("verify", KeyError("sha256"), False),
    ("install", _break_slot_b, False),
    ("smoke_test", ValueError("tensor shape"), True),
    ("health", RuntimeError("worker died"), True),
    ("commit", _break_failures_file, True),
]


@pytest.mark.parametrize(("seam", "fault", "switched"), FAILURES, ids=[f[0] for f in FAILURES])
def test_any_exception_in_a_step_is_a_counted_failure(
    device: Device, seam: str, fault: Any, switched: bool
) -> None:
    faults = Faults()
    if isinstance(fault, Exception):
        faults.at, faults.exc = seam, fault
        expect = type(fault).__name__
    else:
        fault(device)
        expect = ""
    up = make_updater(device, faults)
    assert up.update(desired(2)) is False  # never raises: the daemon keeps running
    assert up.record.state is State.IDLE and device.active_release() == 1
    assert expect in (up.record.reason or "")
    assert up.failures[desired(2).target_path] == 1
    trail = [s for kind, s, _ in device.events if kind == "update"]
    assert ("rollback" in trail[-3:]) is switched
    assert device.worker.wait_healthy(3, timeout_s=20) is None  # release 1 still serves


def test_three_failures_refuse_the_target_until_the_server_changes_its_mind(
    device: Device,
) -> None:
    for attempt in range(3):
        up = make_updater(device, Faults("download", RuntimeError(f"bug {attempt}")))
        assert up.wants(desired(2))
        assert up.update(desired(2)) is False
    refused = [d for kind, s, d in device.events if (kind, s) == ("update", "refused")]
    assert len(refused) == 1 and refused[0]["target"] == desired(2).target_path
    up = make_updater(device, Faults())
    assert not up.wants(desired(2))
    assert up.wants(desired(1)) is False  # installed already; but the desired target changed
    assert up.wants(desired(2))  # so release 2 may be tried again
    assert up.update(desired(2)) is True and device.active_release() == 2


# Restarts, in order (each cut at the entry of that state) -> release after recovery, refused?
RESTARTS: list[tuple[list[State], int, bool]] = [
    ([State.DOWNLOAD, State.VERIFY, State.INSTALL], 2, False),  # a step finishes between cuts
    ([State.INSTALL, State.INSTALL, State.COMMIT], 2, False),
    ([State.DOWNLOAD] * (MAX_RESTARTS + 1), 1, True),  # dies in one state: abandoned
    ([State.INSTALL] * (MAX_RESTARTS + 1), 1, True),
    ([State.SMOKE_TEST], 1, False),  # the new model crashed the agent: rolled back
    ([State.HEALTH, State.ROLLBACK], 1, False),
    ([State.HEALTH] + [State.ROLLBACK] * MAX_RESTARTS, 1, True),  # then gives up at once
]


@pytest.mark.parametrize(("cuts", "after", "refused"), RESTARTS)
def test_restarts_resume_roll_back_or_give_up(
    device: Device, cuts: list[State], after: int, refused: bool
) -> None:
    faults = Faults(cuts=list(cuts))
    with pytest.raises(PowerCut):
        make_updater(device, faults).update(desired(2))
    restarts = 1
    while True:
        up = make_updater(device, faults)  # the restarted agent
        try:
            up.resume()
            break
        except PowerCut:
            restarts += 1
    assert restarts == len(cuts) and not faults.cuts
    assert up.record.state is State.IDLE
    assert device.active_release() == after
    assert up.refused(desired(2).target_path) is refused
    said_refused = any((k, s) == ("update", "refused") for k, s, _ in device.events)
    assert said_refused is refused
    if after == 2:
        assert device.worker.wait_healthy(3, timeout_s=20) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda rec: {**rec, "state": "flashing"},  # a state this agent does not know
        lambda rec: {**rec, "version": 99},  # a layout written by another agent version
        lambda rec: {**rec, "restarts": "many"},  # corrupt
    ],
    ids=["unknown-state", "unknown-version", "corrupt"],
)
def test_an_unreadable_record_rolls_back(device: Device, mangle: Any) -> None:
    # Cut while the new model is switched in (health), then make the record unreadable.
    faults = Faults(cuts=[State.HEALTH])
    with pytest.raises(PowerCut):
        make_updater(device, faults).update(desired(2))
    record = device.state_dir / "update.json"
    data = json.loads(record.read_text())
    assert data["slot"] == "b" and data["state"] == "health"
    SlotStore(device.state_dir / "slots").activate("b")  # died right after the switch
    record.write_text(json.dumps(mangle(data)))
    up = make_updater(device, faults)
    assert up.record.state is State.ROLLBACK
    up.resume()
    assert up.record.to_json()["state"] == "idle" and device.active_release() == 1
    assert "unreadable" in (up.record.reason or "")
    assert not (device.state_dir / "slots" / "b" / "manifest.json").exists()


def test_startup_undoes_a_candidate_first_and_resumes_a_download_later(device: Device) -> None:
    # The daemon calls resume(forward=False) before loading the active model, and resume()
    # once its inference worker runs: a forward step waits, a switched-in candidate does not.
    faults = Faults(cuts=[State.DOWNLOAD])
    with pytest.raises(PowerCut):
        make_updater(device, faults).update(desired(2))
    up = make_updater(device, faults)
    up.resume(forward=False)
    assert up.record.state is State.DOWNLOAD and up.record.restarts == 0
    up.resume()
    assert device.active_release() == 2
    faults.cuts = [State.HEALTH]
    with pytest.raises(PowerCut):
        make_updater(device, faults).update(desired(1))
    up = make_updater(device, faults)
    up.resume(forward=False)
    assert up.record.to_json()["state"] == "idle" and device.active_release() == 2


def test_a_state_dir_that_cannot_be_written_fails_the_update_without_a_crash(
    device: Device,
) -> None:
    up = make_updater(device, Faults())
    record = device.state_dir / "update.json"
    record.unlink()
    record.mkdir()  # every persist of the record now fails, as on a full disk
    assert up.update(desired(2)) is False  # no exception reaches the daemon
    assert device.active_release() == 1 and up.record.state is State.IDLE
    assert "cannot persist state download" in (up.record.reason or "")
    assert not (device.state_dir / "slots" / "b" / "manifest.json").exists()  # nothing ran

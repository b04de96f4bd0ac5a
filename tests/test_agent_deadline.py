"""Every agent HTTP call has an overall deadline, not only a per-read timeout.

A slow-drip server on loopback answers at once with headers, then sends one
body byte per second: each socket read succeeds, so ``requests``' timeout alone
would let it hold a call for as long as the body lasts (60 s here). Each call
must fail within its budget plus a margin, as an AgentError subclass that says
so; in an update, the step fails and is counted.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf_sim import RepoServer

from agent.common.errors import AgentError
from agent.protocol.api import DesiredTarget
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import model_target_path
from agent.transport.deadline import DeadlineExceededError, download_budget
from agent.transport.device_api import DeviceClient
from agent.update.download import DownloadDeadlineError, DownloadLimits, download
from agent.update.fetch import FetchLimits, TufFetcher
from agent.update.slots import SlotStore
from agent.update.state_machine import State
from agent.update.trust import TrustClient, TrustLimits, TrustUnavailableError
from agent.update.updater import Updater
from server.publish.keys import init_keys
from server.publish.registry import publish_model
from server.publish.tuf_repo import TufRepository

FIXTURES = Path(__file__).parent / "fixtures"
DRIP_BYTES = 60  # one a second: a minute of "progress" per request
MARGIN_S = 4.0  # scheduling on a loaded 2-core box; the drip alone would take 60 s


class DripServer:
    """HTTP/1.1 on loopback: prompt headers, then one body byte per ``interval_s``."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.requests = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % DRIP_BYTES
            )
            try:
                for _ in range(DRIP_BYTES):
                    if self._stop.wait(self.interval_s):
                        return
                    conn.sendall(b" ")
            except OSError:
                return  # the client gave up: what we want


@pytest.fixture
def drip() -> Iterator[DripServer]:
    with DripServer() as server:
        yield server


def _timed(call: Any) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(AgentError) as info:
        call()
    return info.value, time.monotonic() - started


def test_checkin_against_a_dripping_server_ends_at_its_deadline(drip: DripServer) -> None:
    client = DeviceClient(drip.url, device_id="dev-1", timeout_s=3.0)
    err, elapsed = _timed(lambda: client.checkin("idle", None))
    assert isinstance(err, DeadlineExceededError)
    assert err.budget_s == 3.0 and "within 3.0s" in str(err)
    assert elapsed < 3.0 + MARGIN_S


def test_event_batch_and_enrollment_are_bounded_too(drip: DripServer) -> None:
    client = DeviceClient(drip.url, device_id="dev-1", timeout_s=2.0)
    err, elapsed = _timed(lambda: client.event("update", "idle", {}))
    assert isinstance(err, DeadlineExceededError) and elapsed < 2.0 + MARGIN_S
    err, elapsed = _timed(lambda: client.enroll("tok", "hw", "generic", [], {}))
    assert isinstance(err, DeadlineExceededError) and elapsed < 2.0 + MARGIN_S


def test_download_deadline_scales_with_length_and_ends_a_drip(
    drip: DripServer, tmp_path: Path
) -> None:
    # 2 s floor + 1,000 bytes at 500 B/s = 4 s for the whole download, retries included.
    limits = DownloadLimits(retries=5, backoff_base_s=0.1, timeout_s=2.0, min_rate_bps=500)
    assert limits.budget(1000) == download_budget(2.0, 1000, 500) == 4.0
    assert DownloadLimits().budget(19_000_000) > 19_000_000 / (16 * 1024)  # a 19 MB model fits
    dest = tmp_path / "model.tflite"
    err, elapsed = _timed(lambda: download(drip.url + "/m", dest, 1000, None, limits))
    assert isinstance(err, DownloadDeadlineError) and err.budget_s == 4.0
    assert elapsed < 4.0 + MARGIN_S
    assert not dest.exists()  # only a .part, kept for a resume


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    init_keys(tmp_path / "keys")
    repo = TufRepository.create(tmp_path / "repo", tmp_path / "keys")
    publish_model(
        repo, FIXTURES / "digits_int8_r1.tflite", "digits", 1, "int8-cpu",
        tuple(str(i) for i in range(10)), input_options=ContractOptions(value_range=(0.0, 1.0)),
    )  # fmt: skip
    return repo


def _root(repo: TufRepository) -> bytes:
    return (repo.repo_dir / "metadata" / "1.root.json").read_bytes()


def test_tuf_metadata_fetch_is_bounded(
    drip: DripServer, repo: TufRepository, tmp_path: Path
) -> None:
    limits = TrustLimits(timeout_s=1.0, deadline_s=2.0)
    trust = TrustClient(tmp_path / "tuf", drip.url, _root(repo), limits=limits)
    err, elapsed = _timed(trust.refresh)
    assert isinstance(err, TrustUnavailableError) and "within 2.0s" in str(err)
    assert elapsed < 2.0 + MARGIN_S


def test_a_dripping_download_is_a_counted_update_failure(
    drip: DripServer, repo: TufRepository, tmp_path: Path
) -> None:
    events: list[tuple[str, str, dict[str, Any]]] = []
    with RepoServer(repo.repo_dir) as metadata:  # honest metadata, dripping targets
        trust = TrustClient(tmp_path / "tuf", metadata.url, _root(repo))
        download_limits = DownloadLimits(retries=1, timeout_s=1.0, min_rate_bps=40_000)
        fetcher = TufFetcher(trust, drip.url, FetchLimits(download=download_limits))
        updater = Updater(
            tmp_path / "device",
            SlotStore(tmp_path / "device" / "slots"),
            fetcher,
            smoke_test=lambda _path, _manifest: None,
            activate=lambda _path, _manifest: None,
            health_check=lambda: None,
            report=lambda kind, state, detail: events.append((kind, state, detail)),
        )
        target = DesiredTarget(model_target_path("digits", 1, "int8-cpu"), "digits", 1, "int8-cpu")
        started = time.monotonic()
        assert updater.update(target) is False
        elapsed = time.monotonic() - started
    budget = download_limits.budget(37_984)  # the fixture's signed length
    assert elapsed < budget + MARGIN_S
    assert updater.record.state is State.IDLE and updater.failures[target.target_path] == 1
    assert "not complete within" in (updater.record.reason or "")
    assert drip.requests >= 1

"""Each simulated device puts its own bytes on the wire: its TUF metadata refresh and its
own download of its delta or full file, from the server or from a static host (a CDN in
front of the targets), counted per device by the server's bandwidth accounting."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Operator
from waiting import wait_for

from agent.protocol.custom_fields import TargetInfo
from agent.protocol.manifest import model_target_path
from agent.update.download import target_url
from server.app import ServerHandle
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour
from server.simulator.device_fetch import DeviceFetch, DeviceFetchError, KnownMetadata
from server.simulator.stats import FleetStats


@pytest.fixture
def server(server_factory: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    handle = server_factory(tmp_path / "server")
    op = Operator(handle.url, handle.operator_token)
    op.publish(1)
    op.publish(2)
    return handle


StaticHost = tuple[str, Counter[str]]  # base URL, GETs by path


@pytest.fixture
def static_host(server: ServerHandle, tmp_path: Path) -> Iterator[StaticHost]:
    """A plain static file host mirroring the server's /tuf/ layout; counts GETs by path."""
    root = tmp_path / "static" / "tuf"
    root.mkdir(parents=True)
    (root / "metadata").symlink_to(server.repo.metadata_dir)
    (root / "targets").symlink_to(server.repo.targets_dir)
    hits: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root.parent), **kwargs)

        def do_GET(self) -> None:
            with lock:
                hits[self.path] += 1
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def _fleet(server: ServerHandle, tmp_path: Path, prefix: str, **config: Any) -> FleetThread:
    cfg = SimConfig(
        devices=4,
        prefix=prefix,
        stores=2,
        regions=1,
        poll_s=0.3,
        telemetry=WindowSpec(window_s=0.5),
        **config,
    )
    root = (server.repo.metadata_dir / "1.root.json").read_bytes()
    behaviour = build_behaviour(("x86-gateway",), seed=3)
    thread = FleetThread(
        lambda: Fleet(server.url, cfg, behaviour, tmp_path / prefix, pinned_root=root)
    )
    thread.start(lambda fleet: fleet.enroll(server.config.enrollment_tokens[0]))
    return thread


def test_each_device_downloads_its_own_bytes_and_the_server_counts_them_per_device(
    server: ServerHandle, static_host: StaticHost, tmp_path: Path
) -> None:
    url, hits = static_host
    op = Operator(server.url, server.operator_token)
    fleet = _fleet(server, tmp_path, "wire", artifacts_url=url)
    try:
        op.assign(1, tag="fleet=wire")
        wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 4)
        ids = fleet.call(lambda f: [d.device_id for d in f.devices])

        def counted() -> list[dict[str, Any]] | None:
            rows = op.call("GET", "/api/v1/bandwidth")["devices"]
            done = [r for r in rows if r["device_id"] in ids and r["updates"] == 1]
            return done if len(done) == 4 and all(r["aux_bytes"] for r in done) else None

        rows = wait_for("a download counted for each of the four devices", counted)
        # Polled every 0.3 s after the update: mostly "nothing changed" (304).
        wait_for("a conditional check-in answered 304", lambda: fleet.report().not_modified)
        report = fleet.report()
        shared = fleet.call(lambda f: f.context().artifacts.downloads)
    finally:
        fleet.stop()
    info = server.repo.target_info(model_target_path("digits", 1, "int8-cpu"))
    model_path = target_url("", info.path, info.sha256)
    # Four devices, four copies of the file from the static host (plus the one the
    # process verifies for the whole fleet); none from the server.
    assert hits[model_path] == 4 + shared and shared == 1
    assert hits["/tuf/metadata/timestamp.json"] >= 4
    for row in rows:  # the model, plus the metadata this device fetched itself
        assert row["bytes_sent"] == info.length + row["aux_bytes"]
    assert report.downloaded_bytes == sum(r["bytes_sent"] for r in rows)
    assert report.errors == 0


def test_a_refresh_fetches_snapshot_and_targets_only_when_their_versions_change(
    server: ServerHandle,
) -> None:
    missing = TargetInfo("models/none/1/int8-cpu.tflite", 1, "0" * 64)

    async def run() -> tuple[list[int], KnownMetadata, FleetStats]:
        stats = FleetStats()
        fetch = DeviceFetch(server.url, 2, 10.0, stats, user_agent="test")
        known = KnownMetadata()
        try:
            sizes = [await fetch.refresh(known), await fetch.refresh(known)]
            Operator(server.url, server.operator_token).publish(1, name="other")  # new versions
            sizes.append(await fetch.refresh(known))
            with pytest.raises(DeviceFetchError, match="HTTP 404"):
                await fetch.download(missing)
            return sizes, known, stats
        finally:
            await fetch.close()

    sizes, known, stats = asyncio.run(run())
    timestamp = len(server.repo.metadata_bytes("timestamp.json"))
    assert sizes[1] == timestamp  # nothing new: the timestamp alone (and a 404 root probe)
    assert sizes[0] > timestamp and sizes[2] > timestamp  # snapshot and targets as well
    versions = server.repo.versions()
    assert (known.root, known.snapshot, known.targets) == (
        versions["root"], versions["snapshot"], versions["targets"])  # fmt: skip
    assert stats.downloaded_bytes == sum(sizes) and stats.errors == {"download: HTTP 404": 1}

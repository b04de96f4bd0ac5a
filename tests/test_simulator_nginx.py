"""The rollout bench's static host: a private nginx on loopback serving the server's TUF
repository directory, behind the server's ``--targets-url``. Devices that refresh and
download from it get the server's own bytes, and the server sends stragglers there."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import service_unavailable
from fleet_helpers import Operator
from waiting import wait_for

from agent.protocol.manifest import model_target_path
from agent.update.download import target_url
from server.app import ServerHandle
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")



@pytest.fixture
def nginx_and_server(
    server_factory: Callable[..., ServerHandle], tmp_path: Path
) -> Iterator[tuple[str, ServerHandle]]:
    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_server import static_host  # noqa: PLC0415 - a script, not a package
    finally:
        sys.path.remove(str(SCRIPTS))
    data = tmp_path / "server"
    if NGINX is None:  # a skip on a developer's machine, a failure in CI (.ci/run installs it)
        service_unavailable("nginx", "not installed (apt-get install nginx-light)")
    with static_host(data / "repo", tmp_path / "nginx", NGINX) as url:
        handle = server_factory(data, targets_url=url)
        op = Operator(handle.url, handle.operator_token)
        op.publish(1)
        op.publish(2)
        yield url, handle


def test_nginx_serves_the_repository_the_server_redirects_to(
    nginx_and_server: tuple[str, ServerHandle],
) -> None:
    url, server = nginx_and_server
    moved = requests.get(
        server.url + "/tuf/metadata/timestamp.json", allow_redirects=False, timeout=10
    )
    assert moved.status_code == 307
    assert moved.headers["location"] == url + "/tuf/metadata/timestamp.json"
    for name in ("timestamp.json", "1.root.json"):
        got = requests.get(f"{url}/tuf/metadata/{name}", timeout=10)
        assert got.status_code == 200 and got.content == server.repo.metadata_bytes(name)
    assert requests.get(url + "/tuf/metadata/2.root.json", timeout=10).status_code == 404
    info = server.repo.target_info(model_target_path("digits", 2, "int8-cpu"))
    got = requests.get(url + target_url("", info.path, info.sha256), timeout=10)
    assert got.status_code == 200 and len(got.content) == info.length
    assert "immutable" in got.headers["cache-control"]


def test_devices_update_from_nginx_and_the_server_counts_their_bytes(
    nginx_and_server: tuple[str, ServerHandle], tmp_path: Path
) -> None:
    url, server = nginx_and_server
    op = Operator(server.url, server.operator_token)
    cfg = SimConfig(
        devices=3,
        prefix="cdn",
        stores=1,
        regions=1,
        poll_s=0.3,
        artifacts_url=url,
        telemetry=WindowSpec(window_s=0.5),
    )
    root = (server.repo.metadata_dir / "1.root.json").read_bytes()
    behaviour = build_behaviour(("x86-gateway",), seed=3)
    fleet = FleetThread(
        lambda: Fleet(server.url, cfg, behaviour, tmp_path / "cdn", pinned_root=root)
    )
    fleet.start(lambda f: f.enroll(server.config.enrollment_tokens[0]))
    try:
        op.assign(1, tag="fleet=cdn")
        wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 3)
        ids = fleet.call(lambda f: [d.device_id for d in f.devices])

        def counted() -> list[dict[str, Any]] | None:
            rows = op.call("GET", "/api/v1/bandwidth")["devices"]
            done = [r for r in rows if r["device_id"] in ids and r["updates"] == 1]
            return done if len(done) == 3 and all(r["aux_bytes"] for r in done) else None

        rows = wait_for("a download counted for each device", counted)
        report = fleet.report()
    finally:
        fleet.stop()
    info = server.repo.target_info(model_target_path("digits", 1, "int8-cpu"))
    for row in rows:  # the model and the metadata, each device's own, all from nginx
        assert row["bytes_sent"] == info.length + row["aux_bytes"]
    assert report.downloaded_bytes == sum(r["bytes_sent"] for r in rows)
    assert report.errors == 0

"""Every device gets a delta it can decode (delta format versions 1 and 2).

The server signs a version-1 patch at the path every agent knows and, when its
ANS-coded version-2 patch is smaller, that one beside it. An agent with
constriction (this x86_64 box) takes version 2; an agent process without it
(as on aarch64: ``sys.modules["constriction"] = None``, the technique of
test_delta_ans.py) takes version 1, not the full file; bandwidth rows say which.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import BOARDS, FIXTURES, Operator, enroll_agent
from waiting import wait_for

from agent.cli import main as agent_main
from agent.common.errors import ProtocolError
from agent.delta import read_header
from agent.protocol.api import DesiredTarget
from agent.protocol.manifest import DeltaManifest, delta_target_path
from agent.update.fetch import delta_choices
from server.cli import main as cli_main
from server.publish.delta_worker import DeltaWorker
from server.publish.deltas import versions_to_sign
from server.simulator.artifacts import Fetched, SharedArtifacts

NAME, VARIANT = "digits", "int8-cpu"
ROOT = Path(__file__).resolve().parent.parent
BASE = "ab" * 32
# An interpreter without constriction, for the whole process and what it spawns.
NO_ANS = 'import sys\nsys.modules["constriction"] = None\n'
CHECKIN = """
import json, sys
sys.modules["constriction"] = None  # an install without the package, e.g. an aarch64 agent
from pathlib import Path
from agent.config import load_config
from agent.daemon import Agent
from agent.delta import ans_available
assert not ans_available()
agent = Agent(load_config(Path(sys.argv[1])))
agent.start()
try:
    committed = agent.checkin_once()
    installed = agent.updater.installed()
    print(json.dumps({"committed": committed, "device_id": agent.identity.device_id,
                      "release": installed.release if installed else None}))
finally:
    agent.stop()
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


def test_devices_look_for_version_2_only_when_they_can_decode_it() -> None:
    v1 = delta_target_path(NAME, 2, VARIANT, BASE)
    v2 = delta_target_path(NAME, 2, VARIANT, BASE, format_version=2)
    assert v1 == f"deltas/{NAME}/2/{VARIANT}/{BASE}.efd"  # what deployed agents ask for
    assert v2 == f"deltas/{NAME}/2/{VARIANT}/{BASE}.v2.efd"
    with pytest.raises(ProtocolError, match="format version 3"):
        delta_target_path(NAME, 2, VARIANT, BASE, format_version=3)
    both = delta_choices(NAME, 2, VARIANT, BASE, ans=True)
    assert [(c.path, c.format_version, c.via) for c in both] == [
        (v2, 2, "delta-ans"),
        (v1, 1, "delta"),
    ]
    assert [c.path for c in delta_choices(NAME, 2, VARIANT, BASE, ans=False)] == [v1]


def test_delta_manifest_carries_its_format_version() -> None:
    manifest = DeltaManifest(NAME, 2, VARIANT, BASE, "cd" * 32, 100, "models/x", 2)
    assert DeltaManifest.from_custom(manifest.to_custom()).format_version == 2
    old = manifest.to_custom()
    del old["format_version"]  # signed before version 2 existed
    assert DeltaManifest.from_custom(old).format_version == 1
    with pytest.raises(ProtocolError, match="format_version"):
        DeltaManifest.from_custom({**old, "format_version": "2"})


@pytest.mark.parametrize(
    ("sizes", "signed"),
    [
        ({1: 60, 2: 50}, [1, 2]),  # ANS wins: both
        ({1: 60, 2: 60}, [1]),  # not smaller: only the one every agent reads
        ({1: 60}, [1]),  # no constriction on the builder, or ANS won nowhere
        ({1: 100, 2: 90}, [2]),  # version 1 no smaller than the file: only ANS devices gain
        ({1: 100, 2: 100}, []),
    ],
)
def test_which_versions_are_signed(sizes: dict[int, int], signed: list[int]) -> None:
    assert versions_to_sign(sizes, target_bytes=100) == signed


def _enroll_config(srv: Any, work: Path, tag: str) -> Path:
    """Enroll through the real CLI; the config, for an agent in another process."""
    config = work / "agent.toml"
    work.mkdir(parents=True)
    config.write_text(
        f'[agent]\nstate_dir = "{work / "state"}"\nhw_root = "{BOARDS / "x86-gateway"}"\n'
        "[inference]\nnum_threads = 1\nmax_fps = 200\n"
        "[telemetry]\nwindow_s = 0.5\nwarmup_inferences = 2\n"
        "[update]\npoll_interval_s = 1\nhealth_inferences = 5\n"
    )
    argv = ["enroll", "--server", srv.url, "--token", srv.config.enrollment_tokens[0],
            "--config", str(config), "--root", str(srv.repo.metadata_dir / "1.root.json"),
            "--hardware-id", f"hw-{work.name}", "--tag", tag]  # fmt: skip
    assert agent_main(argv) == 0
    return config


def _checkin_without_ans(config: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHECKIN, str(config)],
        capture_output=True,
        check=False,  # its stderr is the failure message
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _download_report(op: Operator, device_id: str, release: int) -> dict[str, Any]:
    """The device's ``download/done`` report of one release, as the server stored it."""

    def report() -> dict[str, Any] | None:
        for event in op.device(device_id)["events"]:
            detail = event["detail"]
            detail = detail.get("detail", detail) if isinstance(detail, dict) else {}
            if (event["type"], event["state"]) == ("download", "done") and detail.get(
                "release"
            ) == release:
                return dict(detail)
        return None

    return wait_for(f"the download report of release {release}", report)


def test_each_agent_installs_through_the_delta_it_can_decode(
    server_factory: Callable[..., Any], db_url: str | None, tmp_path: Path, capsys: Any
) -> None:
    srv = server_factory(tmp_path / "server", db_url=db_url)
    op = Operator(srv.url, srv.operator_token)
    r1 = op.publish(1)
    root = srv.repo.metadata_dir / "1.root.json"
    x86 = enroll_agent(srv.url, srv.config.enrollment_tokens[0], root_json=root,
                       work=tmp_path / "x86", tags=("cpu=x86",))  # fmt: skip
    arm = _enroll_config(srv, tmp_path / "arm", "cpu=arm")
    x86.start()
    try:
        op.assign(1, tag="cpu=x86")
        op.assign(1, tag="cpu=arm")
        assert x86.checkin_once() is True
        first = _checkin_without_ans(arm)
        assert (first["committed"], first["release"]) == (True, 1)

        r2 = op.publish(2)  # waits for the worker's job
        v1 = delta_target_path(NAME, 2, VARIANT, r1["sha256"])
        v2 = delta_target_path(NAME, 2, VARIANT, r1["sha256"], format_version=2)
        targets = srv.repo.targets()
        assert {v1, v2} <= set(targets)
        assert [targets[p].custom["format_version"] for p in (v1, v2)] == [1, 2]
        assert [read_header(srv.repo.target_file(p)).version for p in (v1, v2)] == [1, 2]
        assert targets[v2].length < targets[v1].length < r2["length"]
        [job] = op.call("GET", f"/api/v1/models/{NAME}/2/deltas")["jobs"]
        assert (job["state"], job["delta_bytes"]) == ("done", targets[v1].length)
        assert f"format version 2 (ANS) signed too: {targets[v2].length} bytes" in job["reason"]
        assert [d["target_path"] for d in r2["deltas"]] == [v2]  # the smallest per base

        op.assign(2, tag="cpu=x86")
        op.assign(2, tag="cpu=arm")
        assert x86.checkin_once() is True
        assert x86.updater.installed().release == 2  # type: ignore[union-attr]
        second = _checkin_without_ans(arm)
        assert (second["committed"], second["release"]) == (True, 2)

        x86.flush_events()
        ans = _download_report(op, x86.identity.device_id, 2)
        plain = _download_report(op, second["device_id"], 2)
        assert (ans["via"], ans["bytes_downloaded"], ans["fallback"]) == (
            "delta-ans", targets[v2].length, None,
        )  # fmt: skip
        assert (plain["via"], plain["bytes_downloaded"], plain["fallback"]) == (
            "delta", targets[v1].length, None,
        )  # fmt: skip
        fleet = op.call("GET", "/api/v1/bandwidth")["fleet"]
        assert (fleet["updates"], fleet["deltas"], fleet["deltas_ans"]) == (4, 2, 1)
        assert fleet["fallbacks"] == 0
    finally:
        x86.stop()
    assert cli_main(["--server", srv.url, "--token", srv.operator_token, "bandwidth"]) == 0
    out = capsys.readouterr().out
    assert "of which ANS" in out and "digits@2 int8-cpu" in out


def test_only_version_1_is_signed_where_ans_wins_nowhere(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The same model with new metadata: a few bytes of zstd, no residuals to code.
    srv = server_factory(tmp_path / "server")
    op = Operator(srv.url, srv.operator_token)
    r1 = op.publish(1)
    r2 = op.publish_file(FIXTURES / "digits_int8_meta.tflite", release=2)
    v1 = delta_target_path(NAME, 2, VARIANT, r1["sha256"])
    targets = srv.repo.targets()
    assert v1 in targets and read_header(srv.repo.target_file(v1)).version == 1
    assert delta_target_path(NAME, 2, VARIANT, r1["sha256"], format_version=2) not in targets
    [job] = op.call("GET", f"/api/v1/models/{NAME}/2/deltas")["jobs"]
    assert (job["state"], job["delta_bytes"], job["reason"]) == ("done", targets[v1].length, None)
    assert [d["target_path"] for d in r2["deltas"]] == [v1]


def test_a_builder_without_constriction_signs_only_version_1(
    server_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = server_factory(tmp_path / "server", delta_workers=0)
    op = Operator(srv.url, srv.operator_token)
    r1 = op.publish(1, wait_deltas=False)
    op.publish(2, wait_deltas=False)
    # The worker's builder is a fresh interpreter: make it one without constriction.
    site = tmp_path / "no-constriction"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_ANS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    outcome = DeltaWorker(srv.db, srv.repo).run_once()
    assert outcome is not None and outcome.state == "done"
    v1 = delta_target_path(NAME, 2, VARIANT, r1["sha256"])
    assert outcome.signed == (v1,) and outcome.reason is None
    targets = srv.repo.targets()
    assert read_header(srv.repo.target_file(v1)).version == 1
    assert delta_target_path(NAME, 2, VARIANT, r1["sha256"], format_version=2) not in targets


def test_the_simulated_fleet_takes_version_2_like_an_agent_with_constriction(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "server")
    op = Operator(srv.url, srv.operator_token)
    r1, r2 = op.publish(1), op.publish(2)
    root = (srv.repo.metadata_dir / "1.root.json").read_bytes()
    v2 = delta_target_path(NAME, 2, VARIANT, r1["sha256"], format_version=2)

    async def fetch() -> Fetched:
        artifacts = SharedArtifacts(srv.url, root, tmp_path / "cache")
        new = await artifacts.model(DesiredTarget(r2["target_path"], NAME, 2, VARIANT))
        old = await artifacts.model(DesiredTarget(r1["target_path"], NAME, 1, VARIANT))
        return await artifacts.fetch(new, old)

    fetched = asyncio.run(fetch())
    length = srv.repo.targets()[v2].length
    assert (fetched.via, fetched.bytes_downloaded, fetched.fallback) == ("delta-ans", length, None)
    assert [f.path for f in fetched.files] == [v2]

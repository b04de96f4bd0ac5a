"""`rollout watch`, `telemetry`, progress on stderr and the demo's URLs, against real servers.

Devices are simulated over the real protocol (``rollout_helpers``): REST check-ins
and update events with their own tokens, telemetry windows over MQTT.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from rollout_helpers import FIXTURES, Fleet, Telemetry, published_fleet
from waiting import wait_for

from server import cli
from server.app import ServerHandle
from server.cli import watch as watch_cli

ServerFactory = Callable[..., ServerHandle]
ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys: pytest.CaptureFixture[str], server: ServerHandle | None,
            *argv: str) -> tuple[int, str, str]:  # fmt: skip
    prefix = ["--server", server.url, "--token", server.operator_token] if server else []
    try:
        code = cli.main([*prefix, *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def server(server_factory: ServerFactory, tmp_path: Path) -> ServerHandle:
    # The scheduler ticks by itself here: `watch` sees the rollout move as an operator would.
    return server_factory(tmp_path / "server", rollout_tick_interval_s=0.2)


@pytest.fixture
def fleet(server: ServerHandle) -> Fleet:
    return published_fleet(server)


def _devices_install(fleet: Fleet, devices: list[Any], outcome: str) -> Iterator[None]:
    """A thread in which each device installs release 2 once its check-in names it."""
    stop = threading.Event()
    done: set[str] = set()

    def run() -> None:
        while not stop.wait(0.1):
            for dev in devices:
                if dev.device_id not in done and fleet.desired_release(dev) == 2:
                    fleet.install(dev, 2, outcome=outcome)
                    done.add(dev.device_id)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


def test_watch_redraws_until_the_rollout_completes_and_exits_0(
    server: ServerHandle, fleet: Fleet, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    devices = fleet.enroll(4)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%", soak="0s",
                       min_sample=1, max_latency_regression="off", max_power_regression="off",
                       start=True)["id"]  # fmt: skip
    naps: list[float] = []
    real_sleep = time.sleep

    def nap(seconds: float) -> None:
        naps.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(watch_cli, "time", SimpleNamespace(sleep=nap, strftime=time.strftime))
    installer = _devices_install(fleet, devices, "commit")
    next(installer)
    try:
        code, out, err = run_cli(capsys, server, "rollout", "watch", rid, "--interval", "0.3")
    finally:
        next(installer, None)
    assert code == 0, err
    assert f"rollout {rid} completed" in err
    assert naps and set(naps) == {0.3}  # --interval between redraws
    # Not a terminal: each change is printed once, the last one completed.
    assert out.count(f"rollout {rid}") >= 2
    heads = [line for line in out.splitlines() if line.startswith(f"rollout {rid}  digits@2")]
    assert len(heads) >= 2 and "  completed  " in heads[-1], heads


def test_watch_exits_3_with_the_reason_when_the_rollout_pauses(
    server: ServerHandle, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = fleet.enroll(4)
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="50%,100%", soak="0s",
                       max_failure="0", start=True)["id"]  # fmt: skip
    installer = _devices_install(fleet, devices, "fail")
    next(installer)
    try:
        code, out, err = run_cli(capsys, server, "--json", "rollout", "watch", rid,
                                 "--interval", "0.2")  # fmt: skip
    finally:
        next(installer, None)
    assert code == 3
    assert f"rollout {rid} paused: " in err and "error_threshold" in err
    docs = [json.loads(line) for line in out.splitlines()]  # --json: one document per line
    assert docs[-1]["state"] == "paused" and docs[-1]["paused_reason"]
    # Aborted is an end too: exit 3 at once.
    fleet.act(rid, "abort")
    code, _, err = run_cli(capsys, server, "rollout", "watch", rid)
    assert code == 3 and f"rollout {rid} aborted" in err


def test_telemetry_per_device_and_fleet(
    server: ServerHandle, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    pi, gw = fleet.enroll(1, profile="rpi4")[0], fleet.enroll(1)[0]
    sender = Telemetry(server.mqtt_host, server.mqtt_port)
    try:
        for _ in range(3):
            sender.window(pi, 1, p95_ms=10.0, power_mw=2000.0)
            sender.window(gw, 1, p95_ms=4.0, power_mw=9000.0)
        sender.results(pi, 1, counts={"3": 40})
    finally:
        sender.close()
    fleet.event(pi, "golden_set", None, {"accuracy": 0.97, "per_class": {"0": 0.97}, "release": 1})
    wait_for("both devices' telemetry rolled up", lambda: len(fleet.call(
        "GET", "/api/v1/telemetry/summary")["rows"]) == 2)  # fmt: skip
    wait_for("the results window stored", lambda: fleet.call(
        "GET", f"/api/v1/devices/{pi.device_id}/accuracy")["releases"])  # fmt: skip

    code, out, err = run_cli(capsys, server, "telemetry", pi.device_id)
    assert code == 0, err
    assert f"device {pi.device_id} (rpi4)" in out
    p50 = float(re.search(r"invoke p50 ([0-9.]+) ms", out).group(1))  # type: ignore[union-attr]
    p95 = float(re.search(r"p95 ([0-9.]+) ms", out).group(1))  # type: ignore[union-attr]
    assert 7.0 <= p50 <= 9.0 and 9.0 <= p95 <= 11.0  # windows said p50 8, p95 10
    assert "2000 mW mean (sensor)" in out
    assert "golden set 97.0%" in out and "mean confidence" in out
    assert "latest window" in out and "2000 mW (sensor)" in out
    assert "{" not in out  # a readable block, not a JSON line

    code, out, _ = run_cli(capsys, server, "telemetry", pi.device_id, "--json")
    data = json.loads(out)
    (row,) = data["rows"]
    assert (row["model"], row["release"], row["golden_set_accuracy"]) == ("digits", 1, 0.97)
    assert row["power_sources"] == {"sensor": row["windows"]}, (row["windows"], row["inferences"])
    assert row["power_mw_mean"] == 2000.0

    code, out, _ = run_cli(capsys, server, "telemetry")
    assert code == 0
    lines = {line.split()[1]: line for line in out.splitlines()[1:3]}
    assert set(lines) == {"rpi4", "x86-gateway"} and "sensor" in lines["rpi4"]
    assert "fleet: 2 devices, " in out and "mW mean (sensor)" in out
    code, out, _ = run_cli(capsys, server, "--json", "telemetry", "--profile", "rpi4")
    data = json.loads(out)
    assert [r["profile"] for r in data["rows"]] == ["rpi4"]
    assert data["total"]["devices"] == 1

    code, _, err = run_cli(capsys, server, "telemetry", "no-such-device")
    assert code == 1 and "no-such-device" in err


def _publish(server: ServerHandle, capsys: pytest.CaptureFixture[str], release: int,
             *extra: str) -> tuple[int, str, str]:  # fmt: skip
    return run_cli(capsys, server, "model", "publish", str(FIXTURES / "digits_int8_r1.tflite"),
                   "--name", f"p{release}", "--version", "1", "--labels",
                   str(FIXTURES / "digits_labels.txt"), "--input-range", "0,1", *extra)  # fmt: skip


def test_publish_progress_on_stderr_only_and_json_stays_clean(
    module_server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    size = (FIXTURES / "digits_int8_r1.tflite").stat().st_size
    code, out, err = _publish(module_server, capsys, 1, "--json", "--progress")
    assert code == 0, err
    assert json.loads(out)["length"] == size  # stdout is exactly one JSON document
    assert "uploading [" in err and "100%" in err and "kB of" in err
    assert "server validating and signing" in err  # deltas are built after publish
    # Not a terminal and no --progress: no bar, no carriage returns.
    code, out, err = _publish(module_server, capsys, 2)
    assert code == 0 and "published p2@1" in out
    assert "\r" not in err and "[" not in err


def test_delta_and_quantize_progress_never_reach_json_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r1, r2 = FIXTURES / "digits_int8_r1.tflite", FIXTURES / "digits_int8_r2.tflite"
    code, out, err = run_cli(capsys, None, "delta", "make", str(r1), str(r2), "-o",
                             str(tmp_path / "p.efd"), "--json", "--progress")  # fmt: skip
    assert code == 0 and "building delta [" in err
    assert json.loads(out)["method"]
    parser = cli.build_parser()
    for action in ("quantize", "validate"):  # both take --progress; the default asks isatty
        help_text = _help(parser, action)
        assert "--progress" in help_text and "--quiet" in help_text


def _help(parser: Any, action: str) -> str:
    sub = parser._subparsers._group_actions[0].choices["model"]
    return str(sub.get_default("_group_actions").choices[action].format_help())


def _demo_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "edgefleet_demo_access", ROOT / "scripts" / "demo_access.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_prints_urls_that_answer_and_the_operator_token(module_server: ServerHandle) -> None:
    token_file = module_server.config.token_file
    viewer = module_server.config.viewer_token_file.read_text().strip()
    lines = _demo_module().access_lines(module_server.url, module_server.operator_token,
                                        token_file, viewer_token=viewer)  # fmt: skip
    urls = [m.group(0) for line in lines for m in re.finditer(r"http://[^\s)]+", line)]
    paths = {u.removeprefix(module_server.url) for u in urls}
    assert {"/ui/", "/api/v1/devices", "/docs", "/metrics", "/tuf/metadata/root.json"} <= paths
    headers = {"Authorization": f"Bearer {module_server.operator_token}"}
    for url in urls:
        if url == module_server.url:  # the EDGEFLEET_SERVER line names the base itself
            continue
        status = requests.get(url, headers=headers, timeout=10).status_code
        assert status == 200, (url, status)
    assert f"operator token:  {module_server.operator_token} (stored in {token_file})" in lines
    assert any(line.startswith(f"viewer token:    {viewer} ") for line in lines)

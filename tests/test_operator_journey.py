"""The README's "Operator's first steps", command by command, from `keys init` to a rollout.

The server is a real `edgefleet-server run --keys DIR` process; the operator
commands run in-process through ``server.cli.main`` with the environment the
README exports; the camera enrolls through ``agent.cli.main`` and runs the real
daemon (LiteRT, TUF, A/B slots) on a fake x86 board tree.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from waiting import wait_for

from agent.cli import main as agent_main
from agent.config import load_config
from agent.daemon import Agent
from agent.identity import ROOT_FILE
from agent.update.trust import TrustClient
from server import cli
from server.cli.common import SERVER_ENV, TOKEN_ENV
from server.main import main as server_main
from server.publish.keys import check_keys_dir

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
BOARDS = ROOT / "tests" / "boards"


def edgefleet(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fleet_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """`edgefleet keys init KEYS` then `edgefleet-server run --data DATA --keys KEYS --port N`."""
    keys, data = tmp_path / "keys", tmp_path / "data"
    assert cli.main(["keys", "init", str(keys)]) == 0
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["EDGEFLEET_ROLLOUT_TICK_S"] = "0.5"  # the test's patience, not the README's
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.main", "run", "--data", str(data), "--keys", str(keys),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return requests.get(url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for("edgefleet-server to answer", up, timeout_s=60, poll_s=0.2)
        yield url, keys, data
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _enroll(url: str, token: str, root_json: Path, tmp_path: Path) -> Path:
    """`edgefleet-agent enroll` as the README writes it; the agent's config path."""
    # edgefleet-agent enroll --server URL --token T --config agent.toml --state-dir STATE
    #     --profile x86-gateway --root root.json --tag fleet=store1
    config, state = tmp_path / "agent.toml", tmp_path / "agent-state"
    config.write_text(  # what an image would ship; fast intervals for the test
        f'[agent]\nstate_dir = "{state}"\nhw_root = "{BOARDS / "x86-gateway"}"\n'
        "[inference]\nnum_threads = 1\nmax_fps = 200\n"
        "[telemetry]\nwindow_s = 0.5\nwarmup_inferences = 2\n"
        "[update]\npoll_interval_s = 1\nhealth_inferences = 5\n"
    )
    assert agent_main(["enroll", "--server", url, "--token", token,
                       "--config", str(config), "--state-dir", str(state),
                       "--profile", "x86-gateway", "--root", str(root_json),
                       "--tag", "fleet=store1"]) == 0  # fmt: skip
    assert (state / ROOT_FILE).read_bytes() == root_json.read_bytes()  # pinned as given
    return config


def test_operators_first_steps_as_written(
    fleet_server: tuple[str, Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    url, keys, data = fleet_server
    # export EDGEFLEET_SERVER=... EDGEFLEET_TOKEN=$(cat DATA/operator.token)
    monkeypatch.setenv(SERVER_ENV, url)
    monkeypatch.setenv(TOKEN_ENV, (data / "operator.token").read_text().strip())

    # edgefleet root export -o root.json --keys KEYS
    root_json = tmp_path / "root.json"
    code, out, err = edgefleet(capsys, "root", "export", "-o", str(root_json), "--keys", str(keys))
    assert code == 0, err
    assert f"--root {root_json}" in out
    # The server signs with the keys `keys init` made, not keys of its own.
    root = json.loads(root_json.read_bytes())["signed"]
    mine = check_keys_dir(keys)
    assert {role: root["roles"][role]["keyids"] for role in mine} == {
        role: [keyid] for role, keyid in mine.items()
    }
    assert not (data / "keys").exists()
    # An agent's TUF client accepts it as its trust anchor.
    TrustClient(tmp_path / "probe-tuf", url, root_json.read_bytes()).refresh()

    # edgefleet token create --note "store 1"
    code, out, err = edgefleet(capsys, "token", "create", "--note", "store 1")
    assert code == 0, err
    enrollment_token = out.strip()

    config = _enroll(url, enrollment_token, root_json, tmp_path)
    agent = Agent(load_config(config))  # `edgefleet-agent run --config agent.toml`
    daemon = threading.Thread(target=agent.run_forever, name="agent", daemon=True)
    daemon.start()
    try:
        # edgefleet model publish digits_int8.tflite --name digits --version 1 ...
        code, out, err = edgefleet(
            capsys, "model", "publish", str(FIXTURES / "digits_int8_r1.tflite"), "--name",
            "digits", "--version", "1", "--labels", str(FIXTURES / "digits_labels.txt"),
            "--input-range", "0,1",
        )  # fmt: skip
        assert code == 0, err
        assert "published digits@1 int8-cpu" in out

        # edgefleet rollout create --release digits@1 --select fleet=store1 --stages 100%
        #     --soak 0s --start ; edgefleet rollout watch ID
        code, out, err = edgefleet(capsys, "--json", "rollout", "create", "--release",
                                   "digits@1", "--select", "fleet=store1", "--stages", "100%",
                                   "--soak", "0s", "--start")  # fmt: skip
        assert code == 0, err
        rid = json.loads(out)["id"]
        watched: list[tuple[int, str, str]] = []
        watcher = threading.Thread(
            target=lambda: watched.append(
                edgefleet(capsys, "rollout", "watch", rid, "--interval", "0.5")
            ),
            daemon=True,
        )
        watcher.start()
        watcher.join(timeout=120)  # a hung watch fails the test instead of hanging it
        assert watched, "rollout watch did not return in 120 s"
        code, out, err = watched[0]
        assert code == 0, (out, err)
        assert f"rollout {rid} completed" in err
        assert agent.updater.installed().release == 1  # type: ignore[union-attr]

        # edgefleet telemetry
        auth = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
        summary = url + "/api/v1/telemetry/summary"
        wait_for(
            "the camera's telemetry",
            lambda: requests.get(summary, headers=auth, timeout=10).json()["rows"],
        )
        code, out, err = edgefleet(capsys, "telemetry")
        assert code == 0, err
        assert "digits@1" in out and "x86-gateway" in out
    finally:
        agent.request_stop()
        daemon.join(timeout=30)

    # An FP32 file published as an INT8 variant is refused, naming the tensor types.
    code, _, err = edgefleet(
        capsys, "model", "publish", str(FIXTURES / "digits_fp32_r1.tflite"), "--name", "floaty",
        "--version", "1", "--labels", str(FIXTURES / "digits_labels.txt"), "--input-range", "0,1",
    )  # fmt: skip
    assert code == 1
    assert "server answered 422" in err and "is not integer where variant int8-cpu" in err
    assert "is float32" in err


def test_server_refuses_a_keys_dir_without_every_role_or_with_open_permissions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    run = ["run", "--data", str(tmp_path / "data"), "--port", "0", "--keys", str(keys)]
    assert server_main(run) == 1
    assert f"key directory {keys} does not exist" in capsys.readouterr().err

    assert cli.main(["keys", "init", str(keys)]) == 0
    capsys.readouterr()
    (keys / "snapshot.pem").unlink()
    assert server_main(run) == 1
    err = capsys.readouterr().err
    assert "lacks the snapshot (snapshot.pem) key" in err and f"edgefleet keys init {keys}" in err

    assert cli.main(["keys", "init", str(keys), "--force"]) == 0
    os.chmod(keys / "targets.pem", 0o640)
    assert server_main(run) == 1
    err = capsys.readouterr().err
    assert "unsafe permissions 0640" in err and "targets.pem" in err
    assert not (tmp_path / "data").exists()  # refused before anything was created
    assert stat.S_IMODE((keys / "root.pem").stat().st_mode) == 0o600

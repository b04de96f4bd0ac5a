"""The `edgefleet` operator CLI against a real running server."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from server import cli
from server.app import ServerHandle
from server.cli.common import SERVER_ENV, TOKEN_ENV

FIXTURES = Path(__file__).parent / "fixtures"
ServerFactory = Callable[..., ServerHandle]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def with_server(server: ServerHandle, *argv: str) -> list[str]:
    return ["--server", server.url, "--token", server.operator_token, *argv]


def test_keys_init_writes_private_keys_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    code, out, _ = run_cli(capsys, "keys", "init", str(keys), "--json")
    assert code == 0
    assert sorted(json.loads(out)["keyids"]) == ["root", "snapshot", "targets", "timestamp"]
    for pem in keys.glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    before = (keys / "root.pem").read_bytes()
    code, _, err = run_cli(capsys, "keys", "init", str(keys))
    assert code == 1 and "already holds keys" in err and err.startswith("edgefleet: error: ")
    assert (keys / "root.pem").read_bytes() == before
    code, out, _ = run_cli(capsys, "keys", "init", str(keys), "--force")
    assert code == 0 and "wrote root, targets, snapshot, timestamp keys" in out
    assert (keys / "root.pem").read_bytes() != before


def test_publish_list_assign_show_and_tokens(
    capsys: pytest.CaptureFixture[str], server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(tmp_path)
    model, labels = FIXTURES / "digits_int8_r1.tflite", FIXTURES / "digits_labels.txt"
    fp32 = FIXTURES / "digits_fp32_r1.tflite"
    publish = ["model", "publish", str(model), "--name", "digits", "--version", "1",
               "--input-range", "0,1"]  # fmt: skip
    code, out, err = run_cli(
        capsys,
        *with_server(server, *publish, "--labels", str(labels), "--fp32", str(fp32), "--json"),
    )
    assert code == 0, err
    published = json.loads(out)
    assert published["fp32_length"] == fp32.stat().st_size
    assert published["target_path"] == "models/digits/1/int8-cpu.tflite"
    code, _, err = run_cli(capsys, *with_server(server, *publish, "--labels", str(labels)))
    assert code == 1 and "server answered 409" in err and "already published" in err

    code, out, _ = run_cli(capsys, *with_server(server, "model", "list"))
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "RELEASE", "VARIANT"]
    assert row.split()[:4] == ["digits", "1", "int8-cpu", str(model.stat().st_size)]

    code, out, _ = run_cli(capsys, *with_server(server, "token", "create", "--max-uses", "1"))
    token = out.strip()
    enroll = {
        "token": token,
        "hardware_id": "hw-cli",
        "profile": "rpi5",
        "variant_preference": ["int8-cpu"],
        "tags": {"store": "7"},
        "agent_version": "0.1.0",
    }
    dev = requests.post(f"{server.url}/api/v1/enroll", json=enroll, timeout=10).json()["device_id"]

    code, out, _ = run_cli(capsys, *with_server(server, "device", "list", "--tag", "store=7"))
    assert code == 0 and dev in out and "store=7" in out
    code, out, _ = run_cli(
        capsys, *with_server(server, "--json", "device", "list", "--tag", "store=8")
    )
    assert code == 0 and json.loads(out) == []

    code, out, _ = run_cli(capsys, *with_server(server, "assign", "digits@1", "--tag", "store=7"))
    assert code == 0 and out.strip() == "assigned digits@1 to tag store=7"
    code, out, _ = run_cli(capsys, *with_server(server, "device", "show", dev))
    assert code == 0
    assert "desired       digits@1 int8-cpu" in out and "event         " in out
    assert "latest window: none received" in out  # readable, not a cut-off JSON line
    code, out, _ = run_cli(capsys, *with_server(server, "device", "show", dev, "--json"))
    assert json.loads(out)["desired"]["target_path"] == "models/digits/1/int8-cpu.tflite"

    for argv, words in (
        (["assign", "digits@9", "--device", dev], "server answered 404: no published release"),
        (["assign", "digits-1", "--device", dev], "must look like NAME@VERSION"),
        (["assign", "digits@1", "--tag", "nokey"], "server answered 422"),
        (["device", "show", "dev-nope"], "server answered 404: no device 'dev-nope'"),
        (
            [
                "model",
                "publish",
                str(tmp_path / "missing.tflite"),
                "--name",
                "digits",
                "--version",
                "2",
                "--labels",
                str(labels),
            ],
            "cannot read",
        ),
    ):
        code, _, err = run_cli(capsys, *with_server(server, *argv))
        assert code == 1 and words in err, (argv, err)
        assert len(err.strip().splitlines()) == 1


def test_token_sources_and_auth_errors(
    capsys: pytest.CaptureFixture[str],
    module_server: ServerHandle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    base = ["--server", module_server.url]
    code, _, err = run_cli(capsys, *base, "model", "list")
    assert code == 1 and "no operator token" in err
    token_file = tmp_path / "token"
    token_file.write_text(module_server.operator_token + "\n")
    assert run_cli(capsys, *base, "--token-file", str(token_file), "model", "list")[0] == 0
    code, _, err = run_cli(capsys, *base, "--token-file", str(tmp_path / "nope"), "model", "list")
    assert code == 1 and "cannot read token file" in err
    monkeypatch.setenv(TOKEN_ENV, module_server.operator_token)
    assert run_cli(capsys, *base, "device", "list")[0] == 0
    code, _, err = run_cli(capsys, *base, "--token", "wrong", "device", "list")
    assert (
        code == 1
        and err.strip() == "edgefleet: error: server answered 401: operator token is invalid"
    )


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["model"],
        ["assign", "digits@1"],
        ["assign", "digits@1", "--device", "a", "--tag", "b=c"],
        ["model", "publish", "x.tflite", "--name", "n", "--version", "one", "--labels", "l"],
        ["frobnicate"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "usage: edgefleet" in err, argv


def test_connection_refused_is_one_clear_line(free_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != SERVER_ENV}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "--server",
            f"http://127.0.0.1:{free_port}",
            "--token",
            "t",
            "device",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"edgefleet: error: cannot connect to the server at http://127.0.0.1:{free_port} "
        "(is edgefleet-server running?)"
    )


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port

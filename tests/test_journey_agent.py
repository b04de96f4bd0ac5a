"""The agent's first steps as an operator takes them: list the profiles, enroll as the README
says, choose a profile when detection cannot, and a second agent on one host.

Everything runs the real ``edgefleet-agent`` CLI (``agent.cli.main``) against a real server.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from fleet_helpers import BOARDS

from agent.cli import main as agent_main
from agent.config import STATE_DIRECTORY_ENV, load_config
from agent.identity import load_identity
from agent.profiles.schema import PROFILES_DIR_ENV, SHIPPED_PROFILES_DIR
from server.app import ServerHandle

README = Path(__file__).resolve().parent.parent / "README.md"
SHIPPED = sorted(p.stem for p in SHIPPED_PROFILES_DIR.glob("*.toml"))


@pytest.fixture
def server(server_factory: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    return server_factory(tmp_path / "server")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = agent_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def readme_enroll_command() -> list[str]:
    """The ``edgefleet-agent enroll`` command of the README, continuation lines joined."""
    text = README.read_text().replace("\\\n", " ")
    lines = [
        line for line in text.splitlines() if line.strip().startswith("edgefleet-agent enroll")
    ]
    assert lines, "the README shows no `edgefleet-agent enroll` command"
    return shlex.split(lines[0], comments=True)[1:]


def with_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the README's placeholder values of these options replaced."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word in values:
            out[i + 1] = values[word]
    return out


def devices(server: ServerHandle) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.operator_token}"}
    resp = requests.get(f"{server.url}/api/v1/devices", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    result: list[dict[str, Any]] = resp.json()
    return result


def enroll_argv(server: ServerHandle, *extra: str) -> list[str]:
    root = server.repo.metadata_dir / "1.root.json"
    token = server.config.enrollment_tokens[0]
    return ["enroll", "--server", server.url, "--token", token, "--root", str(root), *extra]


# --- edgefleet-agent profiles ----------------------------------------------------------------


def test_profiles_lists_every_shipped_profile_and_marks_this_board(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PROFILES_DIR_ENV, raising=False)
    assert len(SHIPPED) >= 8
    code, out, _ = run(capsys, "profiles", "--json", "--hw-root", str(BOARDS / "rpi5"))
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == SHIPPED
    assert [r["name"] for r in rows if r["detected"]] == ["rpi5"]
    rpi5 = next(r for r in rows if r["name"] == "rpi5")
    assert rpi5["power"] == "rpi5_pmic" and rpi5["variant_preference"] == ["int8-cpu"]
    assert all(Path(r["source"]).parent == SHIPPED_PROFILES_DIR for r in rows)

    code, out, _ = run(capsys, "profiles", "--hw-root", str(BOARDS / "rpi5"))
    assert code == 0
    marked = [line.split()[1] for line in out.splitlines() if line.startswith("*")]
    assert marked == ["rpi5"] and out.rstrip().endswith("this board: rpi5 (marked *)")
    assert all(name in out for name in SHIPPED)


def test_profiles_says_how_to_choose_when_no_profile_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "profiles", "--hw-root", str(BOARDS / "rpi3-unsupported"))
    assert code == 0 and "no firmware profile matches this board" in out
    assert "--profile NAME" in out and not re.search(r"^\*", out, re.MULTILINE)
    code, out, _ = run(capsys, "profiles", "--json", "--hw-root", str(BOARDS / "rpi3-unsupported"))
    assert code == 0 and not any(r["detected"] for r in json.loads(out))


# --- the README's enroll command ---------------------------------------------------------------


def test_the_readme_enroll_command_works_as_written(
    server: ServerHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No config exists yet: enroll writes it, with the state under systemd's StateDirectory
    (``$STATE_DIRECTORY`` stands in for /var/lib/edgefleet here)."""
    config = tmp_path / "etc" / "edgefleet" / "agent.toml"
    state = tmp_path / "var" / "lib" / "edgefleet"
    monkeypatch.setenv(STATE_DIRECTORY_ENV, str(state))
    monkeypatch.delenv(PROFILES_DIR_ENV, raising=False)
    argv = with_values(
        readme_enroll_command(),
        {
            "--server": server.url,
            "--token": server.config.enrollment_tokens[0],
            "--root": str(server.repo.metadata_dir / "1.root.json"),
            "--config": str(config),
        },
    )
    assert argv[0] == "enroll" and "--config" in argv and "--state-dir" not in argv
    code, out, err = run(capsys, *argv)
    if code != 0:
        # This host is no camera board: the error must say how to choose, as the README does.
        assert "--profile NAME" in err and "--state-dir" not in err, err
        assert not config.exists() and devices(server) == []
        code, out, err = run(capsys, *argv, "--profile", "x86-gateway")
    assert code == 0, err
    assert out.startswith("enrolled as dev-") and str(state) in out
    cfg = load_config(config)
    assert cfg.state_dir == state and cfg.server == server.url
    identity = load_identity(state)
    assert [d["id"] for d in devices(server)] == [identity.device_id]

    # The daemon's own command reads the config that enroll wrote.
    code, out, err = run(capsys, "status", "--config", str(config))
    assert code == 0, err
    assert json.loads(out)["device_id"] == identity.device_id


def test_a_profile_that_cannot_be_detected_is_chosen_with_profile(
    server: ServerHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Profiles that match no machine, so detection fails on any host the tests run on.
    only = tmp_path / "profiles"
    only.mkdir()
    text = (SHIPPED_PROFILES_DIR / "rpi4.toml").read_text()
    text = text.replace('name = "rpi4"', 'name = "nowhere"')
    text = re.sub(r"device_tree_model = \[.*\]", 'device_tree_model = ["No Such Board"]', text)
    (only / "nowhere.toml").write_text(text)
    monkeypatch.setenv(PROFILES_DIR_ENV, str(only))
    config = tmp_path / "agent.toml"
    monkeypatch.setenv(STATE_DIRECTORY_ENV, str(tmp_path / "state"))

    code, _, err = run(capsys, *enroll_argv(server, "--config", str(config)))
    assert code == 2
    assert err.count("\n") == 1 and "no firmware profile matches this board" in err
    assert "--profile NAME" in err and "known: nowhere" in err
    assert "Set 'profile' in the agent configuration" not in err  # there is none yet
    assert not config.exists() and devices(server) == []

    code, _, err = run(
        capsys, *enroll_argv(server, "--config", str(config), "--profile", "nowhere")
    )
    assert code == 0, err
    assert load_config(config).profile == "nowhere"
    assert [d["profile"] for d in devices(server)] == ["nowhere"]

    # An existing config whose profile is "auto": both ways to choose are named.
    config.write_text(config.read_text().replace('profile = "nowhere"', 'profile = "auto"'))
    code, _, err = run(capsys, *enroll_argv(server, "--config", str(config), "--replace"))
    assert code == 2 and "--profile NAME" in err and f"set 'profile' in {config}" in err


# --- a second agent with the same hardware id ----------------------------------------------------


def test_a_second_agent_with_the_same_hardware_id_is_refused_unless_replace(
    server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def enroll(name: str, profile: str, *extra: str) -> tuple[int, str, str]:
        argv = enroll_argv(
            server, "--state-dir", str(tmp_path / name), "--hardware-id", "hw-shared",
            "--profile", profile, "--tag", f"cam={name}", *extra,
        )  # fmt: skip
        return run(capsys, *argv)

    code, _, err = enroll("first", "rpi4")
    assert code == 0, err
    first = load_identity(tmp_path / "first")

    code, _, err = enroll("second", "x86-gateway")
    assert code == 2 and err.count("\n") == 1
    assert "409" in err and "already enrolled as " + first.device_id in err
    assert "--replace" in err and "--hardware-id" in err
    [device] = devices(server)
    assert (device["profile"], device["tags"]) == ("rpi4", {"cam": "first"})  # untouched

    # Taking it over needs the first's token (which the second lacks) or the operator's word.
    code, _, err = enroll("second", "x86-gateway", "--replace")
    assert code == 2 and "409" in err and "approve-reenroll" in err
    approve = f"{server.url}/api/v1/devices/{first.device_id}/reenroll-approval"
    auth = {"Authorization": f"Bearer {server.operator_token}"}
    assert requests.post(approve, json={}, headers=auth, timeout=10).status_code == 200
    code, _, err = enroll("second", "x86-gateway", "--replace")
    assert code == 0, err
    second = load_identity(tmp_path / "second")
    assert second.device_id == first.device_id and second.device_token != first.device_token
    [device] = devices(server)
    assert (device["profile"], device["tags"]) == ("x86-gateway", {"cam": "second"})
    checkin = f"{server.url}/api/v1/devices/{first.device_id}/checkin"
    body = {"state": "idle", "agent_version": "0.1.0"}
    for token, status in ((first.device_token, 401), (second.device_token, 200)):
        headers = {"Authorization": f"Bearer {token}"}
        assert requests.post(checkin, json=body, headers=headers, timeout=10).status_code == status

"""The shipped systemd units: the settings the agent's watchdog and hardening rely on."""

from __future__ import annotations

import configparser
import secrets
import shlex
from pathlib import Path

import pytest

from agent.cli import build_parser as agent_parser
from server.errors import ConfigError
from server.main import build_parser as server_parser
from server.main import config_from_args

UNITS = Path(__file__).resolve().parent.parent / "systemd"
HARDENING = ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp", "StateDirectory")


def load(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text().replace("\\\n", " "))
    return parser


def exec_args(unit: configparser.RawConfigParser) -> list[str]:
    return shlex.split(unit["Service"]["ExecStart"])[1:]


def test_agent_unit_is_notify_with_watchdog_and_hardened() -> None:
    unit = load("edgefleet-agent.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"].rstrip("s")) >= 10
    assert service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict"
    for key in HARDENING:
        assert key in service, key
    args = agent_parser().parse_args(exec_args(unit))
    assert args.command == "run" and args.config == "/etc/edgefleet/agent.toml"


def test_server_unit_takes_its_token_as_a_credential() -> None:
    unit = load("edgefleet-server.service")
    service = unit["Service"]
    assert service["LoadCredential"].startswith("operator-token:")
    for key in HARDENING:
        assert key in service, key
    args = server_parser().parse_args(exec_args(unit))
    assert args.command == "run"
    assert str(args.operator_token_file).endswith("/operator-token")


@pytest.mark.parametrize("name", ["edgefleet-agent.service", "edgefleet-server.service"])
def test_units_name_their_install_target(name: str) -> None:
    assert load(name)["Install"]["WantedBy"] == "multi-user.target"


def test_operator_token_file_is_read_and_an_empty_one_refused(tmp_path: Path) -> None:
    token = tmp_path / "operator-token"
    secret = secrets.token_urlsafe(16)
    token.write_text(secret + "\n")
    args = server_parser().parse_args(
        ["run", "--data", str(tmp_path), "--operator-token-file", str(token)]
    )
    assert config_from_args(args).operator_token == secret
    token.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config_from_args(args)
    args = server_parser().parse_args(
        ["run", "--data", str(tmp_path), "--operator-token-file", "/nonexistent"]
    )
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(args)

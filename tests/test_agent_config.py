"""Agent TOML config: strict validation with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from agent.config import AgentConfig, load_config, render_config
from agent.daemon import capture_options


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults_and_relative_state_dir(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, '[agent]\nstate_dir = "state"\n[update]\npoll_interval_s = 5\n')
    )
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.update.poll_interval_s == 5.0
    assert cfg.inference.frames == "synthetic"
    assert cfg.camera.stall_after_s == 10.0 and cfg.camera.rtsp_transport == "tcp"


def test_camera_table_reaches_the_capture_options(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[agent]\nstate_dir = "s"\n[camera]\n'
                                      'stall_after_s = 3\nrtsp_transport = "udp"\n'))
    options = capture_options(cfg)
    assert (options.stall_after_s, options.rtsp_transport) == (3.0, "udp")


def test_render_round_trips(tmp_path: Path) -> None:
    cfg = AgentConfig(state_dir=tmp_path / 'we"ird', server="http://127.0.0.1:1")
    assert load_config(write(tmp_path, render_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\n", "state_dir is required"),
        ('[agent]\nstate_dir = "s"\nsevrer = "x"\n', "unknown key.*sevrer"),
        ('[agent]\nstate_dir = "s"\n[inference]\ntop_k = "3"\n', "top_k must be int"),
        (
            '[agent]\nstate_dir = "s"\n[update]\npoll_interval_s = -1\n',
            "poll_interval_s must be positive",
        ),
        ('[agent]\nstate_dir = "s"\nserver = "ftp://x"\n', "http"),
        ('[agent]\nstate_dir = "s"\n[bogus]\n', "unknown table"),
        ('[agent]\nstate_dir = "s"\nlog_level = "loud"\n', "log_level"),
        ("[agent\n", "not valid TOML"),
        ('[agent]\nstate_dir = "s"\n[inference]\nnum_threads = true\n', "num_threads must be int"),
        ('[agent]\nstate_dir = "s"\nmqtt_ca_file = "/nonexistent/ca.pem"\n', "mqtt_ca_file"),
        ('[agent]\nstate_dir = "s"\n[camera]\nstall_after_s = 0\n', "stall_after_s must be"),
        ('[agent]\nstate_dir = "s"\n[camera]\nrtsp_transport = "http"\n', "tcp or udp"),
        ('[agent]\nstate_dir = "s"\n[camera]\nread_timeout = 3\n', "unknown key.*read_timeout"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)

"""Server settings that shape the fleet: presence with pushes, and bounded delta workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import PUSH_POLL_INTERVAL_S, ServerConfig
from server.errors import ConfigError


def resolved(tmp_path: Path, **kw: float) -> ServerConfig:
    return ServerConfig(data_dir=tmp_path, **kw).resolve()  # type: ignore[arg-type]


def test_with_pushes_the_quarter_hour_poll_does_not_stretch_presence(tmp_path: Path) -> None:
    cfg = resolved(tmp_path)
    assert cfg.poll_interval_s == PUSH_POLL_INTERVAL_S
    # Telemetry windows and the MQTT will keep presence current; 120 s, not 45 min.
    assert cfg.presence_window_s == cfg.online_window_s == 120.0


@pytest.mark.parametrize(("poll", "expected"), [(30.0, 120.0), (100.0, 300.0)])
def test_without_pushes_presence_covers_three_check_ins(
    tmp_path: Path, poll: float, expected: float
) -> None:
    cfg = resolved(tmp_path, push_rate_per_s=0.0, poll_interval_s=poll)
    assert cfg.presence_window_s == expected


def test_delta_workers_are_bounded(tmp_path: Path) -> None:

    assert resolved(tmp_path, delta_workers=0).delta_workers == 0  # this server builds none
    with pytest.raises(ConfigError, match="delta_workers"):
        resolved(tmp_path, delta_workers=-1)

"""Who counts as online: a dead camera must not look alive for a whole fallback poll."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import PUSH_POLL_INTERVAL_S, ServerConfig


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

"""``edgefleet-agent``'s console-script entry point: one line naming the ``agent`` extra
when it is not installed, instead of a traceback from the daemon's imports."""

from __future__ import annotations

from collections.abc import Callable

from agent.common.extras import run_entry


def _agent() -> Callable[[], int]:
    from agent.cli import main  # noqa: PLC0415 - imports paho-mqtt, tuf, numpy

    return main


def main() -> int:
    return run_entry("edgefleet-agent", _agent)

"""Console-script entry points of the server distribution's programs.

They import the programs lazily, so an install without the ``server`` extra gets one
line naming it (``agent.common.extras``) instead of a traceback from ``import fastapi``.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.common.extras import run_entry


def _server() -> Callable[[], int]:
    from server.main import main  # noqa: PLC0415 - imports fastapi, sqlalchemy, uvicorn

    return main


def _operator() -> Callable[[], int]:
    from server.cli import main  # noqa: PLC0415 - some commands import server packages

    return main


def server_main() -> int:
    """``edgefleet-server``."""
    return run_entry("edgefleet-server", _server)


def operator_main() -> int:
    """``edgefleet``, the operator CLI."""
    return run_entry("edgefleet", _operator)

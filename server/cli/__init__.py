"""``edgefleet``: the operator CLI, one module per command group.

Each module in ``COMMAND_MODULES`` adds its subcommands through
``add_commands(subparsers)``, with the helpers in ``server.cli.common``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server import __version__
from server.cli.common import DEFAULT_SERVER, SERVER_ENV, TOKEN_ENV
from server.errors import ServerError

#: The modules whose ``add_commands(subparsers)`` make up the CLI, in help order.
COMMAND_MODULES: list[str] = [
    "server.cli.models",
    "server.cli.root",
    "server.cli.quantize",
    "server.cli.devices",
    "server.cli.bandwidth",
    "server.cli.accuracy",
    "server.cli.telemetry",
    "server.cli.delta",
    "server.cli.mqtt",
    "server.cli.rollout",
    "server.cli.watch",
    "server.cli.simulate",
]


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description="EdgeFleet operator CLI")
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"fleet server URL (default ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", help=f"operator token (default ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, help="read the operator token from a file")
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout in seconds")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules if modules is not None else COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ServerError as err:  # CliError included
        print(f"edgefleet: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgefleet model list | head`: the reader left, not an error
        _quiet_stdout()
        return 0
    return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())

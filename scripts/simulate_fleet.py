#!/usr/bin/env python3
"""Run a simulated fleet: a thin entry point for ``edgefleet simulate``.

Example (a server on 127.0.0.1:8080, release 2 made 40% slower on Orin Nanos):

    scripts/simulate_fleet.py --server http://127.0.0.1:8080 --enroll-token TOKEN \\
        --devices 500 --effect 2:jetson-orin-nano:latency=1.4 --seed 7
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from server.cli import main as cli_main

_GLOBAL = ("--server", "--timeout")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # `edgefleet` takes --server and --timeout before the command; accept them anywhere.
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in _GLOBAL:
            take = 1 if "=" in args[i] else 2
            front += args[i : i + take]
            i += take
        else:
            rest.append(args[i])
            i += 1
    return cli_main([*front, "simulate", *rest])


if __name__ == "__main__":
    sys.exit(main())

"""``edgefleet rollout watch ID``: a live view of one rollout, for a person or a script.

It redraws ``rollout status`` (``server.cli.rollout.status_text``) every
``--interval`` seconds and exits when the rollout needs nobody any more (0,
completed) or needs someone (3: paused, with the tripped gate's reason, or
aborted or reverted), so `edgefleet rollout watch ID && next-step` chains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from server.cli.common import api_from, command_parser, group
from server.cli.rollout import status_text

# `rollout watch` exit statuses: done and good, or stopped for a person to look.
WATCH_COMPLETED = 0
WATCH_STOPPED = 3
_STOPPED_STATES = ("paused", "aborted", "reverted")
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"--interval {text!r} must be 0.05..3600 seconds")
    return value


def _watch(args: argparse.Namespace) -> None:
    """Redraw the status every ``--interval`` seconds until the rollout needs nobody or someone.

    On a terminal the screen is redrawn; into a pipe or file only changes are
    printed, so a log of a long rollout holds each step once. ``--json`` prints
    one JSON document per line per change.
    """
    api = api_from(args)
    tty = sys.stdout.isatty()
    last = None
    while True:
        out = api.get(f"/api/v1/rollouts/{args.id}")
        if getattr(args, "json", False):
            shown = json.dumps(out, sort_keys=True)
        else:
            shown = status_text(out)
        if tty and not getattr(args, "json", False):
            stamp = time.strftime("%H:%M:%S")
            print(f"{_CLEAR}every {args.interval:g}s, {stamp} (Ctrl-C to stop watching)\n"
                  f"{shown}", flush=True)  # fmt: skip
        elif shown != last:
            print(shown if last is None or getattr(args, "json", False) else f"\n{shown}",
                  flush=True)  # fmt: skip
        last = shown
        state = out["state"]
        if state == "completed":
            print(f"rollout {args.id} completed", file=sys.stderr)
            return
        if state in _STOPPED_STATES:
            why = out.get("paused_reason") or out.get("reason") or "no reason recorded"
            print(f"rollout {args.id} {state}: {why}", file=sys.stderr)
            raise SystemExit(WATCH_STOPPED)
        time.sleep(args.interval)


def add_commands(subparsers: Any) -> None:
    rollout = group(subparsers, "rollout", "staged rollouts with health gates")
    p = command_parser(
        rollout, "watch",
        "redraw the status until the rollout completes (exit 0) or pauses, aborts or reverts "
        "(exit 3, with the reason)",
        _watch,
    )  # fmt: skip
    p.add_argument("id")
    p.add_argument("--interval", type=_positive_seconds, default=2.0, metavar="SECONDS",
                   help="seconds between redraws (default 2)")  # fmt: skip

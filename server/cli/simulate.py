"""``edgefleet simulate``: run N simulated devices against a fleet server.

The devices enroll with an enrollment token, check in, install what the
director assigns (TUF-verified once for the whole fleet), report every
update step and publish telemetry, with per-profile and per-release
behaviour from ``--profile`` and ``--effect``. They check in when the server
pushes a ``checkin`` command on their MQTT ``cmd`` topic (their own session,
or ``--relay-mqtt`` for those without one), conditionally (If-None-Match), and
otherwise poll at the interval the server advertises. Each device fetches its
own TUF metadata and target bytes, from the server or ``--artifacts-url``. It prints a progress line
every ``--report-every`` seconds and a final summary (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.protocol.api import MqttCredentials
from server.cli.common import CliError, command_parser, emit
from server.config import parse_mqtt_url
from server.errors import ConfigError, InvalidInputError
from server.simulator import Fleet, Report, SimConfig, WindowSpec, build_behaviour
from server.simulator.plan import EVENT_ROUTES, FAIL_STEPS

ENROLLMENT_TOKEN_ENV = "EDGEFLEET_ENROLLMENT_TOKEN"  # noqa: S105 - a variable name


def _relay(url: str | None) -> MqttCredentials | None:
    if not url:
        return None
    try:
        endpoint = parse_mqtt_url(url)
    except ConfigError as err:  # its message would repeat the URL, password and all
        raise CliError("--relay-mqtt must look like mqtt://[user:pass@]host[:port]") from err
    return MqttCredentials(
        endpoint.host, endpoint.port, endpoint.username or "", endpoint.password or "", endpoint.tls
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        devices=args.devices,
        prefix=args.prefix,
        stores=args.stores,
        regions=args.regions,
        http_connections=args.connections,
        poll_s=args.poll,
        mqtt_devices=args.mqtt_devices,
        events=args.events,
        fail_step=args.fail_step,
        step_s=args.step,
        telemetry=WindowSpec(window_s=args.window),
        artifacts_url=args.artifacts_url,
        download_connections=args.download_connections,
        relay=_relay(args.relay_mqtt),
        first_checkin_s=args.first_checkin,
    )


async def _wait(args: argparse.Namespace, fleet: Fleet) -> None:
    """Until ``--duration`` is over or Ctrl-C, with a progress line now and then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration if args.duration else None
    every = args.report_every or 3600.0
    quiet = getattr(args, "json", False) or not args.report_every
    try:
        while deadline is None or loop.time() < deadline:
            left = every if deadline is None else min(every, deadline - loop.time())
            await asyncio.sleep(max(0.0, left))
            if not quiet:
                print(fleet.report().summary(), file=sys.stderr, flush=True)
    except asyncio.CancelledError:  # Ctrl-C: stop and still print the summary
        pass


async def _run(args: argparse.Namespace, token: str, cache: Path) -> Report:
    behaviour = build_behaviour(args.profile, args.effect, args.seed)
    root = None
    if args.root is not None:
        try:
            root = Path(args.root).read_bytes()
        except OSError as err:
            raise CliError(f"cannot read {args.root}: {err.strerror}") from err
    fleet = Fleet(args.server, config_from_args(args), behaviour, cache, pinned_root=root)
    try:
        await fleet.enroll(token)
        await fleet.start()
        await _wait(args, fleet)
    finally:
        report = fleet.report()
        await fleet.stop()
    return report


def _simulate(args: argparse.Namespace) -> None:
    token = args.enroll_token or os.environ.get(ENROLLMENT_TOKEN_ENV, "")
    if not token:
        raise CliError(f"no enrollment token: pass --enroll-token or set ${ENROLLMENT_TOKEN_ENV}")
    try:
        with contextlib.ExitStack() as stack:
            cache = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            report = asyncio.run(_run(args, token, Path(cache)))
    except InvalidInputError as err:
        raise CliError(str(err)) from err
    emit(args, report.to_json(), report.summary)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def add_commands(subparsers: Any) -> None:
    p = command_parser(
        subparsers, "simulate", "run a simulated fleet against the server", _simulate
    )
    p.add_argument("--devices", type=_positive(int), default=100, help="how many (default 100)")
    p.add_argument("--enroll-token", help=f"enrollment token (default ${ENROLLMENT_TOKEN_ENV})")
    p.add_argument("--root", type=Path, help="trusted TUF root.json (default: trust on first use)")
    p.add_argument(
        "--prefix",
        default="sim",
        help="hardware ids are PREFIX-000001...; also the fleet=PREFIX tag",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="a simulated profile and its behaviour, e.g. rpi4:weight=2,p95_ms=38 "
        "(keys weight, p95_ms, power_mw, power_source, install_failure, "
        "accuracy, silence, jitter; repeatable; default: a mixed fleet)",
    )
    p.add_argument(
        "--effect",
        action="append",
        default=[],
        metavar="REL[:PROFILE]:k=v,...",
        help="what a release does, e.g. 2:jetson-orin-nano:latency=1.4 (keys "
        "latency, power: multipliers; install_failure, accuracy, silence: "
        "fractions; repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="makes every random choice repeatable")
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    p.add_argument(
        "--poll",
        type=_positive(float),
        help="check-in interval in seconds (default: what the server says)",
    )
    p.add_argument(
        "--mqtt-devices", type=int, help="only this many devices get an MQTT link (default: all)"
    )
    p.add_argument(
        "--events",
        choices=EVENT_ROUTES,
        default="both",
        help="how MQTT-linked devices report update events (default both, as the agent)",
    )
    p.add_argument(
        "--fail-step",
        choices=FAIL_STEPS,
        default="smoke_test",
        help="the update step a simulated install failure strikes",
    )
    p.add_argument("--step", type=float, default=0.0, help="seconds each update step takes")
    p.add_argument(
        "--window",
        type=_positive(float),
        default=10.0,
        help="telemetry window in seconds (default 10)",
    )
    p.add_argument("--stores", type=_positive(int), default=50)
    p.add_argument("--regions", type=_positive(int), default=5)
    p.add_argument(
        "--connections",
        type=_positive(int),
        default=32,
        help="HTTP connections shared by the fleet (default 32)",
    )
    p.add_argument(
        "--artifacts-url",
        help="base URL of /tuf/metadata/ and /tuf/targets/ (a static host; default: --server)",
    )
    p.add_argument(
        "--download-connections",
        type=_positive(int),
        default=16,
        help="HTTP connections for the devices' metadata and target downloads (default 16)",
    )
    p.add_argument(
        "--relay-mqtt",
        metavar="URL",
        help="mqtt://[user:pass@]host:port with the right to read every cmd topic: one shared "
        "session hands commands to devices without their own (default: they only poll)",
    )
    p.add_argument(
        "--first-checkin",
        type=float,
        help="spread the first check-ins over this many seconds (default: the poll interval or 30)",
    )
    p.add_argument("--cache-dir", type=Path, help="where verified targets are kept")
    p.add_argument(
        "--report-every",
        type=float,
        default=10.0,
        help="print a progress line this often (0: only at the end)",
    )

"""``edgefleet mqtt export-acl DIR``: Mosquitto password and ACL files for the fleet.

It asks the server (operator token, like every other command) rather than
opening the database itself, so it works from an operator's workstation, with
PostgreSQL credentials never leaving the server. Output: ``DIR/passwd``
(0600: it holds password hashes) and ``DIR/acl``, each replaced atomically;
then reload Mosquitto with ``kill -HUP``. A fleet Mosquitto wants::

    allow_anonymous false
    password_file DIR/passwd
    acl_file DIR/acl
    persistence true            # the ingest's queued messages survive a restart
    max_queued_messages 0       # never drop QoS 1 messages queued for the ingest
    max_inflight_messages 1000

and the server started with ``--mqtt-url mqtt://INGEST_USER:PASSWORD@HOST``
(add ``--ingest-ack-after-commit`` once ``max_queued_messages`` is 0);
that user's line is exported too. Re-run after enrolling devices: an
unchanged fleet gives byte-identical files, so a cron job can diff first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.common.atomic import atomic_write
from server.cli.common import CliError, api_from, command_parser, emit, group

PASSWD_MODE = 0o600
ACL_MODE = 0o644


def _text(out: Any, key: str) -> str:
    value = out.get(key) if isinstance(out, dict) else None
    if not isinstance(value, str):
        raise CliError(f"server reply has no {key!r} text; is the server up to date?")
    return value


def _export_acl(args: argparse.Namespace) -> None:
    out = api_from(args).get("/api/v1/mqtt/broker-files")
    passwd, acl = _text(out, "passwd"), _text(out, "acl")
    directory = Path(args.dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / args.passwd_name, passwd.encode(), mode=PASSWD_MODE)
        atomic_write(directory / args.acl_name, acl.encode(), mode=ACL_MODE)
    except OSError as err:
        raise CliError(f"cannot write to {directory}: {err.strerror}") from err
    for warning in out.get("warnings") or []:
        print(f"edgefleet: warning: {warning}", file=sys.stderr)
    summary = {
        "passwd": str(directory / args.passwd_name),
        "acl": str(directory / args.acl_name),
        "devices": out.get("devices"),
        "ingest_user": out.get("ingest_user"),
    }
    emit(
        args,
        summary,
        f"wrote {summary['devices']} devices and ingest user {summary['ingest_user']} to "
        f"{summary['passwd']} and {summary['acl']}; reload Mosquitto with kill -HUP",
    )


def add_commands(sub: Any) -> None:
    mqtt = group(sub, "mqtt", "MQTT broker integration")
    p = command_parser(
        mqtt, "export-acl", "write Mosquitto password and ACL files for the fleet", _export_acl
    )
    p.add_argument("dir", type=Path, help="directory for the files (created if missing)")
    p.add_argument("--passwd-name", default="passwd", help="password file name (default passwd)")
    p.add_argument("--acl-name", default="acl", help="ACL file name (default acl)")

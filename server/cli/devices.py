"""``edgefleet device``, ``assign`` and ``token``: the inventory and what it should run.

``device approve-reenroll`` is how an operator lets a device that lost its token
(a reflashed board) enroll again under its old id. Operator-forced credential
rotation is deliberately absent: the device could not learn the new secret. The
device rotates its own (``edgefleet-agent rotate-credentials``); to force new
credentials on a device that cannot, approve a re-enrollment and re-enroll it.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from server.cli.common import CliError, api_from, command_parser, emit, group, table
from server.cli.telemetry import latest_lines
from server.rollout.core.units import parse_duration

MAX_APPROVAL_TTL = timedelta(days=7)  # as server.db.device_credentials.MAX_APPROVAL_TTL_S

_DEVICE_COLUMNS = [
    ("DEVICE", "id"),
    ("PROFILE", "profile"),
    ("STATE", "state"),
    ("MODEL", "model"),
    ("TAGS", "tag_list"),
    ("LAST SEEN", "last_seen"),
]


def _device_row(d: dict[str, Any]) -> dict[str, Any]:
    inst = d.get("installed")
    model = f"{inst['name']}@{inst['release']} {inst['variant']}" if inst else "-"
    tags = ",".join(f"{k}={v}" for k, v in sorted(d.get("tags", {}).items()))
    return {**d, "model": model, "tag_list": tags or "-"}


def _device_list(args: argparse.Namespace) -> None:
    devices = api_from(args).get("/api/v1/devices", tag=args.tag)
    emit(args, devices, lambda: table([_device_row(d) for d in devices], _DEVICE_COLUMNS))


def _device_show(args: argparse.Namespace) -> None:
    device = api_from(args).get(f"/api/v1/devices/{args.id}")

    def text() -> str:
        row = _device_row(device)
        desired = device.get("desired")
        lines = [
            f"{k:<14}{row.get(k2)}"
            for k, k2 in (
                ("device", "id"),
                ("hardware id", "hardware_id"),
                ("profile", "profile"),
                ("state", "state"),
                ("model", "model"),
                ("tags", "tag_list"),
                ("agent", "agent_version"),
                ("last seen", "last_seen"),
            )
        ]
        lines.append(
            f"{'desired':<14}"
            + (f"{desired['name']}@{desired['release']} {desired['variant']}" if desired else "-")
        )
        # The newest window as readable lines; history: edgefleet telemetry ID.
        lines += latest_lines(device)
        state = (device.get("telemetry", {}).get("state") or {}).get("payload") or {}
        if state:
            lines.append(f"{'connection':<14}{state.get('status', '-')}")
        lines.extend(
            f"event         {e['time']} {e['type']} {e.get('state') or ''}".rstrip()
            for e in device.get("events", [])
        )
        return "\n".join(lines)

    emit(args, device, text)


def _device_delete(args: argparse.Namespace) -> None:
    gone = api_from(args).request("DELETE", f"/api/v1/devices/{args.id}")
    emit(
        args,
        gone,
        f"deleted device {gone['id']} (hardware id {gone['hardware_id']}, profile "
        f"{gone['profile']}); its token and MQTT password no longer work",
    )


def _approve_reenroll(args: argparse.Namespace) -> None:
    ttl = parse_duration(args.ttl, "--ttl", longest=MAX_APPROVAL_TTL)
    out = api_from(args).post(
        f"/api/v1/devices/{args.id}/reenroll-approval", {"ttl_s": ttl.total_seconds()}
    )
    emit(
        args,
        out,
        f"device {out['device_id']} may re-enroll once (edgefleet-agent enroll --replace) "
        f"until {out['expires_at']}; its current credentials stop working when it does",
    )


def _assign(args: argparse.Namespace) -> None:
    name, sep, version = args.release.partition("@")
    if not sep or not version.isdigit():
        raise CliError(f"release {args.release!r} must look like NAME@VERSION, e.g. digits@2")
    body: dict[str, Any] = {"name": name, "release": int(version)}
    if args.device:
        body["device_id"] = args.device
    else:
        body["tag"] = args.tag
    out = api_from(args).post("/api/v1/assignments", body)
    emit(args, out, f"assigned {name}@{version} to {out['target_kind']} {out['target_value']}")


def _token_create(args: argparse.Namespace) -> None:
    body = {
        k: v
        for k, v in (
            ("max_uses", args.max_uses),
            ("expires_in_s", args.expires_in),
            ("note", args.note),
        )
        if v is not None
    }
    out = api_from(args).post("/api/v1/enrollment-tokens", body)
    emit(args, out, out["token"])


def add_commands(sub: Any) -> None:
    device = group(sub, "device", "device inventory")
    p = command_parser(device, "list", "list devices", _device_list)
    p.add_argument("--tag", help="only devices with this key=value tag")
    p = command_parser(device, "show", "one device with telemetry and events", _device_show)
    p.add_argument("id")
    p = command_parser(
        device, "delete", "forget a device and revoke its credentials", _device_delete
    )
    p.add_argument("id")
    p = command_parser(
        device,
        "approve-reenroll",
        "let a device that lost its token enroll again under its id, once",
        _approve_reenroll,
    )
    p.add_argument("id")
    p.add_argument("--ttl", default="1h", help="how long the approval stays open (default 1h)")

    p = command_parser(sub, "assign", "assign a release to a device or a tag", _assign)
    p.add_argument("release", metavar="NAME@VERSION")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID")
    target.add_argument("--tag", metavar="KEY=VALUE")

    token = group(sub, "token", "enrollment tokens")
    p = command_parser(token, "create", "create an enrollment token", _token_create)
    p.add_argument("--max-uses", type=int)
    p.add_argument("--expires-in", type=float, metavar="SECONDS")
    p.add_argument("--note")

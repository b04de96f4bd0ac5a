"""``edgefleet rollout``: create, watch and steer staged rollouts.

Every option is passed to the server as text and checked there
(``server.rollout.core.options.build_spec``), so the CLI and the REST API refuse bad
input with the same message.
"""

from __future__ import annotations

import argparse
from typing import Any

from server.cli.common import CliError, api_from, command_parser, emit, group, table

_GATE_OFF = "off"
_STAGE_COLUMNS = (
    ("STAGE", "stage"),
    ("SIZE", "size"),
    ("STATE", "state"),
    ("DEVICES", "devices"),
    ("STARTED", "started"),
    ("IN FLIGHT", "in_flight"),
    ("SUCCEEDED", "succeeded"),
    ("FAILED", "failed"),
    ("SILENT", "silent"),
    ("SOAK", "soak"),
)
_GATE_COLUMNS = (
    ("GATE", "name"),
    ("PROFILE", "where"),
    ("VALUE", "shown"),
    ("LIMIT", "limit_text"),
    ("SAMPLE", "sample_text"),
    ("STATUS", "verdict"),
)
_LIST_COLUMNS = (
    ("ID", "id"),
    ("RELEASE", "release"),
    ("STATE", "state"),
    ("STAGE", "stage_text"),
    ("DEVICES", "devices"),
    ("UPDATED", "updated_at"),
    ("REASON", "short_reason"),
)
_DEVICE_COLUMNS = (
    ("DEVICE", "device_id"),
    ("STAGE", "stage_no"),
    ("STATUS", "status"),
    ("STARTED", "started_at"),
    ("PREVIOUS", "previous"),
    ("P95 MS", "p95"),
    ("BASE P95", "base_p95"),
    ("POWER MW", "power"),
    ("REASON", "reason"),
)


def _gate(value: str | None) -> str | None:
    """``off`` switches a gate off (sent as null)."""
    return None if value is None or value.lower() == _GATE_OFF else value


def _variants(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        profile, sep, variant = item.partition("=")
        if not sep or not profile or not variant:
            raise CliError(f"--variant {item!r} must look like PROFILE=VARIANT, e.g. rpi4=int8-cpu")
        out[profile] = variant
    return out


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "release": args.release,
        "select": args.select,
        "profiles": args.profile,
        "devices": args.device,
        "all_devices": args.all_devices,
        "stages": args.stages,
        "soak": args.soak,
        "timeout": args.stage_timeout,
        "success": args.success,
        "max_failure": args.max_failure,
        "max_install_failure": _gate(args.max_install_failure),
        "max_latency_regression": _gate(args.max_latency_regression),
        "max_power_regression": _gate(args.max_power_regression),
        "min_golden_accuracy": _gate(args.min_golden_accuracy),
        "max_device_errors": args.max_device_errors,
        "min_sample": args.min_sample,
        "latency_floor_ms": args.latency_floor_ms,
        "power_floor_mw": args.power_floor_mw,
        "gate_estimated_power": args.gate_estimated_power,
        "max_concurrent_downloads": args.max_downloads,
        "approval": args.approval,
        "variants": _variants(args.variant),
        "start": args.start,
    }
    if args.shadow_every is not None:
        body.update(
            shadow_every=args.shadow_every,
            min_shadow_agreement=args.min_shadow_agreement,
            shadow_min_frames=args.shadow_min_frames,
            shadow_cpu_budget=args.shadow_cpu_budget,
            shadow_duration=args.shadow_duration,
        )
    if args.window_cron is not None or args.window_duration is not None:
        body.update(
            window_cron=args.window_cron,
            window_duration=args.window_duration,
            window_timezone=args.window_tz,
        )
    return body


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}%" if unit == "%" else f"{value:g}"


def _gate_row(g: dict[str, Any]) -> dict[str, Any]:
    where = g.get("profile") or (f"stage {g['stage'] + 1}" if g.get("stage") is not None else "")
    if g.get("subject"):
        where = f"{where} {g['subject']}".strip()
    waiting = g.get("value") is None
    verdict = "TRIPPED" if g.get("tripped") else ("waiting" if waiting else "ok")
    return {
        **g,
        "where": where,
        "shown": _number(g.get("value"), g.get("unit", "")),
        "limit_text": f"{g.get('bound')} {_number(g.get('limit'), g.get('unit', ''))}",
        "sample_text": f"{g.get('sample')}/{g.get('needed')}",
        "verdict": verdict,
    }


def status_text(r: dict[str, Any]) -> str:
    """The human form of ``GET /api/v1/rollouts/{id}``."""
    lines = [
        f"rollout {r['id']}  {r['release']}  {r['state']}  stage {r['stage']}/{r['stages']}"
        f"  ({r['devices']} devices)",
        f"reason: {r['reason']}",
    ]
    if r.get("paused_reason"):
        lines.append(f"paused: {r['paused_reason']}")
        kept = r.get("paused_gates") or []
        if kept:
            lines += [
                "paused on (as measured then):",
                table([_gate_row(g) for g in kept], _GATE_COLUMNS),
            ]
    if r.get("shadow_phase"):
        lines.append(
            f"shadow phase: {r.get('shadowing', 0)} devices run the candidate beside their model;"
            " none installs until the shadow gates pass (see 'rollout shadow')"
        )
    lines += ["", table(r.get("stage_list", []), _STAGE_COLUMNS)]
    gates = r.get("gates") or []
    if gates:
        now = "gates now:" if r.get("paused_gates") else ""
        lines += ["", *([now] if now else []), table([_gate_row(g) for g in gates], _GATE_COLUMNS)]
    lines += [f"waiting: {w}" for w in r.get("waiting") or []]
    decision = r.get("decision")
    if decision:
        lines.append(
            f"last decision ({decision['at']}): {decision['kind']}, "
            f"{decision['started']} devices started"
        )
    return "\n".join(lines)


def _create(args: argparse.Namespace) -> None:
    out = api_from(args).post("/api/v1/rollouts", _body(args))
    emit(args, out, lambda: f"created rollout {out['id']} ({out['state']})\n" + status_text(out))


def _list(args: argparse.Namespace) -> None:
    rows = api_from(args).get("/api/v1/rollouts", state=args.state)
    shown = [
        {**r, "stage_text": f"{r['stage']}/{r['stages']}", "short_reason": r["reason"][:60]}
        for r in rows
    ]
    emit(args, rows, lambda: table(shown, _LIST_COLUMNS))


def _status(args: argparse.Namespace) -> None:
    out = api_from(args).get(f"/api/v1/rollouts/{args.id}")
    emit(args, out, lambda: status_text(out))


def _history(args: argparse.Namespace) -> None:
    rows = api_from(args).get(f"/api/v1/rollouts/{args.id}/history")
    columns = (
        ("TIME", "time"),
        ("ACTOR", "actor"),
        ("TRIGGER", "trigger"),
        ("FROM", "from_state"),
        ("TO", "to_state"),
        ("STAGE", "stages"),
        ("REASON", "reason"),
    )
    shown = [{**h, "stages": f"{h['from_stage'] + 1}->{h['to_stage'] + 1}"} for h in rows]
    emit(args, rows, lambda: table(shown, columns))


def _devices(args: argparse.Namespace) -> None:
    rows = api_from(args).get(
        f"/api/v1/rollouts/{args.id}/devices", stage=args.stage, status=args.status
    )

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    shown = [
        {
            **d,
            "stage_no": d["stage"] + 1,
            "p95": fmt(d["p95_ms"]),
            "base_p95": fmt(d["baseline_p95_ms"]),
            "power": fmt(d["power_mw"]),
        }
        for d in rows
    ]
    emit(args, rows, lambda: table(shown, _DEVICE_COLUMNS))


_SHADOW_COLUMNS = (
    ("CLASS", "class"),
    ("FRAMES", "frames"),
    ("AGREED", "agreed"),
    ("AGREEMENT", "shown"),
    ("CANDIDATE SAID INSTEAD", "instead"),
)


def shadow_text(r: dict[str, Any]) -> str:
    """The human form of ``GET /api/v1/rollouts/{id}/shadow``."""
    settings = r.get("settings") or {}
    lines = [
        f"rollout {r['rollout_id']}: {r['shadowing_now']} devices shadowing now"
        + (
            f" (1 frame in {settings['every_n']}, minimum agreement {settings['min_agreement']},"
            f" classes judged from {settings['min_class_frames']} frames, at least"
            f" {settings.get('duration', '30m')} per stage)"
            if settings
            else " (this rollout has no shadow phase)"
        )
    ]
    for profile, p in (r.get("profiles") or {}).items():
        agreement = p.get("agreement")
        shown = "-" if agreement is None else f"{100 * agreement:.1f}%"
        lines += [
            "",
            f"profile {profile}: {shown} agreement, {p['agreed']} of {p['shadowed']} frames on "
            f"{p['devices']} devices; {p['skipped']} due frames skipped by the CPU budget",
            f"  candidate p95 {_number(p.get('candidate_p95_ms'), 'ms')} ms, serving "
            f"{_number(p.get('serving_p95_ms'), 'ms')} ms; candidate energy "
            f"{_number(p.get('candidate_mj'), 'mJ')} mJ per inference (estimated)",
        ]
        rows = [
            {
                **c,
                "shown": f"{100 * c['agreement']:.1f}%",
                "instead": "-"
                if not c.get("confused_with")
                else f"{c['confused_with']} ({c['confused_count']})",
            }
            for c in p.get("classes", [])
        ]
        lines.append(table(rows, _SHADOW_COLUMNS))
        lines += [f"  error on {e['device']}: {e['error']}" for e in p.get("errors", [])]
    return "\n".join(lines)


def _shadow(args: argparse.Namespace) -> None:
    out = api_from(args).get(f"/api/v1/rollouts/{args.id}/shadow")
    emit(args, out, lambda: shadow_text(out))


def _action(name: str) -> Any:
    def run(args: argparse.Namespace) -> None:
        out = api_from(args).post(f"/api/v1/rollouts/{args.id}/{name}", {})
        rollout = out["rollout"]
        text = f"rollout {rollout['id']}: {rollout['state']} ({rollout['reason']})"
        if name == "revert" and out.get("skipped"):
            text += f"\n{len(out['skipped'])} devices had no previous release to go back to"
        emit(args, out, text)

    return run


def _add_create(rollout: Any) -> None:
    p = command_parser(rollout, "create", "create a staged rollout (see --start)", _create)
    p.add_argument("--release", required=True, metavar="NAME@VERSION")
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="device tag; repeat (same key: any of them, different keys: all)",
    )
    p.add_argument("--profile", action="append", default=[], help="board profile (repeatable)")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="(repeatable)")
    p.add_argument("--all", dest="all_devices", action="store_true", help="every device")
    p.add_argument("--stages", default="1%,10%,50%,100%", help="cumulative sizes, last 100%%")
    p.add_argument("--soak", default="30m", help="minimum soak per stage (e.g. 30m, 0s)")
    p.add_argument(
        "--stage-timeout", default="1h", help="silent devices count as failed after this long"
    )
    p.add_argument("--success", help="devices that must succeed per stage (%% or count)")
    p.add_argument("--max-failure", default="2%", help="error threshold per stage (%% or count)")
    p.add_argument("--max-install-failure", default="5%", help="gate, or 'off'")
    p.add_argument("--max-latency-regression", default="10%", help="p95 gate, or 'off'")
    p.add_argument("--max-power-regression", default="10%", help="gate, or 'off'")
    p.add_argument("--min-golden-accuracy", help="golden-set gate, e.g. 90%%")
    p.add_argument("--max-device-errors", type=int, help="more runtime errors: device failed")
    p.add_argument("--min-sample", type=int, default=10, help="devices before a gate judges")
    p.add_argument(
        "--latency-floor-ms", default="0.5", help="mean p95 increase a latency trip also needs"
    )
    p.add_argument("--power-floor-mw", default="100", help="mean increase a power trip also needs")
    p.add_argument(
        "--gate-estimated-power",
        action="store_true",
        help="gate power from estimates too (by default only sensor readings)",
    )
    p.add_argument("--max-downloads", type=int, default=100, help="simultaneous downloads")
    p.add_argument("--window-cron", help="maintenance window start, 5-field cron")
    p.add_argument("--window-duration", help="maintenance window length, e.g. 2h")
    p.add_argument("--window-tz", default="UTC", help="maintenance window timezone")
    p.add_argument("--approval", action="store_true", help="wait for approval between stages")
    p.add_argument("--variant", action="append", default=[], metavar="PROFILE=VARIANT")
    p.add_argument("--start", action="store_true", help="start it right away")
    p.add_argument(
        "--shadow-every",
        type=int,
        metavar="N",
        help="before each stage installs, its devices run the candidate on 1 frame in N",
    )
    p.add_argument(
        "--min-shadow-agreement", default="95%", help="shadow gate, overall and per class"
    )
    p.add_argument(
        "--shadow-min-frames", type=int, default=30, help="frames before a class is judged"
    )
    p.add_argument(
        "--shadow-cpu-budget", default="25%", help="share of one core the candidate may use"
    )
    p.add_argument(
        "--shadow-duration", default="30m", help="shortest shadow phase per stage (a trip ends it)"
    )


def add_commands(subparsers: Any) -> None:
    rollout = group(subparsers, "rollout", "staged rollouts with health gates")
    _add_create(rollout)
    p = command_parser(rollout, "list", "list rollouts, newest first", _list)
    p.add_argument("--state", help="only rollouts in this state")
    p = command_parser(rollout, "status", "stages, gates against limits, why it waits", _status)
    p.add_argument("id")
    p = command_parser(rollout, "history", "every state and stage change", _history)
    p.add_argument("id")
    p = command_parser(rollout, "shadow", "shadow agreement per profile and class", _shadow)
    p.add_argument("id")
    p = command_parser(rollout, "devices", "the rollout's devices and measurements", _devices)
    p.add_argument("id")
    p.add_argument("--stage", type=int, help="1-based stage")
    p.add_argument("--status", help="pending, downloading, installed, failed, rolled_back")
    for name, help_text in (
        ("start", "start a draft rollout"),
        ("pause", "stop starting devices"),
        ("resume", "continue a paused rollout (the devices that tripped it are acknowledged)"),
        ("approve", "let an awaiting rollout go on to its next stage"),
        ("abort", "stop for good; devices keep what they have"),
        ("revert", "send every touched device back to its previous release"),
    ):
        p = command_parser(rollout, name, help_text, _action(name))
        p.add_argument("id")

"""``edgefleet telemetry [DEVICE]``: latency, power and accuracy, for the fleet or one device.

The fleet view is one row per release and board profile; ``DEVICE`` gives a
readable block per release that device ran, and its newest window. Latency
percentiles and energy come from ``GET /api/v1/telemetry/summary`` (merged
exactly from the rollups); golden-set accuracy, mean top-1 confidence and drift
from ``GET /api/v1/accuracy`` (or the device's own). ``--json`` prints the
joined rows.
"""

from __future__ import annotations

import argparse
from typing import Any

from server.cli.common import CliError, api_from, command_parser, emit, table

_COLUMNS = (
    ("RELEASE", "label"),
    ("PROFILE", "profile_text"),
    ("DEVICES", "devices"),
    ("INFERENCES", "inferences"),
    ("P50 MS", "p50"),
    ("P95 MS", "p95"),
    ("POWER MW", "mw"),
    ("MJ/INF", "mj"),
    ("SOURCE", "source"),
    ("GOLDEN", "golden"),
    ("CONFIDENCE", "confidence"),
    ("DRIFT", "drift_text"),
)
_ACCURACY_KEYS = ("golden_set_accuracy", "mean_confidence", "drift", "drift_reason")


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _source(row: dict[str, Any]) -> str:
    """``sensor``, ``estimate``, or both when windows of a row were measured both ways."""
    return "+".join(row.get("power_sources") or {}) or "-"


def _join(summary: dict[str, Any], acc: dict[str, Any], by_profile: bool) -> list[dict[str, Any]]:
    """Telemetry rows with the accuracy of the same release (and profile) beside them."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r.get("model"), r.get("release"), r.get("profile") if by_profile else None)

    rows = {key(r): {**r} for r in summary["rows"]}
    for a in acc.get("releases", []):
        empty = {"model": a["model"], "release": a["release"], "profile": a.get("profile")}
        row = rows.setdefault(key(a), {**empty, "power_sources": {}})
        row.update({k: a.get(k) for k in _ACCURACY_KEYS})
    return [rows[k] for k in sorted(rows, key=lambda k: tuple(str(x) for x in k))]


def _shown(r: dict[str, Any]) -> dict[str, Any]:
    drift = r.get("drift")
    label = f"{r['model']}@{r['release']}" if r.get("model") else "(no model)"
    return {
        **r,
        "label": label,
        "profile_text": r.get("profile") or "-",
        "p50": _num(r.get("invoke_p50_ms")),
        "p95": _num(r.get("invoke_p95_ms")),
        "mw": _num(r.get("power_mw_mean"), "{:.0f}"),
        "mj": _num(r.get("mj_per_inference"), "{:.3f}"),
        "source": _source(r),
        "golden": _pct(r.get("golden_set_accuracy")),
        "confidence": _pct(r.get("mean_confidence")),
        "drift_text": "-" if drift is None else f"{drift['status']} (PSI {drift['psi']:.3f})",
    }


def latest_lines(device: dict[str, Any]) -> list[str]:
    latest = (device.get("telemetry") or {}).get("telemetry")
    if not latest:
        return ["  latest window: none received"]
    p = latest.get("payload") or {}
    invoke, power, thermal = p.get("invoke_ms") or {}, p.get("power") or {}, p.get("thermal") or {}
    model = f"{p.get('model')}@{p.get('release')} slot {p.get('slot')}" if p.get("model") else "-"
    lines = [
        f"  latest window ({latest.get('received_at')}): {model}",
        f"    latency   invoke p50 {_num(invoke.get('p50'))} ms, p95 "
        f"{_num(invoke.get('p95'))} ms, p99 {_num(invoke.get('p99'))} ms; "
        f"{_num(p.get('fps'), '{:.1f}')} fps, {p.get('inferences', '-')} inferences",
    ]
    if power.get("mw") is not None:
        lines.append(f"    power     {power['mw']:.0f} mW ({power.get('source', '?')}), "
                     f"{_num(power.get('mj_per_inference'), '{:.3f}')} mJ/inference")  # fmt: skip
    if thermal:
        lines.append(f"    thermal   max {_num(thermal.get('max_c'), '{:.1f}')} C"
                     + (", THROTTLED" if thermal.get("throttled") else ""))  # fmt: skip
    return lines


def device_text(device: dict[str, Any], data: dict[str, Any]) -> str:
    """The readable block for one device: each release it ran, then its newest window."""
    lines = [f"device {device['id']} ({device.get('profile')}), since {data['since']}"]
    for r in data["rows"]:
        s = _shown(r)
        lines += [
            f"  {s['label']}: {r.get('inferences', 0)} inferences in {r.get('windows', 0)} "
            f"windows, {r.get('errors', 0)} errors, {_num(r.get('fps_mean'), '{:.1f}')} fps",
            f"    latency   invoke p50 {s['p50']} ms, p95 {s['p95']} ms, "
            f"end-to-end p95 {_num(r.get('e2e_p95_ms'))} ms",
            f"    power     {s['mw']} mW mean ({s['source']}), {s['mj']} mJ/inference",
            f"    accuracy  golden set {s['golden']}, mean confidence {s['confidence']}, "
            f"drift {s['drift_text']}",
        ]
    if not data["rows"]:
        lines.append("  no telemetry or accuracy windows in this period")
    return "\n".join(lines + latest_lines(device))


def fleet_text(data: dict[str, Any]) -> str:
    lines = [table([_shown(r) for r in data["rows"]], _COLUMNS)]
    total = data.get("total")
    if total:
        t = _shown(total)
        lines.append(
            f"fleet: {total['devices']} devices, {total['inferences']} inferences; invoke p50 "
            f"{t['p50']} ms, p95 {t['p95']} ms; {t['mw']} mW mean ({t['source']}), "
            f"{t['mj']} mJ/inference"
        )
    lines.append(f"(since {data['since']}" + ("; TRUNCATED to the newest rollups)"
                                              if data.get("truncated") else ")"))  # fmt: skip
    return "\n".join(lines)


def _telemetry(args: argparse.Namespace) -> None:
    if args.hours <= 0:
        raise CliError("--hours must be positive")
    api = api_from(args)
    params = {"hours": args.hours}
    if args.device is None:
        summary = api.get("/api/v1/telemetry/summary", profile=args.profile, **params)
        acc = api.get("/api/v1/accuracy", **params)
        if args.profile is not None:
            acc["releases"] = [a for a in acc["releases"] if a.get("profile") == args.profile]
        data = {**summary, "rows": _join(summary, acc, by_profile=True)}
        emit(args, data, lambda: fleet_text(data))
        return
    device = api.get(f"/api/v1/devices/{args.device}")
    summary = api.get("/api/v1/telemetry/summary", device=args.device, **params)
    acc = api.get(f"/api/v1/devices/{args.device}/accuracy", **params)
    latest = (device.get("telemetry") or {}).get("telemetry")
    data = {**summary, "profile": device.get("profile"),
            "rows": _join(summary, acc, by_profile=False), "latest": latest}  # fmt: skip
    emit(args, data, lambda: device_text(device, data))


def add_commands(sub: Any) -> None:
    p = command_parser(
        sub, "telemetry",
        "latency p50/p95, power, energy and accuracy per release, for the fleet or one device",
        _telemetry,
    )  # fmt: skip
    p.add_argument("device", nargs="?", metavar="DEVICE", help="one device (default: the fleet)")
    p.add_argument("--hours", type=float, default=1.0, help="lookback (default 1)")
    p.add_argument("--profile", help="fleet view: only this board profile")

"""``edgefleet accuracy``: field accuracy per release and board profile, without labels.

One row per model release and profile: devices and inferences over the
lookback, mean top-1 confidence, the drift of predicted classes against the
release's validation reference (PSI, its verdict and the class that moved
most), the confidence PSI, the golden-set score devices reported, and the
devices drifting on their own. ``--device ID`` shows one device instead.
"""

from __future__ import annotations

import argparse
from typing import Any

from server.cli.common import api_from, command_parser, emit, table

_COLUMNS = (
    ("release", "label"),
    ("profile", "profile"),
    ("devices", "devices"),
    ("inferences", "inferences"),
    ("confidence", "confidence"),
    ("class PSI", "psi"),
    ("drift", "status"),
    ("worst class", "worst"),
    ("conf. PSI", "confidence_psi"),
    ("golden set", "golden"),
    ("drifting devices", "drifting"),
)
_FLAGGED = ("watch", "drift")  # a stable row's largest term is noise, not a finding
_DEVICE_COLUMNS = tuple(c for c in _COLUMNS if c[1] not in ("profile", "devices", "drifting"))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _row(r: dict[str, Any]) -> dict[str, Any]:
    drift = r.get("drift")
    drifting = [
        f"{d['device_id']} ({d['psi']:.2f}, {d['worst_class']})"
        for d in r.get("drifting_devices", [])
    ]
    return {
        "label": f"{r['model']}@{r['release']}",
        "profile": r.get("profile"),
        "devices": r.get("devices"),
        "inferences": r["inferences"],
        "confidence": _pct(r.get("mean_confidence")),
        "psi": "-" if drift is None else f"{drift['psi']:.3f}",
        "status": "no reference" if drift is None else drift["status"],
        "worst": drift["worst_class"] if drift and drift["status"] in _FLAGGED else "-",
        "confidence_psi": "-" if drift is None else f"{drift['confidence_psi']:.3f}",
        "golden": _pct(r.get("golden_set_accuracy")),
        "drifting": ", ".join(drifting) or "-",
    }


def _footer(data: dict[str, Any]) -> str:
    t = data["thresholds"]
    return (
        f"(since {data['since']}; PSI {t['watch']} watch, {t['drift']} drift; "
        f"judged from {t['min_inferences']} inferences)"
    )


def _accuracy(args: argparse.Namespace) -> None:
    api = api_from(args)
    params = {"hours": args.hours, "min_inferences": args.min_inferences}
    if args.device is not None:
        data = api.get(f"/api/v1/devices/{args.device}/accuracy", **params)
        rows = [_row(r) for r in data["releases"]]
        head = f"device {data['device_id']} ({data['profile']})"
        emit(args, data, lambda: f"{head}\n{table(rows, _DEVICE_COLUMNS)}\n{_footer(data)}")
        return
    data = api.get("/api/v1/accuracy", **params)
    rows = [_row(r) for r in data["releases"]]
    emit(args, data, lambda: table(rows, _COLUMNS) + "\n" + _footer(data) + _shadow(data))


_SHADOW_COLUMNS = (
    ("ROLLOUT", "rollout"),
    ("CANDIDATE", "label"),
    ("PROFILE", "profile"),
    ("FRAMES", "shadowed"),
    ("AGREEMENT", "overall"),
    ("WEAKEST CLASS", "weakest"),
    ("CANDIDATE P95", "p95"),
)


def _shadow(data: dict[str, Any]) -> str:
    """Candidates being shadowed now (see ``edgefleet rollout shadow ID`` for per class)."""
    rows = [
        {
            **r,
            "label": f"{r['model']}@{r['release']}",
            "overall": _pct(r.get("agreement")),
            "weakest": _pct(r.get("class_min")),
            "p95": "-" if r.get("candidate_p95_ms") is None else f"{r['candidate_p95_ms']:.1f} ms",
        }
        for r in data.get("shadow") or []
    ]
    if not rows:
        return ""
    return "\n\nshadow evaluation (candidate against serving model):\n" + table(
        rows, _SHADOW_COLUMNS
    )


def add_commands(subparsers: Any) -> None:
    parser = command_parser(
        subparsers, "accuracy", "field accuracy per release x profile: confidence, drift", _accuracy
    )
    parser.add_argument("--device", metavar="ID", help="one device's releases instead")
    parser.add_argument("--hours", type=float, default=24.0, help="lookback in hours (default 24)")
    parser.add_argument(
        "--min-inferences", type=int, default=200,
        help="inferences needed before drift is judged (default 200)",
    )  # fmt: skip

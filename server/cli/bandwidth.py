"""``edgefleet bandwidth``: what model updates cost the fleet's network."""

from __future__ import annotations

import argparse
from typing import Any

from server.cli.common import api_from, command_parser, emit, table

_COLUMNS = (
    ("release", "label"),
    ("updates", "updates"),
    ("deltas", "deltas"),
    ("of which ANS", "deltas_ans"),
    ("full before delta", "before_delta"),
    ("sent", "sent"),
    ("of which aux", "aux"),
    ("full INT8", "int8"),
    ("FP32", "fp32"),
    ("saved vs INT8", "saving_int8"),
    ("FP32/sent", "ratio"),
    ("cost saved", "cost_saved"),
)


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _row(label: str, totals: dict[str, Any]) -> dict[str, Any]:
    ratio = totals.get("ratio_fp32_to_sent")
    return {
        "label": label,
        "updates": totals["updates"],
        "deltas": totals["deltas"],
        "deltas_ans": totals.get("deltas_ans", 0),
        "before_delta": totals.get("full_before_delta", 0),
        "sent": _mb(totals["bytes_sent"]),
        "aux": _mb(totals.get("aux_bytes")),
        "int8": _mb(totals["full_int8_bytes"]),
        "fp32": _mb(totals.get("fp32_bytes")),
        "saving_int8": _pct(totals.get("saving_vs_int8")),
        "ratio": "-" if ratio is None else f"{ratio}x",
        "cost_saved": f"${totals['cost_saved']:.4f}",
    }


def _bandwidth(args: argparse.Namespace) -> None:
    data = api_from(args).get("/api/v1/bandwidth", price_per_gb=args.price_per_gb)
    rows = [_row(f"{r['name']}@{r['release']} {r['variant']}", r) for r in data.get("releases", [])]
    rows.append(_row("fleet", data["fleet"]))
    note = ("aux: golden sets and TUF metadata, counted in sent; full before delta: full "
            "downloads while the device's delta was still being built")
    emit(args, data, lambda: table(rows, _COLUMNS) + f"\n(at ${args.price_per_gb}/GB; {note})")


def add_commands(subparsers: Any) -> None:
    parser = command_parser(
        subparsers, "bandwidth", "bytes sent for updates vs full INT8 and FP32", _bandwidth
    )
    parser.add_argument(
        "--price-per-gb", type=float, default=0.09, help="network cost in $ per GB (default 0.09)"
    )

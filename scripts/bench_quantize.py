#!/usr/bin/env python3
"""Benchmark ``edgefleet model quantize`` against FP32 and the TFLite converter's INT8.

    .venv/bin/python scripts/bench_quantize.py [--runs 50] [--threads 1] [--json]

For each FP32 fixture (the digits CNN on [0, 1], the same CNN trained on [-1, 1], and a
MobileNetV2-shaped alpha 0.35 96x96 network on [-1, 1]) it quantizes with EdgeFleet
(ai-edge-quantizer plus the per-class search, in-process, timed end to end), then scores
FP32, EdgeFleet's INT8 and the TFLite converter's INT8 on the same camera-space
validation set with the same gate (``edgefleet model validate``'s code). The
converter's INT8 files are committed fixtures, made by ``tf.lite.TFLiteConverter`` from
the same Keras models (scripts/make_test_models.py, make_quantize_fixtures.py): the
converter needs the Keras model, which a .tflite cannot give back, so TensorFlow is not
needed here. Calibration uses the even-indexed held-out images, validation the odd ones
(the converter calibrated on 200 training images). Latency is LiteRT's median invoke
on this machine. Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.protocol.input_options import ContractOptions
from server.publish.quantize import QuantizeRequest, quantize_model
from server.publish.quantize_data import model_pixels
from server.publish.quantize_eval import (
    ValidateRequest,
    latency_ms,
    open_model,
    validate_candidate,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
LABELS = FIXTURES / "digits_labels.txt"


@dataclass(frozen=True)
class Fixture:
    name: str
    fp32: str
    converter_int8: str
    value_range: tuple[float, float]


BENCH = (
    Fixture("digits [0,1]", "digits_fp32_r1.tflite", "digits_int8_r1.tflite", (0.0, 1.0)),
    Fixture("digits [-1,1]", "digits_signed_fp32.tflite", "digits_signed_int8.tflite",
            (-1.0, 1.0)),
    Fixture("mobilenetv2 0.35 96", "mobilenetv2_035_96_fp32.tflite",
            "mobilenetv2_035_96_int8.tflite", (-1.0, 1.0)),
)  # fmt: skip


def write_sets(directory: Path) -> tuple[Path, Path]:
    with np.load(FIXTURES / "digits_val.npz") as npz:
        x = np.rint(npz["x"] * 255.0).astype(np.uint8)
        y = npz["y"].astype(np.int64)
    cal, val = directory / "cal.npz", directory / "val.npz"
    np.savez(cal, x=x[0::2], y=y[0::2])
    np.savez(val, x=x[1::2], y=y[1::2])
    return cal, val


def converter_row(fx: Fixture, val: Path, options: ContractOptions, args: argparse.Namespace) -> (
    dict[str, Any] | None
):  # fmt: skip
    path = FIXTURES / fx.converter_int8
    if not path.is_file():
        return None
    result = validate_candidate(ValidateRequest(path, FIXTURES / fx.fp32, val, LABELS, options,
                                                threads=args.threads))  # fmt: skip
    model = open_model(path, args.threads)
    with np.load(val) as npz:
        pixels = model_pixels(result.contract, model.input, npz["x"][:1])
    verdict = result.verdict
    assert verdict is not None
    worst = verdict.worst_class
    return {
        "model": "TFLite converter INT8",
        "seconds": None,
        "bytes": path.stat().st_size,
        "latency_ms": latency_ms(model, result.contract, pixels, args.runs),
        "accuracy": verdict.candidate,
        "drop": verdict.drop,
        "worst": None if worst is None else (worst.label, worst.reference, worst.candidate),
        "decision": result.decision,
        "recipe": "converter default (min-max, per-channel weights)",
    }


def bench(fx: Fixture, cal: Path, val: Path, tmp: Path, args: argparse.Namespace) -> (
    list[dict[str, Any]]
):  # fmt: skip
    options = ContractOptions(value_range=fx.value_range)
    request = QuantizeRequest(
        model=FIXTURES / fx.fp32, calibration=cal, validation=val, labels=LABELS,
        output=tmp / "out.tflite", report=tmp / "report.json", options=options,
        threads=args.threads, latency_runs=args.runs,
    )  # fmt: skip
    start = time.perf_counter()
    outcome = quantize_model(request)
    seconds = time.perf_counter() - start
    report = outcome.report
    gate = report["gate"]
    worst = max(gate["per_class"], key=lambda c: (c["drop"], -c["candidate"]))
    rows = [
        {"model": "FP32", "seconds": None, "bytes": report["size"]["fp32_bytes"],
         "latency_ms": report["latency_ms"]["fp32"], "accuracy": gate["overall"]["reference"],
         "drop": None, "worst": None, "decision": "", "recipe": ""},
        {"model": "EdgeFleet INT8", "seconds": seconds, "bytes": report["size"]["int8_bytes"],
         "latency_ms": report["latency_ms"]["int8"], "accuracy": gate["overall"]["candidate"],
         "drop": gate["overall"]["drop"],
         "worst": (worst["label"], worst["reference"], worst["candidate"]),
         "decision": report["decision"], "recipe": report["recipe"]["name"],
         "candidates": {c["recipe"]: c["accuracy"] for c in report["candidates"]}},
    ]  # fmt: skip
    converter = converter_row(fx, val, options, args)
    if converter is not None:
        rows.append(converter)
    return rows


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    head = (
        f"{'fixture':<20} {'model':<22} {'quantize s':>10} {'bytes':>10} {'size':>6} {'ms':>7} "
        f"{'top-1 %':>8} {'drop':>6}  {'worst class FP32->INT8':<24} decision, recipe"
    )
    lines = [head, "-" * len(head)]
    for name, rows in results.items():
        fp32_bytes = rows[0]["bytes"]
        for i, r in enumerate(rows):
            secs = "" if r["seconds"] is None else f"{r['seconds']:.2f}"
            drop = "" if r["drop"] is None else f"{r['drop']:.2f}"
            worst = ""
            if r["worst"] is not None:
                worst = f"'{r['worst'][0]}' {r['worst'][1]:.1f} -> {r['worst'][2]:.1f}"
            recipe = f", {r['recipe']}" if r["recipe"] else ""
            lines.append(
                f"{name if i == 0 else '':<20} {r['model']:<22} {secs:>10} {r['bytes']:>10,} "
                f"{r['bytes'] / fp32_bytes:>6.0%} {r['latency_ms']:>7.3f} {r['accuracy']:>8.2f} "
                f"{drop:>6}  {worst:<24} {r['decision']}{recipe}"
            )
            if "candidates" in r:
                tried = ", ".join(f"{k} {v:.2f}" for k, v in r["candidates"].items())
                lines.append(f"{'':<43} candidates tried (top-1 %): {tried}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="invokes per latency median")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        cal, val = write_sets(Path(tmp))
        for fx in BENCH:
            if not (FIXTURES / fx.fp32).is_file():
                print(f"skipping {fx.name}: {fx.fp32} is missing", file=sys.stderr)
                continue
            results[fx.name] = bench(fx, cal, val, Path(tmp), args)
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

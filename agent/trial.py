"""``edgefleet-agent try``: one model on one frame source, with the daemon's own pixel path.

A field engineer runs it before a camera joins the fleet: it opens the source
the daemon would open, builds the input contract the way publishing does
(flags first, then the model's TFLite Metadata, and no silent default), runs
each frame through the same preprocessing and engine as the daemon, and prints
what it sees. ``--json`` prints one JSON object per frame on stdout (JSON
Lines) and the summary on stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.common.errors import AgentError, ConfigError
from agent.inference.classifier import InferenceEngine, Result, load_labels
from agent.inference.model_metadata import read_metadata
from agent.inference.runtime import load_model
from agent.inference.sources import FrameSource, open_source
from agent.protocol.input_options import ContractOptions, resolve_contract
from agent.telemetry.histogram import LatencyHistogram


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "try",
        help="run a model on a camera, stream or video and print what it sees",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--model", required=True, type=Path, help="the .tflite model")
    p.add_argument(
        "--source",
        required=True,
        help="v4l2:/dev/videoN, rtsp://..., http(s)://... (MJPEG), file:VIDEO, dir:PATH, synthetic",
    )
    p.add_argument("--labels", type=Path, help="labels file, one per line")
    p.add_argument("--input-range", metavar="LO,HI", help="pixel 0..255 maps to LO..HI")
    p.add_argument("--mean", metavar="M[,M,M]", help="per-channel mean in pixel units")
    p.add_argument("--std", metavar="S[,S,S]", help="per-channel std in pixel units")
    p.add_argument("--resize", choices=("bilinear", "area", "nearest", "letterbox"))
    p.add_argument("--pad", type=int, metavar="N", help="letterbox pad value 0..255")
    p.add_argument("--crop", type=float, metavar="F", help="central crop fraction in (0, 1]")
    p.add_argument("--color", choices=("RGB", "BGR"), help="channel order the model expects")
    p.add_argument(
        "--every-frame",
        action="store_true",
        help="process every frame in order (files), instead of only the latest",
    )
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown per frame")
    p.add_argument("--runtime", default="auto", help="auto, litert or tflite-runtime")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout, one per frame")
    p.set_defaults(func=cmd_try)


@dataclass
class Summary:
    """Frame count, elapsed time and latency distributions of one run."""

    frames: int = 0
    started: float = field(default_factory=time.monotonic)
    invoke: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(warmup=0))
    total: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(warmup=0))

    def add(self, result: Result, total_ns: int) -> None:
        self.frames += 1
        self.invoke.record(result.invoke_ns)
        self.total.record(total_ns)

    def to_json(self, source: FrameSource) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started

        def ms(hist: LatencyHistogram) -> dict[str, float | None]:
            return {
                name: None if value is None else round(value / 1e6, 3)
                for name, value in (
                    ("p50", hist.p50), ("p90", hist.p90), ("p99", hist.p99), ("max", hist.max),
                )
            }  # fmt: skip

        return {
            "frames": self.frames,
            "seconds": round(elapsed, 3),
            "fps": round(self.frames / elapsed, 2) if elapsed > 0 else None,
            "invoke_ms": ms(self.invoke),
            "frame_ms": ms(self.total),
            "source": source.stats().as_dict(),
        }


def _engine(args: argparse.Namespace, notes: TextIO) -> InferenceEngine:
    if args.top_k < 1 or args.threads < 1 or (args.max_frames is not None and args.max_frames < 1):
        raise ConfigError("--top-k, --threads and --max-frames must be positive")
    model = load_model(args.model, args.runtime, args.threads)
    try:
        options = ContractOptions.parse(
            input_range=args.input_range, mean=args.mean, std=args.std, resize=args.resize,
            pad=args.pad, crop=args.crop, color=args.color,
        )  # fmt: skip
        resolved = resolve_contract(options, model.input.shape, read_metadata(args.model))
        if resolved.contract is None:
            raise ConfigError(f"{args.model} does not take an image input: nothing to try")
        for note in resolved.notes:
            print(f"# {note}", file=notes)
        labels = load_labels(args.labels) if args.labels else ()
        return InferenceEngine(model, resolved.contract, labels, args.top_k)
    except BaseException:
        model.close()
        raise


def _line(index: int, result: Result, total_ns: int, as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "frame": index,
                "top1": result.class_index,
                "label": result.label,
                "score": round(result.score, 6),
                "top_k": [[label, round(score, 6)] for label, score in result.top_k],
                "pre_ms": round(result.pre_ns / 1e6, 3),
                "invoke_ms": round(result.invoke_ns / 1e6, 3),
                "frame_ms": round(total_ns / 1e6, 3),
            }
        )
    top = "  ".join(f"{label} {score:.3f}" for label, score in result.top_k)
    return f"{index:6d}  {top}  ({result.invoke_ns / 1e6:.2f} ms invoke, {total_ns / 1e6:.2f} ms)"


def _open(args: argparse.Namespace, shape: tuple[int, ...] | None) -> FrameSource:
    return open_source(args.source, shape, every_frame=args.every_frame)


def cmd_try(args: argparse.Namespace) -> int:
    out = sys.stdout
    notes = sys.stderr if args.json else sys.stdout
    # A bad source is the common mistake: say so before loading the model, unless the
    # source's frame size comes from the model (synthetic frames).
    early = None if args.source.startswith("synthetic") else _open(args, None)
    try:
        engine = _engine(args, notes)
    except BaseException:
        if early is not None:
            early.close()
        raise
    summary = Summary()
    try:
        source = early or _open(args, engine.model.input.shape)
    except BaseException:
        engine.model.close()
        raise
    with source:
        try:
            while args.max_frames is None or summary.frames < args.max_frames:
                t0 = time.perf_counter_ns()
                try:
                    frame = next(source)
                except StopIteration:
                    break
                result = engine.run(frame)
                total_ns = time.perf_counter_ns() - t0
                summary.add(result, total_ns)
                print(_line(summary.frames - 1, result, total_ns, args.json), file=out, flush=True)
        except KeyboardInterrupt:
            pass  # a live camera runs until Ctrl-C; the summary still follows
        finally:
            engine.model.close()
        report = summary.to_json(source)
    if summary.frames == 0:
        raise AgentError(f"source {args.source} gave no frames")
    if args.json:
        print(json.dumps({"summary": report}), file=sys.stderr)
    else:
        inv, tot = report["invoke_ms"], report["frame_ms"]
        print(
            f"{report['frames']} frames in {report['seconds']} s ({report['fps']} fps); "
            f"invoke p50 {inv['p50']} p90 {inv['p90']} p99 {inv['p99']} ms; "
            f"frame p50 {tot['p50']} p99 {tot['p99']} ms; "
            f"dropped {report['source']['frames_dropped']}",
            file=out,
        )
    return 0

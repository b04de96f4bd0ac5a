#!/usr/bin/env python3
"""Camera benchmark: an RTSP camera on loopback into the agent, against a raw loop.

One command, both sides in the same run, against the same live stream:

1. GStreamer's RTSP server (``tests/rtsp_server.py`` under Debian's python3)
   plays a 640x480 30 fps H.264 test pattern on 127.0.0.1.
2. **agent**: the daemon's own inference thread (``agent.worker.InferenceWorker``)
   reads it through the camera source (capture thread, latest frame wins) and runs
   the MobileNetV2 INT8 fixture through the release's input contract ([-1, 1],
   bilinear 224x224). Figures come from its telemetry windows: camera fps,
   processed fps, and end to end from capture to result (p99).
3. **raw**: one thread that decodes with PyAV, resizes with OpenCV, normalises and
   quantises with numpy and invokes LiteRT, frame after frame; end to end is from
   the decoded frame to the result.

The last line is ``camera_fps=... processed_fps=... e2e_p99_ms=... ratio_vs_raw=...``
where the ratio is the agent's processed fps over the raw loop's. Needs the
``camera`` and ``dev`` extras and the Debian packages ``.ci/run`` installs.
"""

from __future__ import annotations

import argparse
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from bench_proc import free_port  # noqa: E402

from agent.inference.capture import CaptureOptions  # noqa: E402
from agent.update.smoke import RuntimeChoice  # noqa: E402
from agent.worker import InferenceWorker  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "mobilenetv2_int8.tflite"
SERVER = ROOT / "tests" / "rtsp_server.py"


def start_camera(fps: int) -> tuple[subprocess.Popen[str], str]:
    cmd = ["/usr/bin/python3", str(SERVER), "--port", str(free_port()), "--fps", str(fps),
           "--width", "640", "--height", "480"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(timeout=30) else ""
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"the RTSP server did not start: {line or proc.stderr}")
    return proc, line.split()[1]


def manifest() -> dict[str, Any]:
    contract = {"layout": "NHWC", "height": 224, "width": 224, "channels": 3,
                "resize": "bilinear", "crop": 1.0, "color": "RGB", "range": [-1.0, 1.0]}
    return {"name": "mobilenetv2", "release": 1, "variant": "int8-cpu", "input": contract}


def run_agent(url: str, seconds: float, warmup_s: float, threads: int) -> dict[str, float]:
    windows: list[dict[str, Any]] = []
    lock = threading.Lock()

    def publish(channel: str, payload: dict[str, Any]) -> None:
        if channel == "telemetry":
            with lock:
                windows.append(payload)

    worker = InferenceWorker(
        RuntimeChoice("auto", threads, None, ""), url, publish, window_s=1.0, warmup=0,
        capture=CaptureOptions,
    )  # fmt: skip
    tmp = tempfile.TemporaryDirectory(prefix="edgefleet-bench-camera-")
    slot = Path(tmp.name) / "a"
    slot.mkdir()
    (slot / "model.tflite").write_bytes(MODEL.read_bytes())
    worker.start()
    try:
        worker.swap(slot / "model.tflite", manifest())
        time.sleep(warmup_s)  # FFmpeg's probe burst and the first windows are not counted
        with lock:
            skip = len(windows)
        time.sleep(seconds)
        with lock:
            measured = [w for w in windows[skip:] if w.get("inferences")]
    finally:
        worker.stop()
        tmp.cleanup()
    if not measured:
        raise SystemExit("the agent processed no frames")
    return {
        "camera_fps": statistics.median(w["camera"]["camera_fps"] for w in measured),
        "processed_fps": statistics.median(w["fps"] for w in measured),
        "e2e_p99_ms": statistics.median(w["e2e_ms"]["p99"] for w in measured),
        "dropped": sum(w["camera"]["frames_dropped"] for w in measured),
    }


def run_raw(url: str, seconds: float, warmup_s: float, threads: int) -> dict[str, float]:
    interp = Interpreter(model_path=str(MODEL), num_threads=threads)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = inp["quantization"]
    e2e: list[float] = []
    frames = 0
    options = {"rtsp_transport": "tcp", "timeout": "5000000"}
    with av.open(url, options=options, timeout=10.0) as container:
        started = time.monotonic()
        measure_from = started + warmup_s
        for frame in container.decode(video=0):
            decoded = time.perf_counter_ns()
            rgb = frame.to_ndarray(format="rgb24")
            small = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_LINEAR)
            values = small.astype(np.float32) * (2.0 / 255.0) - 1.0
            q = np.clip(np.round(values / scale + zero), -128, 127).astype(np.int8)
            interp.set_tensor(inp["index"], q[np.newaxis])
            interp.invoke()
            interp.get_tensor(out["index"]).argmax()
            now = time.monotonic()
            if now >= measure_from:
                frames += 1
                e2e.append((time.perf_counter_ns() - decoded) / 1e6)
            if now >= measure_from + seconds:
                break
    return {
        "processed_fps": frames / seconds,
        "e2e_p99_ms": float(np.percentile(e2e, 99)) if e2e else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per side")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds not counted")
    parser.add_argument("--fps", type=int, default=30, help="camera frame rate")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
    args = parser.parse_args()
    proc, url = start_camera(args.fps)
    try:
        agent = run_agent(url, args.seconds, args.warmup, args.threads)
        raw = run_raw(url, args.seconds, args.warmup, args.threads)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    print(f"stream: {url} 640x480 H.264 {args.fps} fps; model {MODEL.name}; "
          f"{args.seconds:g} s measured per side after {args.warmup:g} s warm-up")
    print(f"agent: camera_fps={agent['camera_fps']:.1f} processed_fps={agent['processed_fps']:.1f} "
          f"e2e_p99_ms={agent['e2e_p99_ms']:.2f} dropped={agent['dropped']:.0f}")
    print(f"raw:   processed_fps={raw['processed_fps']:.1f} e2e_p99_ms={raw['e2e_p99_ms']:.2f}")
    ratio = agent["processed_fps"] / raw["processed_fps"] if raw["processed_fps"] else 0.0
    print(f"camera_fps={agent['camera_fps']:.1f} processed_fps={agent['processed_fps']:.1f} "
          f"e2e_p99_ms={agent['e2e_p99_ms']:.2f} ratio_vs_raw={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

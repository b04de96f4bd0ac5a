"""``edgefleet-agent try`` as a field engineer runs it: a real process, a real video, LiteRT.

The accuracy check compares ``try`` with an independent pipeline over the same
video: PyAV decode, OpenCV resize, numpy normalisation and quantisation, and
LiteRT's own Interpreter. Same pixels in, same classes out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest
from ai_edge_litert.interpreter import Interpreter

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "digits_int8_r1.tflite"
LABELS = FIXTURES / "digits_labels.txt"
FRAME = 96  # the camera's frame size; the model takes 32x32


def run_try(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "try", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def labelled_video(path: Path, count: int) -> npt.NDArray[np.int64]:
    """The held-out digits as an H.264 video of ``FRAME``-pixel frames; returns the labels."""
    data = np.load(FIXTURES / "digits_val.npz")
    x = np.round(data["x"][:count] * 255).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        assert isinstance(stream, av.VideoStream)
        stream.width = stream.height = FRAME
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for image in x:
            big = cv2.resize(image, (FRAME, FRAME), interpolation=cv2.INTER_NEAREST)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(big, format="rgb24")))
        container.mux(stream.encode(None))
    return np.asarray(data["y"][:count], dtype=np.int64)


def reference_top1(video: Path, model: Path, low: float, high: float) -> list[int]:
    """Decode -> resize -> normalise -> quantise -> invoke, with none of EdgeFleet's code."""
    interp = Interpreter(model_path=str(model))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = inp["quantization"]
    _, height, width, _ = inp["shape"]
    top1: list[int] = []
    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            small = cv2.resize(rgb, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
            values = low + (high - low) * small.astype(np.float32) / 255.0
            q = np.clip(np.round(values / scale + zero), -128, 127).astype(np.int8)
            interp.set_tensor(inp["index"], q[np.newaxis])
            interp.invoke()
            top1.append(int(np.argmax(interp.get_tensor(out["index"])[0])))
    return top1


def frames_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_try_gives_the_accuracy_of_an_independent_pipeline(tmp_path: Path) -> None:
    video = tmp_path / "digits.mp4"
    labels = labelled_video(video, 120)
    proc = run_try(
        "--model", str(MODEL), "--source", f"file:{video}", "--labels", str(LABELS),
        "--input-range=0,1", "--every-frame", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    frames = frames_of(proc.stdout)
    assert [f["frame"] for f in frames] == list(range(len(labels)))
    assert all(isinstance(f["top1"], int) for f in frames)
    ours = np.array([f["top1"] for f in frames])
    ref = np.array(reference_top1(video, MODEL, 0.0, 1.0))
    assert len(ref) == len(ours)
    # Same pixels in, same classes out: resize rounding may move a borderline frame at most.
    assert (ours == ref).mean() >= 0.98
    assert abs((ours == labels).mean() - (ref == labels).mean()) <= 1 / len(labels)
    assert (ours == labels).mean() > 0.8  # the model reads these frames, not noise
    summary = json.loads(proc.stderr.strip().splitlines()[-1])["summary"]
    assert summary["frames"] == len(labels)
    assert summary["source"]["frames_dropped"] == 0


def test_the_wrong_input_range_is_visible_in_the_output(tmp_path: Path) -> None:
    """The contract decides the pixels: the same video through a [-1,1] mapping misreads."""
    video = tmp_path / "digits.mp4"
    labels = labelled_video(video, 60)
    right = run_try("--model", str(MODEL), "--source", f"file:{video}", "--input-range=0,1",
                    "--every-frame", "--json")
    wrong = run_try("--model", str(MODEL), "--source", f"file:{video}", "--input-range=-1,1",
                    "--every-frame", "--json")
    assert right.returncode == 0 and wrong.returncode == 0, wrong.stderr
    accuracy = [
        (np.array([f["top1"] for f in frames_of(p.stdout)]) == labels).mean()
        for p in (right, wrong)
    ]
    ref_wrong = np.array(reference_top1(video, MODEL, -1.0, 1.0))
    assert accuracy[0] > accuracy[1] + 0.2
    assert abs(accuracy[1] - (ref_wrong == labels).mean()) <= 1 / len(labels)


def test_max_frames_and_text_output(tmp_path: Path) -> None:
    video = tmp_path / "digits.mp4"
    labelled_video(video, 20)
    proc = run_try("--model", str(MODEL), "--source", f"file:{video}", "--labels", str(LABELS),
                   "--input-range", "0,1", "--every-frame", "--max-frames", "5", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("# input contract: 32x32x3 NHWC, bilinear, RGB, range 0,1")
    rows = [line for line in lines if not line.startswith("#")]
    assert len(rows) == 6  # five frames and the summary
    assert rows[-1].startswith("5 frames in ")
    assert "invoke p50" in rows[-1] and "dropped 0" in rows[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "file:/nonexistent/video.mp4", "--input-range=-1,1"], "does not exist"),
        (["--source", "rtsp-ish:nothing", "--input-range=0,1"], "frame source"),
        (["--source", "dir:/nonexistent", "--input-range=0,1"], "/nonexistent"),
        (["--source", "synthetic"], "--input-range"),  # no mapping: refused, flags named
        (["--source", "synthetic", "--input-range", "1,0"], "--input-range"),
        (["--source", "synthetic", "--input-range=0,1", "--max-frames", "0"], "positive"),
        (["--source", "synthetic", "--mean", "127.5"], "--mean and --std go together"),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(args: list[str], message: str) -> None:
    proc = run_try("--model", str(MODEL), "--every-frame", *args)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edgefleet-agent")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreadable_video_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video at all" * 100)
    proc = run_try("--model", str(MODEL), "--source", f"file:{bogus}", "--input-range=-1,1",
                   "--every-frame", "--json")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edgefleet-agent: error:")


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """``try ... --json | head -1``: the closed pipe ends the run quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "try", "--model", str(MODEL), "--source", "synthetic",
         "--input-range=0,1", "--max-frames", "100000", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = json.loads(proc.stdout.readline())
    assert first["frame"] == 0
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err

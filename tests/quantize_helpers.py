"""Camera-space sets and deliberately damaged models for the quantize and validate tests.

The damaged models are made here, from the committed fixtures, by rewriting
constant tensors in place (byte ranges from ``agent.delta.tflite``):

- ``damage_class``: an INT8 classifier whose bias for one class is lowered by
  a fixed number of logits, so that class is never predicted again;
- ``outlier_channel``: an FP32 model with the same function (ReLU and max
  pooling commute with a positive scale), whose conv1 channel is scaled up and
  conv2's matching input weights scaled down: harmless in float, but one
  per-tensor int8 range for that activation crushes every other channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.delta.tflite import ConstTensor, parse_constants
from server import cli

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = FIXTURES / "digits_labels.txt"
FP32 = FIXTURES / "digits_fp32_r1.tflite"
INT8 = FIXTURES / "digits_int8_r1.tflite"
CONV1 = "digits_1/conv1_1/convolution"
CONV1_BIAS = "digits_1/conv1_1/Relu;digits_1/conv1_1/BiasAdd;digits_1/conv1_1/convolution;" + (
    "digits_1/conv1_1/Squeeze"
)
CONV2 = "digits_1/conv2_1/convolution"
PROBS_BIAS = "digits_1/probs_1/BiasAdd"


def digits_pixels() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The held-out digits as camera-space uint8 frames at twice the model's size.

    Each pixel becomes a 2x2 block, so the contract's bilinear resize back to 32x32
    gives the original pixels exactly and accuracy stays comparable to the fixture's.
    """
    with np.load(FIXTURES / "digits_val.npz") as npz:
        x, y = npz["x"], npz["y"]
    pixels = np.rint(x * 255.0).astype(np.uint8)
    return np.repeat(np.repeat(pixels, 2, axis=1), 2, axis=2), y.astype(np.int64)


def write_sets(directory: Path) -> tuple[Path, Path]:
    """Calibration (even indices) and validation (odd indices) sets, 150 images each."""
    x, y = digits_pixels()
    cal, val = directory / "cal.npz", directory / "val.npz"
    np.savez(cal, x=x[0::2], y=y[0::2])
    np.savez(val, x=x[1::2], y=y[1::2])
    return cal, val


def write_rare_class_set(path: Path, rare: int, keep: int = 3) -> Path:
    """All images and their 1-pixel shifted copies, but only ``keep`` images of ``rare``."""
    x, y = digits_pixels()
    x = np.concatenate([x, np.roll(x, 2, axis=2)])
    y = np.concatenate([y, y])
    mask = np.ones(len(y), dtype=bool)
    mask[np.flatnonzero(y == rare)[keep:]] = False
    np.savez(path, x=x[mask], y=y[mask])
    return path


def _constants(data: bytes) -> dict[str, ConstTensor]:
    found = parse_constants(data)
    assert found is not None, "not a .tflite"
    return {c.key[0]: c for c in found}


def _rewrite(src: Path, dst: Path, edits: dict[str, npt.NDArray[Any]]) -> Path:
    data = bytearray(src.read_bytes())
    consts = _constants(bytes(data))
    for name, value in edits.items():
        const = consts[name]
        raw = np.ascontiguousarray(value, dtype=np.dtype(const.dtype)).tobytes()
        assert len(raw) == const.length, name
        data[const.offset : const.offset + const.length] = raw
    dst.write_bytes(bytes(data))
    return dst


def _const(path: Path, name: str) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32] | None]:
    data = path.read_bytes()
    const = _constants(data)[name]
    count = int(np.prod(const.shape))
    value = np.frombuffer(data, const.dtype, count, const.offset).reshape(const.shape).copy()
    return value, const.scales


def damage_class(dst: Path, cls: int, logits: float = 40.0, src: Path = INT8) -> Path:
    """``src`` with class ``cls``'s output bias lowered by ``logits``: it is never predicted."""
    bias, scales = _const(src, PROBS_BIAS)
    assert scales is not None
    bias[cls] -= round(logits / float(scales[cls]))
    return _rewrite(src, dst, {PROBS_BIAS: bias})


def outlier_channel(dst: Path, channel: int = 3, factor: float = 300.0, src: Path = FP32) -> Path:
    """The same FP32 function with conv1's ``channel`` ``factor`` times larger (see module doc)."""
    w1, _ = _const(src, CONV1)
    b1, _ = _const(src, CONV1_BIAS)
    w2, _ = _const(src, CONV2)
    w1[channel] *= factor
    b1[channel] *= factor
    w2[..., channel] /= factor
    return _rewrite(src, dst, {CONV1: w1, CONV1_BIAS: b1, CONV2: w2})


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``edgefleet ARGV`` in-process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err

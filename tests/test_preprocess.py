"""agent.inference.preprocess against an independent reference: OpenCV + numpy + quantization.

The reference resizes with ``cv2.resize`` (INTER_LINEAR_EXACT for bilinear and
letterbox, INTER_AREA, INTER_NEAREST; a letterbox is crop, resize and pad),
swaps channels and converts to grey with OpenCV, normalises in float32 with
numpy and quantizes as LiteRT's QUANTIZE kernel does,
``rint(x * float32(1 / scale)) + zero_point``. The device path must agree
within one step of the quantized tensor. Its resized pixels are bit-exact with
OpenCV's, except INTER_AREA when not shrinking both sides, which OpenCV computes
with a CPU-dependent SIMD truncation: there they are within one grey level, and
the tensor is within one step wherever the pixels agree (a [-1, 1] mapping puts
every pixel next to a rounding tie, so one grey level can be two steps there).
Quantization parameters are made as the TFLite converter makes them.
"""

from __future__ import annotations

import itertools
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from agent.common.errors import FrameSourceError, ModelError
from agent.inference.preprocess import Preprocessor, preprocessor_for
from agent.inference.resize import crop_box, letterbox_size
from agent.inference.runtime import TensorDetails, quantize
from agent.inference.value_tables import GatherTable, StepTable, tensor_tables
from agent.protocol.input_contract import InputContract

CV_FLAGS = {
    "bilinear": cv2.INTER_LINEAR_EXACT, "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST
}
SOURCES = [(480, 640), (37, 53), (17, 9), (32, 32), (100, 301)]  # down, odd, up, same, wide
MAPPINGS: list[dict[str, Any]] = [
    {"value_range": (-1.0, 1.0)},
    {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)},
]
Array = npt.NDArray[Any]


def tensor(shape: tuple[int, ...], dtype: str, contract: InputContract, per_channel: bool = False
           ) -> TensorDetails:  # fmt: skip
    """An input tensor quantized as a calibrated model's would be: one LSB >= one value step."""
    if dtype == "float32":
        return TensorDetails("image", 0, shape, dtype, 0.0, 0)
    if contract.value_range is not None:
        low, high = contract.value_range
        step, lows = (high - low) / 255.0, [low] * contract.channels
    else:
        assert contract.mean is not None and contract.std is not None
        std = np.broadcast_to(contract.std, contract.channels)
        mean = np.broadcast_to(contract.mean, contract.channels)
        step, lows = 1.0 / float(std.min()), list(-mean / std)
    qmin = np.iinfo(np.dtype(dtype)).min
    # As the TFLite converter does: float32 scales, zero points rounded half away from zero.
    scales = [step * (1.0 + 0.13 * c) for c in range(contract.channels)] if per_channel else [step]
    scales = [float(np.float32(s)) for s in scales]
    zps = [int(np.sign(z) * np.floor(abs(z) + 0.5)) for z in
           (qmin - lows[i] / s for i, s in enumerate(scales))]  # fmt: skip
    if per_channel:
        return TensorDetails("image", 0, shape, dtype, scales[0], zps[0], tuple(scales),
                             tuple(zps), 3)  # fmt: skip
    return TensorDetails("image", 0, shape, dtype, scales[0], zps[0], (scales[0],), (zps[0],))


def opencv_pixels(frame: Array, contract: InputContract) -> Array:
    """Crop, resize (or letterbox), colour order and grey, with OpenCV."""
    height, width = frame.shape[:2]
    ch = max(1, min(height, int(np.floor(height * contract.crop + 0.5))))
    cw = max(1, min(width, int(np.floor(width * contract.crop + 0.5))))
    top, left = (height - ch) // 2, (width - cw) // 2
    img = np.ascontiguousarray(frame[top : top + ch, left : left + cw])
    size = (contract.width, contract.height)
    if contract.resize == "letterbox":
        scale = min(contract.height / ch, contract.width / cw)
        nh = max(1, min(contract.height, int(np.floor(ch * scale + 0.5))))
        nw = max(1, min(contract.width, int(np.floor(cw * scale + 0.5))))
        inner = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR_EXACT)
        img = np.full((contract.height, contract.width, 3), contract.pad, np.uint8)
        y0, x0 = (contract.height - nh) // 2, (contract.width - nw) // 2
        img[y0 : y0 + nh, x0 : x0 + nw] = inner
    elif (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(img, size, interpolation=CV_FLAGS[contract.resize])
    if contract.channels == 1:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., np.newaxis]
    elif contract.color == "BGR":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    return img


def reference(frame: Array, contract: InputContract, spec: TensorDetails) -> Array:
    """OpenCV + numpy, written from the contract's definition, not from our code."""
    x = opencv_pixels(frame, contract).astype(np.float32)
    if contract.value_range is not None:
        low, high = contract.value_range
        values = np.float32(low) + np.float32(high - low) * x / np.float32(255.0)
    else:
        assert contract.mean is not None and contract.std is not None
        mean = np.asarray(contract.mean, np.float32)
        values = ((x - mean) / np.asarray(contract.std, np.float32)).astype(np.float32)
    if spec.dtype == "float32":
        return values[np.newaxis]
    inverse = np.float32(1.0) / np.asarray(spec.scales or (spec.scale,), np.float32)
    zps = np.asarray(spec.zero_points or (spec.zero_point,), np.float32)
    info = np.iinfo(np.dtype(spec.dtype))
    return np.clip(np.rint(values * inverse) + zps, info.min, info.max)[np.newaxis]


def value_step(contract: InputContract) -> float:
    if contract.value_range is not None:
        return (contract.value_range[1] - contract.value_range[0]) / 255.0
    assert contract.std is not None
    return 1.0 / min(contract.std)


def assert_within_one_lsb(got: Array, want: Array, contract: InputContract, what: str) -> None:
    assert got.shape == want.shape, what
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    limit = 1.0 if got.dtype.kind in "iu" else value_step(contract) * 1.0001 + 1e-6
    assert diff.max() <= limit, (what, float(diff.max()), int((diff > 0).sum()))


def frames(shape: tuple[int, int], seed: int) -> list[Array]:
    """A noisy frame and a smooth one: noise finds rounding slips, gradients find offsets."""
    rng = np.random.default_rng(seed)
    noisy = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = np.stack([xx * 255 // max(1, shape[1] - 1), yy * 255 // max(1, shape[0] - 1),
                       (xx + yy) % 256], axis=-1).astype(np.uint8)  # fmt: skip
    return [noisy, smooth]


@pytest.mark.parametrize("method", ["bilinear", "area", "nearest", "letterbox"])
@pytest.mark.parametrize("dtype", ["int8", "uint8", "float32"])
def test_agrees_with_opencv_within_one_lsb(method: str, dtype: str) -> None:
    for (source, color, mapping), target in itertools.product(
        itertools.product(SOURCES, ("RGB", "BGR"), MAPPINGS), [(32, 32), (24, 41)]
    ):
        contract = InputContract(*target, 3, resize=method, color=color,
                                 pad=114 if method == "letterbox" else 0, **mapping)  # fmt: skip
        spec = tensor((1, *target, 3), dtype, contract)
        pre = Preprocessor(contract, spec)
        exact = method != "area" or (source[0] >= target[0] and source[1] >= target[1])
        for i, frame in enumerate(frames(source, seed=sum(source))):
            what = f"{method} {source}->{target} {color} {mapping} {dtype} frame {i}"
            got = pre(frame)
            assert got.dtype == np.dtype(dtype) and got.shape == (1, *target, 3)
            want = reference(frame, contract, spec)
            pixels = pre.pixels(frame).astype(np.int16)
            cv_pixels = opencv_pixels(frame, contract).astype(np.int16)
            if exact:
                np.testing.assert_array_equal(pixels, cv_pixels, err_msg=what)
                assert_within_one_lsb(got, want, contract, what)
            else:
                assert np.abs(pixels - cv_pixels).max() <= 1, what
                same = (pixels == cv_pixels)[np.newaxis]
                assert_within_one_lsb(got[same], want[same], contract, what)


@pytest.mark.parametrize("crop", [0.5, 0.875, 1.0])
@pytest.mark.parametrize("method", ["bilinear", "area", "letterbox"])
def test_central_crop_comes_before_the_resize(crop: float, method: str) -> None:
    contract = InputContract(40, 30, 3, resize=method, crop=crop, value_range=(0.0, 1.0))
    spec = tensor((1, 40, 30, 3), "int8", contract)
    pre = Preprocessor(contract, spec)
    for source in [(480, 640), (33, 47), (40, 30)]:
        for frame in frames(source, seed=7):
            assert_within_one_lsb(pre(frame), reference(frame, contract, spec), contract,
                                  f"crop {crop} {method} {source}")  # fmt: skip


@pytest.mark.parametrize("dtype", ["int8", "uint8", "float32"])
def test_grey_models_get_bt601_luma(dtype: str) -> None:
    contract = InputContract(28, 28, 1, value_range=(0.0, 1.0))
    spec = tensor((1, 28, 28, 1), dtype, contract)
    pre = Preprocessor(contract, spec)
    for source in [(480, 640), (28, 28), (9, 13)]:
        for frame in frames(source, seed=3):
            got = pre(frame)
            assert got.shape == (1, 28, 28, 1)
            assert_within_one_lsb(got, reference(frame, contract, spec), contract, f"{source}")


def test_per_channel_input_quantization() -> None:
    contract = InputContract(16, 16, 3, mean=(120.0, 110.0, 100.0), std=(60.0, 61.0, 62.0))
    spec = tensor((1, 16, 16, 3), "int8", contract, per_channel=True)
    pre = Preprocessor(contract, spec)
    for frame in frames((50, 70), seed=11):
        assert_within_one_lsb(pre(frame), reference(frame, contract, spec), contract, "per-ch")
    bad = TensorDetails("image", 0, (1, 16, 16, 3), "int8", 0.1, 0, (0.1, 0.2), (0, 0), 3)
    with pytest.raises(ModelError, match="per channel on axis 3 with 2 scales"):
        Preprocessor(contract, bad)


def test_fast_step_tables_equal_the_plain_lookup() -> None:
    """Whichever way a table is applied, each pixel becomes exactly its table entry."""
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(60):
        channels = 3
        if rng.random() < 0.5:
            low = float(rng.choice([-1.0, 0.0, -0.5, -2.0]))
            mapping: dict[str, Any] = {"value_range": (low, low + float(rng.uniform(0.5, 3.0)))}
        else:
            mapping = {"mean": tuple(rng.uniform(0, 255, 3)), "std": tuple(rng.uniform(20, 130, 3))}
        dtype = str(rng.choice(["int8", "uint8"]))
        contract = InputContract(8, 12, channels, **mapping)
        scale = float(rng.uniform(0.003, 0.03))
        zp = int(rng.integers(-128, 128)) if dtype == "int8" else int(rng.integers(0, 256))
        spec = TensorDetails("image", 0, (1, 8, 12, 3), dtype, scale, zp)
        tables = tensor_tables(contract, spec)
        pre = Preprocessor(contract, spec)
        seen.add(type(pre.table).__name__)
        frame = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
        frame[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]  # the table's edges
        want = np.stack([tables[c][frame[..., c]] for c in range(3)], axis=-1)[np.newaxis]
        np.testing.assert_array_equal(pre(frame), want)
        np.testing.assert_array_equal(pre(frame, pre.new_tensor()), want)  # the direct path
        gathered = np.empty_like(want)
        GatherTable(tables).apply(frame, gathered)
        np.testing.assert_array_equal(gathered, want)
        step = StepTable.build(tables, 8 * 12)
        if step is not None:
            stepped = np.empty_like(want)
            step.apply(frame, stepped)
            np.testing.assert_array_equal(stepped, want)
    assert seen == {"StepTable", "GatherTable"}  # both paths were exercised


def test_the_tables_fuse_mapping_and_the_runtimes_quantization() -> None:
    contract = InputContract(4, 4, 3, value_range=(-1.0, 1.0))
    spec = TensorDetails("image", 0, (1, 4, 4, 3), "int8", 0.007843137718737125, -1)
    tables = tensor_tables(contract, spec)
    pixels = np.arange(256, dtype=np.float32)
    values = np.float32(-1.0) + np.float32(2.0) * pixels / np.float32(255.0)
    np.testing.assert_array_equal(tables[0], quantize(values, spec.scale, spec.zero_point, np.int8))
    assert tables.dtype == np.int8 and tables.shape == (3, 256)


def test_buffers_and_caching() -> None:
    contract = InputContract(24, 24, 3, value_range=(0.0, 1.0))
    spec = tensor((1, 24, 24, 3), "int8", contract)
    pre = Preprocessor(contract, spec)
    frame_a, frame_b = frames((60, 80), seed=1)[0], frames((30, 20), seed=2)[0]
    first, second = pre(frame_a), pre(frame_a)
    assert first is not second and np.array_equal(first, second)  # no hidden aliasing
    out = pre.new_tensor()
    assert pre(frame_b, out) is out
    np.testing.assert_array_equal(out, Preprocessor(contract, spec)(frame_b))
    for _ in range(3):  # alternating camera sizes reuse their own tables
        np.testing.assert_array_equal(pre(frame_a), first)
        np.testing.assert_array_equal(pre(frame_b), out)
    for size in [(10, 10), (11, 10), (12, 10), (13, 10), (14, 10)]:  # evicts the oldest sizes
        pre(frames(size, seed=4)[0])
    np.testing.assert_array_equal(pre(frame_a), first)
    readonly = frame_a.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(pre(readonly), first)
    np.testing.assert_array_equal(pre(np.asfortranarray(frame_a)), first)
    with pytest.raises(ModelError, match="output buffer"):
        pre(frame_a, np.empty((1, 24, 24, 3), np.uint8))
    # Steps 1-4 and step 5 apart, as publish-time tools use them.
    np.testing.assert_array_equal(pre.map_pixels(pre.pixels(frame_a).copy()), first)
    with pytest.raises(FrameSourceError, match=r"pixels must be uint8 \[24, 24, 3\]"):
        pre.map_pixels(frame_a)


BAD_FRAMES = [
    np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
    [[0, 0, 0]],
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_FRAMES)
def test_frames_must_be_uint8_rgb(bad: Any) -> None:
    contract = InputContract(8, 8, 3, value_range=(0.0, 1.0))
    pre = Preprocessor(contract, tensor((1, 8, 8, 3), "int8", contract))
    with pytest.raises(FrameSourceError, match="uint8 HxWx3 RGB"):
        pre(bad)


def test_contract_and_tensor_must_match() -> None:
    contract = InputContract(8, 8, 3, value_range=(0.0, 1.0))
    with pytest.raises(ModelError, match=r"input contract is for \[1, 8, 8, 3\]"):
        Preprocessor(contract, TensorDetails("image", 0, (1, 8, 9, 3), "int8", 0.1, 0))
    with pytest.raises(ModelError, match="int16"):
        Preprocessor(contract, TensorDetails("image", 0, (1, 8, 8, 3), "int16", 0.1, 0))
    with pytest.raises(ModelError, match="without a quantization scale"):
        Preprocessor(contract, TensorDetails("image", 0, (1, 8, 8, 3), "int8", 0.0, 0))


def test_legacy_releases_get_bilinear_and_the_configured_range() -> None:
    spec = TensorDetails("image", 0, (1, 16, 16, 3), "float32", 0.0, 0)
    pre = preprocessor_for(None, spec, legacy_range=(-1.0, 1.0))
    assert pre.contract == InputContract(16, 16, 3, value_range=(-1.0, 1.0))
    frame = frames((40, 40), seed=9)[1]
    assert_within_one_lsb(pre(frame), reference(frame, pre.contract, spec), pre.contract, "")


def test_geometry_helpers() -> None:
    assert crop_box(480, 640, 0.5) == (120, 160, 240, 320)
    assert crop_box(5, 5, 0.01) == (2, 2, 1, 1)  # never empty
    assert letterbox_size(480, 640, 224, 224) == (168, 224)
    assert letterbox_size(640, 480, 224, 224) == (224, 168)
    assert letterbox_size(1, 1000, 32, 32) == (1, 32)

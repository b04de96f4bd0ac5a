"""The committed test models load and behave under LiteRT, as the agent will run them.

Fixtures are made by scripts/make_test_models.py; see tests/fixtures/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
DIGITS = [f"digits_{v}_r{r}.tflite" for r in (1, 2) for v in ("fp32", "int8")]
ALL_MODELS = [*DIGITS, "mobilenetv2_int8.tflite"]
SHAPES = {
    "digits": ([1, 32, 32, 3], [1, 10]),
    "mobilenetv2": ([1, 224, 224, 3], [1, 100]),
}
# Flatbuffer TensorType codes (tflite schema).
TENSOR_FLOAT32, TENSOR_INT8 = 0, 9


def load(name: str) -> Any:
    interp = Interpreter(model_path=str(FIXTURES / name), num_threads=1)
    interp.allocate_tensors()
    return interp


def quantize(x: npt.NDArray[np.float32], detail: dict[str, Any]) -> npt.NDArray[Any]:
    """What a device does before set_tensor: float -> input dtype via the tensor's params."""
    if detail["dtype"] != np.int8:
        return x.astype(np.float32)
    scale, zero_point = detail["quantization"]
    q: npt.NDArray[np.int8] = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
    return q


def val_set() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(FIXTURES / "digits_val.npz") as data:
        return data["x"], data["y"]


def accuracy(name: str) -> float:
    interp = load(name)
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    x, y = val_set()
    correct = 0
    for xi, yi in zip(x, y, strict=True):
        interp.set_tensor(inp["index"], quantize(xi[np.newaxis], inp))
        interp.invoke()
        correct += int(np.argmax(interp.get_tensor(out["index"])[0]) == yi)
    return correct / len(y)


def constant_tensors(name: str) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """Tensor name -> (shape, type, data) for every tensor that carries a constant buffer."""
    model = schema.ModelT.InitFromPackedBuf((FIXTURES / name).read_bytes(), 0)
    consts: dict[str, tuple[tuple[int, ...], int, bytes]] = {}
    for tensor in model.subgraphs[0].tensors:
        data = model.buffers[tensor.buffer].data
        if data is not None and len(data):
            consts[tensor.name.decode()] = (tuple(tensor.shape), tensor.type, bytes(data))
    return consts


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_loads_invokes_and_has_expected_signature(name: str) -> None:
    interp = load(name)
    (inp,) = interp.get_input_details()
    (out,) = interp.get_output_details()
    in_shape, out_shape = SHAPES[name.split("_", maxsplit=1)[0]]
    assert inp["shape"].tolist() == in_shape
    assert out["shape"].tolist() == out_shape
    want = np.int8 if "int8" in name else np.float32
    assert inp["dtype"] == want
    assert out["dtype"] == want

    rng = np.random.default_rng(0)
    frame = rng.uniform(0.0, 1.0, size=in_shape).astype(np.float32)
    interp.set_tensor(inp["index"], quantize(frame, inp))
    interp.invoke()
    result = interp.get_tensor(out["index"])
    assert result.shape == tuple(out_shape)
    tolerance = 1e-4
    probs = result
    if want == np.int8:
        scale, zero_point = out["quantization"]
        probs = (result.astype(np.float32) - zero_point) * scale
        tolerance = out_shape[-1] * scale / 2  # half a step of rounding per class
    # Softmax output: dequantized values are probabilities that sum to ~1.
    assert np.all(probs >= 0.0)
    assert abs(float(probs.sum()) - 1.0) <= tolerance


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if "int8" in n])
def test_int8_quantization_params_are_sensible(name: str) -> None:
    interp = load(name)
    for detail in (*interp.get_input_details(), *interp.get_output_details()):
        scale, zero_point = detail["quantization"]
        assert 0.0 < scale < 1.0, detail["name"]
        assert -128 <= zero_point <= 127, detail["name"]
        params = detail["quantization_parameters"]
        assert params["scales"].tolist() == pytest.approx([scale])
    out_scale, out_zero = interp.get_output_details()[0]["quantization"]
    # Softmax in [0, 1] maps onto the full int8 range.
    assert out_scale == pytest.approx(1 / 256)
    assert out_zero == -128
    if name.startswith("digits"):
        in_scale, in_zero = interp.get_input_details()[0]["quantization"]
        # Inputs are floats in [0, 1].
        assert in_scale == pytest.approx(1 / 255, rel=1e-3)
        assert in_zero == -128


@pytest.mark.parametrize("name", DIGITS)
def test_digits_accuracy_on_validation_set(name: str) -> None:
    assert accuracy(name) > 0.9


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_release_two_has_same_tensors_but_new_weights(variant: str) -> None:
    r1 = constant_tensors(f"digits_{variant}_r1.tflite")
    r2 = constant_tensors(f"digits_{variant}_r2.tflite")
    # The delta codec matches tensors by name, shape and type.
    assert {k: v[:2] for k, v in r1.items()} == {k: v[:2] for k, v in r2.items()}
    kernels = [k for k, (_, kind, _) in r1.items() if kind in (TENSOR_FLOAT32, TENSOR_INT8)]
    assert len(kernels) >= 5
    unchanged = [k for k in kernels if r1[k][2] == r2[k][2]]
    assert unchanged == []
    assert (FIXTURES / f"digits_{variant}_r1.tflite").read_bytes() != (
        FIXTURES / f"digits_{variant}_r2.tflite"
    ).read_bytes()


def test_validation_set_and_labels() -> None:
    x, y = val_set()
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert x.shape[1:] == (32, 32, 3)
    assert 250 <= len(x) == len(y) <= 400
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    labels = (FIXTURES / "digits_labels.txt").read_text().splitlines()
    assert labels == [str(i) for i in range(10)]


def test_golden_frames_match_validation_set() -> None:
    x, y = val_set()
    frames = FIXTURES / "golden_frames"
    pngs = sorted(frames.glob("*.png"))
    assert len(pngs) == 5
    assert len(list(frames.glob("*.npy"))) == 5
    for png in pngs:
        match = re.fullmatch(r"digit_(\d)_(\d+)", png.stem)
        assert match, png.name
        label, index = int(match[1]), int(match[2])
        assert y[index] == label
        arr = np.load(png.with_suffix(".npy"))
        assert arr.dtype == np.float32
        assert arr.shape == (32, 32, 3)
        np.testing.assert_array_equal(arr, x[index])
        with Image.open(png) as img:
            assert img.mode == "RGB"
            pixels = np.asarray(img)
        np.testing.assert_array_equal(pixels, np.round(arr * 255.0).astype(np.uint8))


def test_fixture_total_size_and_readme() -> None:
    files = [p for p in FIXTURES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 1024 * 1024
    readme = (FIXTURES / "README.md").read_text()
    for path in files:
        if path.name != "README.md":
            assert f"`{path.relative_to(FIXTURES)}`" in readme, path


def test_truncated_model_is_refused() -> None:
    data = (FIXTURES / "digits_int8_r1.tflite").read_bytes()
    with pytest.raises(ValueError):
        Interpreter(model_content=data[: len(data) // 2])


def test_float_frame_into_int8_model_is_refused() -> None:
    interp = load("digits_int8_r1.tflite")
    inp = interp.get_input_details()[0]
    with pytest.raises(ValueError, match="type"):
        interp.set_tensor(inp["index"], np.zeros(inp["shape"], dtype=np.float32))

"""agent.inference.runtime against real LiteRT on the committed fixtures.

Quantization is checked two ways: against the parameters LiteRT itself reports,
and bit-for-bit against LiteRT's own QUANTIZE kernel on a one-op model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from agent.common.errors import ModelError, RuntimeUnavailableError
from agent.inference.runtime import (
    RUNTIME_TYPES,
    Model,
    dequantize,
    load_model,
    quantize,
    resolve_runtime,
)

FIXTURES = Path(__file__).parent / "fixtures"
INT8 = FIXTURES / "digits_int8_r1.tflite"
FP32 = FIXTURES / "digits_fp32_r1.tflite"


@pytest.fixture(scope="module")
def int8_model() -> Model:
    return load_model(INT8, runtime="litert", num_threads=1)


@pytest.fixture(scope="module")
def val() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(FIXTURES / "digits_val.npz") as data:
        return data["x"], data["y"]


def test_input_params_are_litert_own(int8_model: Model) -> None:
    interp = Interpreter(model_path=str(INT8), num_threads=1)
    raw = interp.get_input_details()[0]
    params = raw["quantization_parameters"]
    spec = int8_model.input
    assert spec.dtype == "int8" and spec.shape == tuple(raw["shape"])
    assert spec.scale == pytest.approx(float(params["scales"][0]), rel=0, abs=0)
    assert spec.zero_point == int(params["zero_points"][0])
    assert spec.scales == tuple(float(s) for s in params["scales"])
    assert spec.is_quantized
    assert int8_model.runtime_name == "litert"


def test_quantized_val_frames_classify(int8_model: Model, val: Any) -> None:
    x, y = val
    predictions = [int(int8_model.invoke_raw(int8_model.quantize_input(f)).argmax()) for f in x]
    accuracy = float(np.mean(np.array(predictions) == y))
    assert accuracy > 0.9


def test_quantize_input_matches_manual_formula(int8_model: Model, val: Any) -> None:
    frame = val[0][0]
    q = int8_model.quantize_input(frame)
    spec = int8_model.input
    expected = np.clip(np.round(frame / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    assert q.dtype == np.int8 and q.shape == spec.shape
    np.testing.assert_array_equal(q[0], expected)


def test_dequantized_softmax_output_sums_to_one(int8_model: Model, val: Any) -> None:
    raw = int8_model.invoke_raw(int8_model.quantize_input(val[0][3]))
    assert raw.dtype == np.int8
    probs = int8_model.dequantize_output(raw)
    assert probs.dtype == np.float32
    assert float(probs.sum()) == pytest.approx(1.0, abs=0.05)


def test_invoke_raw_returns_a_copy(int8_model: Model, val: Any) -> None:
    first = int8_model.invoke_raw(int8_model.quantize_input(val[0][0]))
    kept = first.copy()
    int8_model.invoke_raw(int8_model.quantize_input(val[0][1]))
    np.testing.assert_array_equal(first, kept)


def test_fp32_model_passes_floats_through(val: Any) -> None:
    model = load_model(FP32, runtime="auto", num_threads=2)
    assert model.num_threads == 2
    frame = val[0][0]
    q = model.quantize_input(frame)
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q[0], frame)
    out = model.invoke_raw(q)
    np.testing.assert_array_equal(model.dequantize_output(out), out)
    x, y = val
    predictions = np.array([int(model.invoke_raw(model.quantize_input(f)).argmax()) for f in x])
    assert float(np.mean(predictions == y)) > 0.9


def test_wrong_input_shape_and_dtype_are_model_errors(int8_model: Model) -> None:
    with pytest.raises(ModelError, match="does not fit"):
        int8_model.quantize_input(np.zeros((28, 28, 3), np.float32))
    with pytest.raises(ModelError, match="inference"):
        int8_model.invoke_raw(np.zeros((1, 32, 32, 3), np.float32))


def test_closed_model_refuses_to_run(val: Any) -> None:
    model = load_model(INT8)
    frame = model.quantize_input(val[0][0])
    model.invoke_raw(frame)
    model.close()
    with pytest.raises(ModelError, match="closed"):
        model.invoke_raw(frame)


def test_garbage_model_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"this is not a model at all" * 10)
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        load_model(garbage)


def test_truncated_model_file(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(INT8.read_bytes()[:4096])
    with pytest.raises(ModelError, match="could not load"):
        load_model(truncated)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(tmp_path / "absent.tflite")


def test_unknown_runtime_type_fails_loudly() -> None:
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime type 'tensorrt'"):
        load_model(INT8, runtime="tensorrt")


def test_missing_runtime_package_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeUnavailableError, match="tflite-runtime"):
        load_model(INT8, runtime="tflite-runtime")


def test_auto_reports_every_missing_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeUnavailableError, match=r"litert.*tflite-runtime"):
        resolve_runtime("auto")


def test_auto_prefers_litert() -> None:
    assert resolve_runtime("auto").name == "litert"
    assert RUNTIME_TYPES == ("auto", "litert", "tflite-runtime")


# LiteRT's Delegate.__del__ trips over its own half-built object after a failed load.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_edgetpu_delegate_missing_library_fails_loudly() -> None:
    # No libedgetpu on a build machine: the configured delegate must not be skipped silently.
    with pytest.raises(RuntimeUnavailableError, match=r"libedgetpu\.so\.1"):
        load_model(INT8, runtime="litert", delegate="edgetpu", delegate_device="usb")


@pytest.mark.parametrize(("delegate", "device", "match"), [
    ("gpu", "", "unknown delegate 'gpu'"),
    ("edgetpu", "firewire", "edgetpu device 'firewire'"),
])
def test_bad_delegate_config(delegate: str, device: str, match: str) -> None:
    with pytest.raises(RuntimeUnavailableError, match=match):
        load_model(INT8, delegate=delegate, delegate_device=device)


@pytest.mark.parametrize("threads", [0, -1, True])
def test_num_threads_must_be_positive(threads: Any) -> None:
    with pytest.raises(ValueError, match="num_threads"):
        load_model(INT8, num_threads=threads)


# ---- the pure helpers against LiteRT's own QUANTIZE kernel ------------------------


def _quantize_op_model(path: Path, scale: float, zero_point: int, out_type: int, n: int) -> None:
    """A one-op float32 -> int8/uint8 QUANTIZE model, built with LiteRT's schema."""
    def tensor(name: str, ttype: int, quant: Any) -> Any:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer, t.quantization = name, [1, n], ttype, 0, quant
        return t
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [scale], [zero_point]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
    code.version = 1 if out_type == schema.TensorType.UINT8 else 2
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    graph = schema.SubGraphT()
    graph.tensors = [tensor("x", schema.TensorType.FLOAT32, None), tensor("q", out_type, q)]
    graph.inputs, graph.outputs, graph.operators = [0], [1], [op]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [schema.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


@pytest.mark.parametrize(("scale", "zero_point", "dtype"), [
    (1 / 255, -128, np.int8),
    (0.0078431, -1, np.int8),
    (0.5, 3, np.int8),
    (1 / 255, 0, np.uint8),
    (0.25, 128, np.uint8),
])
def test_quantize_matches_litert_kernel(
    tmp_path: Path, scale: float, zero_point: int, dtype: Any
) -> None:
    rng = np.random.default_rng(7)
    # Random values, values far out of range, and values at or next to .5 ties on
    # both sides of zero: they pin down the rounding mode and reciprocal arithmetic.
    ties = (np.arange(-40, 40, dtype=np.float32) + np.float32(0.5)) * np.float32(scale)
    x = np.concatenate([
        rng.uniform(-2, 2, 4000).astype(np.float32),
        np.array([-1e6, 1e6, 0.0, -0.0], np.float32),
        ties,
    ])
    ttype = schema.TensorType.INT8 if dtype == np.int8 else schema.TensorType.UINT8
    path = tmp_path / "quantize.tflite"
    _quantize_op_model(path, scale, zero_point, ttype, len(x))
    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x[None])
    interp.invoke()
    litert = interp.get_tensor(interp.get_output_details()[0]["index"])[0]
    ours = quantize(x, scale, zero_point, dtype)
    assert ours.dtype == litert.dtype
    np.testing.assert_array_equal(ours, litert)


def test_dequantize_inverts_quantize_within_half_a_step() -> None:
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    back = dequantize(quantize(x, 1 / 255, -128, np.int8), 1 / 255, -128)
    assert float(np.abs(back - x).max()) <= 0.5 / 255 + 1e-6


def test_quantize_refuses_zero_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        quantize(np.zeros(3, np.float32), 0.0, 0, np.int8)
    with pytest.raises(ValueError, match="scale"):
        dequantize(np.zeros(3, np.int8), -1.0, 0)

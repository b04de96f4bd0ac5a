"""server.publish.registry and agent.inference.smoke_vector on the real fixtures, real LiteRT."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from agent.inference.smoke_vector import compare_golden, golden_input_array
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import ModelManifest, model_target_path
from server.errors import ConflictError, InvalidInputError, ModelValidationError
from server.publish.keys import init_keys
from server.publish.registry import (
    build_manifest,
    check_golden,
    inspect_model,
    load_labels,
    make_golden,
    publish_model,
)
from server.publish.tuf_repo import TufRepository

FIXTURES = Path(__file__).parent / "fixtures"
INT8 = FIXTURES / "digits_int8_r1.tflite"
INT8_R2 = FIXTURES / "digits_int8_r2.tflite"
FP32 = FIXTURES / "digits_fp32_r1.tflite"
FP32_R2 = FIXTURES / "digits_fp32_r2.tflite"
LABELS = tuple("0123456789")
UNIT = ContractOptions(value_range=(0.0, 1.0))  # the digits fixtures take [0, 1]


def _add_model(path: Path, inputs: int) -> Path:
    """A float32 ADD model with one or two graph inputs, built with LiteRT's schema."""
    tensors = []
    for name in ("a", "b", "out"):
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1, 4], schema.TensorType.FLOAT32, 0
        tensors.append(t)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 1
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1 if inputs == 2 else 0], [2]
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = (
        tensors,
        [0, 1][:inputs],
        [2],
        [op],
    )
    if inputs == 1:
        graph.tensors = [tensors[0], tensors[2]]
        op.inputs, op.outputs, graph.outputs = [0, 0], [1], [1]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [schema.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    init_keys(tmp_path / "keys")
    return TufRepository.create(tmp_path / "repo", tmp_path / "keys")


def test_inspect_int8_fixture() -> None:
    inputs, outputs = inspect_model(INT8)
    assert len(inputs) == 1 and len(outputs) == 1
    assert (inputs[0].shape, inputs[0].dtype) == ((1, 32, 32, 3), "int8")
    assert inputs[0].scale == pytest.approx(1 / 255) and inputs[0].zero_point == -128
    assert (outputs[0].shape, outputs[0].dtype) == ((1, 10), "int8")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "no TFL3"),
        (b"hello world, not a model", "no TFL3"),
        (b"\x00" * 4 + b"TFL3" + b"\x00" * 8, "LiteRT cannot load"),
    ],
)
def test_garbage_is_not_a_model(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.tflite"
    path.write_bytes(content)
    with pytest.raises(ModelValidationError, match=match):
        inspect_model(path)


def test_truncated_model_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.tflite"
    path.write_bytes(INT8.read_bytes()[:5000])
    with pytest.raises(ModelValidationError, match="LiteRT cannot load"):
        inspect_model(path)
    with pytest.raises(ModelValidationError, match="cannot read model"):
        inspect_model(tmp_path / "missing.tflite")


def test_two_input_model_is_refused(tmp_path: Path) -> None:
    one = _add_model(tmp_path / "one.tflite", inputs=1)
    assert len(inspect_model(one)[0]) == 1  # the builder itself makes valid models
    with pytest.raises(ModelValidationError, match="2 inputs; exactly one"):
        inspect_model(_add_model(tmp_path / "two.tflite", inputs=2))


def test_golden_input_is_deterministic_and_typed() -> None:
    a = golden_input_array("seed", (1, 32, 32, 3), "int8")
    assert a.dtype == np.int8 and a.shape == (1, 32, 32, 3)
    assert np.array_equal(a, golden_input_array("seed", (1, 32, 32, 3), "int8"))
    assert not np.array_equal(a, golden_input_array("other", (1, 32, 32, 3), "int8"))
    assert a.min() < -100 and a.max() > 100  # covers the int8 range
    f = golden_input_array("seed", (2, 8), "float32")
    assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 1.0
    same_bytes = np.round(f * 255).astype(np.uint8).view(np.int8).ravel()
    np.testing.assert_array_equal(same_bytes, a.ravel()[:16])


def test_make_golden_int8_and_float_tolerances(tmp_path: Path) -> None:
    g = make_golden(INT8, "s1")
    assert g.tolerance == 2 and len(g.output) == 10
    assert make_golden(INT8, "s1") == g
    gf = make_golden(FP32, "s1")
    assert gf.tolerance == 10 and len(gf.output) == 40
    gadd = make_golden(_add_model(tmp_path / "one.tflite", inputs=1), "s")
    expected = 2 * golden_input_array("s", (1, 4), "float32")
    assert np.frombuffer(gadd.output, np.float32).tolist() == expected.ravel().tolist()


def test_build_manifest_and_check_golden() -> None:
    manifest = build_manifest(
        INT8, "digits", 1, "int8-cpu", LABELS, fp32_length=117580, input_options=UNIT
    )
    assert manifest.sha256 == __import__("hashlib").sha256(INT8.read_bytes()).hexdigest()
    assert manifest.length == INT8.stat().st_size and manifest.labels == LABELS
    assert manifest.golden.seed == "digits/1/int8-cpu" and manifest.fp32_length == 117580
    check_golden(INT8, manifest)
    check_golden(INT8, manifest, num_threads=2)
    fp32 = build_manifest(FP32, "digits", 1, "fp32", LABELS, input_options=UNIT)
    check_golden(FP32, fp32, num_threads=2)
    with pytest.raises(ModelValidationError, match="golden mismatch"):
        check_golden(FP32_R2, fp32)


def test_check_golden_catches_a_wrong_expected_output() -> None:
    manifest = build_manifest(INT8, "digits", 1, "int8-cpu", LABELS, input_options=UNIT)
    out = np.frombuffer(manifest.golden.output, np.int8).astype(np.int16)
    out[3] = out[3] + 3 if out[3] < 120 else out[3] - 3
    bad_golden = dataclasses.replace(
        manifest.golden,
        output_b64=base64.b64encode(out.astype(np.int8).tobytes()).decode(),
    )
    with pytest.raises(ModelValidationError, match=r"output\[3\].*3 steps > tolerance 2"):
        check_golden(INT8, dataclasses.replace(manifest, golden=bad_golden))
    with pytest.raises(ModelValidationError, match="bytes"):
        check_golden(FP32, manifest)  # float output against an int8 golden


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "Bad Name"}, InvalidInputError, "model name"),
        ({"release": 0}, InvalidInputError, "release"),
        ({"variant": "quantum"}, InvalidInputError, "variant"),
        ({"labels": ("a", "b")}, ModelValidationError, "2 labels given but output 0 has 10"),
        ({"fp32_length": 0}, InvalidInputError, "fp32_length"),
    ],
)
def test_build_manifest_rejects_bad_input(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {
        "name": "digits", "release": 1, "variant": "int8-cpu", "labels": (), "input_options": UNIT
    }
    with pytest.raises(error, match=match):
        build_manifest(INT8, **{**args, **kwargs})


def test_publish_round_trips_and_is_idempotent(repo: TufRepository) -> None:
    manifest = publish_model(repo, INT8, "digits", 1, "int8-cpu", LABELS, input_options=UNIT)
    target = model_target_path("digits", 1, "int8-cpu")
    info = repo.targets()[target]
    assert ModelManifest.from_custom(info.custom) == manifest
    assert info.sha256 == manifest.sha256 and info.length == manifest.length
    versions = repo.versions()
    again = publish_model(repo, INT8, "digits", 1, "int8-cpu", LABELS, input_options=UNIT)
    assert again == manifest
    assert repo.versions() == versions  # nothing re-signed
    with pytest.raises(ConflictError, match="already published with other bytes"):
        publish_model(repo, INT8_R2, "digits", 1, "int8-cpu", LABELS, input_options=UNIT)
    second = publish_model(repo, INT8_R2, "digits", 2, "int8-cpu", LABELS, input_options=UNIT)
    assert set(repo.targets()) == {target, model_target_path("digits", 2, "int8-cpu")}
    assert second.sha256 != manifest.sha256


def test_publish_garbage_signs_nothing(repo: TufRepository, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(ModelValidationError):
        publish_model(repo, bad, "digits", 1, "int8-cpu")
    assert repo.targets() == {} and repo.versions()["targets"] == 1


def test_load_labels_text_and_json(tmp_path: Path) -> None:
    assert load_labels(FIXTURES / "digits_labels.txt") == LABELS
    path = tmp_path / "labels.json"
    path.write_text('["cat", "dog"]')
    assert load_labels(path) == ("cat", "dog")
    path.write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="JSON list of strings"):
        load_labels(path)
    path.write_text("[oops")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        load_labels(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidInputError, match="cannot read labels"):
        load_labels(path)


# ---- compare_golden: the pure core shared with the device's smoke test ----------


def _b(values: list[Any], dtype: str) -> bytes:
    return np.array(values, dtype=dtype).tobytes()


@pytest.mark.parametrize(
    ("expected", "actual", "dtype", "tol", "ok"),
    [
        ([0, 10, -128], [2, 8, -126], "int8", 2, True),
        ([0, 10, -128], [3, 10, -128], "int8", 2, False),
        ([0, 255], [1, 253], "uint8", 2, True),
        ([0, 255], [0, 252], "uint8", 2, False),
        ([0.5, 0.25], [0.5009, 0.25], "float32", 10, True),  # |d| <= 10e-4 * 1
        ([0.5, 0.25], [0.502, 0.25], "float32", 10, False),
        ([100.0, 1.0], [100.09, 1.0], "float32", 10, True),  # scale 100 -> limit 0.1
        ([100.0, 1.0], [100.2, 1.0], "float32", 10, False),
        ([1.0], [float("nan")], "float32", 10, False),
    ],
)
def test_compare_golden_semantics(
    expected: list[Any], actual: list[Any], dtype: str, tol: int, ok: bool
) -> None:
    reason = compare_golden(_b(expected, dtype), _b(actual, dtype), dtype, tol)
    assert (reason is None) is ok, reason


def test_compare_golden_reports_malformed_input() -> None:
    assert "bytes" in (compare_golden(b"\x00\x01", b"\x00", "int8", 2) or "")
    assert "does not support" in (compare_golden(b"\x00", b"\x00", "bool", 2) or "")
    assert "negative" in (compare_golden(b"\x00", b"\x00", "int8", -1) or "")
    assert "whole number" in (compare_golden(b"\x00" * 3, b"\x00" * 3, "float32", 2) or "")
    assert "whole number" in (compare_golden(b"", b"", "int8", 2) or "")

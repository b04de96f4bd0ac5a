"""``edgefleet model validate``: the accuracy gate on files, with real LiteRT.

A class collapsed in an INT8 model hides in the average when it is rare (3
samples of 543: 0.55 points overall) and must still be refused by name; a file
that is not integer where its variant needs it is refused naming the tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from quantize_helpers import (
    FP32,
    INT8,
    LABELS,
    damage_class,
    run_cli,
    write_rare_class_set,
    write_sets,
)

RARE = 7


def validate(
    capsys: pytest.CaptureFixture[str], candidate: Path, validation: Path, *extra: str
) -> tuple[int, str, str]:
    return run_cli(
        capsys, "model", "validate", str(candidate), "--reference", str(FP32), "--validation",
        str(validation), "--labels", str(LABELS), "--input-range", "0,1", "--quiet", *extra,
    )  # fmt: skip


def test_rare_collapsed_class_is_refused_by_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    candidate = damage_class(tmp_path / "damaged.tflite", RARE)
    val = write_rare_class_set(tmp_path / "rare.npz", RARE)
    code, out, err = validate(capsys, candidate, val, "--json")
    assert code == 3, err
    data = json.loads(out)
    assert data["failed_classes"] == [str(RARE)]
    assert data["decision"] == "mixed-precision-or-qat"
    overall = data["overall"]
    assert {"reference", "candidate", "drop"} <= set(overall)
    assert 0 < overall["drop"] < 1.0  # the average alone would have shipped it
    rows = {row["label"]: row for row in data["per_class"]}
    assert set(rows) == {str(i) for i in range(10)}  # every class of the set, reported
    rare = rows[str(RARE)]
    assert (rare["n"], rare["reference"], rare["candidate"], rare["drop"]) == (3, 100.0, 0.0, 100.0)
    assert all({"label", "n", "reference", "candidate", "drop"} <= set(r) for r in rows.values())
    assert any(c["true"] == str(RARE) and c["delta"] > 0 for c in data["confusion_changes"])


def test_rare_collapse_in_text_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    candidate = damage_class(tmp_path / "damaged.tflite", RARE)
    val = write_rare_class_set(tmp_path / "rare.npz", RARE)
    code, out, _ = validate(capsys, candidate, val)
    assert code == 3
    assert f"failed classes: {RARE}" in out
    assert "collapsed" in out.splitlines()[0]


def test_the_converter_int8_fixture_ships(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    val = write_rare_class_set(tmp_path / "rare.npz", RARE)
    code, out, err = validate(capsys, INT8, val, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["decision"] == "ship" and data["failed_classes"] == []
    assert data["variant"] == {"name": "int8-cpu", "not_integer": []}


def test_fp32_file_as_int8_variant_is_refused_naming_tensors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, val = write_sets(tmp_path)
    code, out, _ = validate(capsys, FP32, val, "--json")
    assert code == 3
    data = json.loads(out)
    assert data["decision"] == "wrong-variant"
    named = " ".join(data["variant"]["not_integer"])
    assert "serving_default_image:0" in named and "StatefulPartitionedCall_1:0" in named
    code, out, _ = validate(capsys, FP32, val)
    assert code == 3
    assert "serving_default_image:0" in out.splitlines()[0]


def _a16w8(tmp_path: Path, cal: Path, whole_model: bool) -> Path:
    """ai-edge-quantizer with int16 activations: everywhere, or in the conv layers only."""
    aeq = pytest.importorskip("ai_edge_quantizer")
    recipe = aeq.recipe.static_wi8_ai16() if whole_model else aeq.recipe.static_wi8_ai8()
    q = aeq.quantizer.Quantizer(str(FP32), recipe)
    if not whole_model:
        q.add_static_config(".*", aeq.qtyping.TFLOperationName.CONV_2D, 16, 8)
    with np.load(cal) as npz:  # camera frames are 2x the model's size: every other pixel
        samples = [{"image": (x[None, ::2, ::2] / np.float32(255)).astype(np.float32)}
                   for x in npz["x"][:20]]  # fmt: skip
    with warnings.catch_warnings():  # its debugging interpreter warns; that is what it is for
        warnings.simplefilter("ignore")
        result = q.quantize(q.calibrate({"serving_default": samples}), enable_progress_report=False)
    path = tmp_path / ("a16w8.tflite" if whole_model else "conv_a16w8.tflite")
    path.write_bytes(bytes(result.quantized_model))
    return path


def test_int16_activations_pass_on_cpu_but_not_on_the_edge_tpu(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cal, val = write_sets(tmp_path)
    candidate = _a16w8(tmp_path, cal, whole_model=False)
    code, out, _ = validate(capsys, candidate, val, "--json", "--variant", "int8-edgetpu")
    assert code == 3
    data = json.loads(out)
    assert data["decision"] == "wrong-variant"
    problems = data["variant"]["not_integer"]
    assert problems and all(p.endswith("is int16") for p in problems)
    assert any(p.startswith("CONV_2D activation 'digits_1/conv1_1/") for p in problems)
    code, out, err = validate(capsys, candidate, val, "--json", "--variant", "int8-cpu")
    assert code == 0, err
    assert json.loads(out)["variant"]["not_integer"] == []


def test_int16_input_is_a_wrong_variant_not_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cal, val = write_sets(tmp_path)
    candidate = _a16w8(tmp_path, cal, whole_model=True)
    code, out, _ = validate(capsys, candidate, val, "--json")
    assert code == 3
    data = json.loads(out)
    assert data["decision"] == "wrong-variant"
    assert "input 'serving_default_image:0' is int16" in data["variant"]["not_integer"]
    assert data["overall"] is None  # camera frames cannot be mapped into int16: not scored


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing candidate", "does not exist"),
        ("missing reference", "does not exist"),
        ("not a model", "not a TFLite flatbuffer"),
        ("missing validation", "does not exist"),
        ("not an npz", "not an .npz"),
        ("wrong keys", "needs arrays x"),
        ("x float", "must be uint8"),
        ("y float", "integer class id"),
        ("y too short", "one integer class id per image"),
        ("class id out of range", "class ids must be 0..9"),
        ("labels mismatch", "has 11 labels"),
        ("missing labels", "labels file"),
        ("bad range", "--input-range"),
        ("negative max drop", "max_drop"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str, needle: str
) -> None:
    _, val = write_sets(tmp_path)
    candidate, reference, labels = INT8, FP32, LABELS
    extra = ["--input-range", "0,1"]
    x8, y = np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64)
    if case == "missing candidate":
        candidate = tmp_path / "nope.tflite"
    elif case == "missing reference":
        reference = tmp_path / "nope.tflite"
    elif case == "not a model":
        candidate = tmp_path / "text.tflite"
        candidate.write_text("hello, not a model\n")
    elif case == "missing validation":
        val = tmp_path / "nope.npz"
    elif case == "not an npz":
        val = tmp_path / "v.npz"
        val.write_bytes(b"PK garbage")
    elif case in {"labels mismatch", "missing labels"}:
        labels = tmp_path / "labels.txt"
        if case == "labels mismatch":
            labels.write_text("".join(f"c{i}\n" for i in range(11)))
    elif case == "bad range":
        extra = ["--input-range", "1,0"]
    elif case == "negative max drop":
        extra += ["--max-drop", "-1"]
    else:
        arrays = {
            "wrong keys": {"images": x8, "labels": y},
            "x float": {"x": x8.astype(np.float32), "y": y},
            "y float": {"x": x8, "y": y.astype(np.float32)},
            "y too short": {"x": x8, "y": y[:3]},
            "class id out of range": {"x": x8, "y": y + 10},
        }[case]
        val = tmp_path / "v.npz"
        np.savez(val, **arrays)  # type: ignore[arg-type]
    code, out, err = run_cli(
        capsys, "model", "validate", str(candidate), "--reference", str(reference),
        "--validation", str(val), "--labels", str(labels), "--quiet", *extra,
    )  # fmt: skip
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edgefleet: error:"), err
    assert needle in err
    assert "Traceback" not in err and out == ""


def test_exit_codes_from_a_real_process(tmp_path: Path) -> None:
    """The console entry point, not just main(): 2 on bad input, 3 on a refusal, no traceback."""
    val = write_rare_class_set(tmp_path / "rare.npz", RARE)
    base = [
        sys.executable, "-m", "server.cli", "model", "validate", "--reference", str(FP32),
        "--validation", str(val), "--labels", str(LABELS), "--input-range", "0,1", "--quiet",
    ]  # fmt: skip
    bad = subprocess.run([*base, str(tmp_path / "nope.tflite")], capture_output=True, text=True,
                         check=False, timeout=120)  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "edgefleet: error: model" in bad.stderr
    damaged = damage_class(tmp_path / "damaged.tflite", RARE)
    refused = subprocess.run([*base, str(damaged)], capture_output=True, text=True, check=False,
                             timeout=120)  # fmt: skip
    assert refused.returncode == 3, refused.stderr
    assert f"failed classes: {RARE}" in refused.stdout

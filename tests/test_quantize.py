"""``edgefleet model quantize``: real ai-edge-quantizer, real LiteRT, real files.

The digits fixtures quantize to full INT8 within the gate; a model made hostile to
int8 (one outlier channel) makes the search raise exactly that op group, or refuse
when the budget or the Edge TPU forbids it; bad input exits 2 in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from quantize_helpers import (
    FIXTURES,
    FP32,
    INT8,
    LABELS,
    outlier_channel,
    run_cli,
    write_sets,
)

from server.publish.quantize_graph import Graph

pytest.importorskip("ai_edge_quantizer")

REPORT_KEYS = {
    "decision", "decision_reason", "gate", "accuracy", "confusion_changes", "size", "latency_ms",
    "not_int8_ops", "recipe", "candidates", "search", "timing", "input_contract", "target",
}  # fmt: skip


def quantize(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, *extra: str
) -> tuple[int, str, dict[str, Any], Path]:
    cal, val = write_sets(tmp_path)
    out, report = tmp_path / "out.tflite", tmp_path / "report.json"
    code, _, err = run_cli(
        capsys, "model", "quantize", str(model), "--calibration", str(cal), "--validation",
        str(val), "--labels", str(LABELS), "-o", str(out), "--report", str(report), "--quiet",
        "--latency-runs", "5", *extra,
    )  # fmt: skip
    return code, err, json.loads(report.read_text()), out


def test_fp32_fixture_quantizes_to_full_int8_within_the_gate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    html = tmp_path / "report.html"
    code, err, report, out = quantize(
        capsys, tmp_path, FP32, "--input-range", "0,1", "--html", str(html)
    )
    assert code == 0, err
    assert set(report) >= REPORT_KEYS
    assert report["decision"] == "ship"
    gate = report["gate"]
    assert gate["overall"]["drop"] <= 1.0
    assert gate["failed_classes"] == []
    assert {c["label"] for c in gate["per_class"]} == {str(i) for i in range(10)}
    assert set(report["accuracy"]["fp32"]["per_class"]) == set(
        report["accuracy"]["int8"]["per_class"]
    )
    assert report["size"]["int8_bytes"] == out.stat().st_size
    assert report["size"]["ratio"] <= 0.35
    assert report["latency_ms"]["fp32"] > 0 and report["latency_ms"]["int8"] > 0
    assert report["not_int8_ops"] == []
    assert report["recipe"]["name"] in {c["recipe"] for c in report["candidates"]}
    assert all({"recipe", "decision", "accuracy", "drop"} <= set(c) for c in report["candidates"])
    assert report["timing"]["seconds_total"] > 0
    assert "<table>" in html.read_text()
    # Full INT8: integer input and output, no op above int8, fit even for the Edge TPU.
    graph = Graph.read(out)
    assert graph.integer_problems("int8-edgetpu") == []
    assert {p for _, p in graph.op_precisions()} == {"int8"}


def test_signed_model_with_input_range_minus_one_to_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The contract checks outside the suite rely on: --input-range=-1,1, exit 0, file written."""
    code, err, report, out = quantize(
        capsys, tmp_path, FIXTURES / "digits_signed_fp32.tflite", "--input-range=-1,1"
    )
    assert code == 0, err
    assert out.is_file()
    assert report["input_contract"]["range"] == [-1.0, 1.0]
    assert report["gate"]["overall"]["drop"] <= 1.0


def test_quantized_output_passes_validate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err, _, out = quantize(capsys, tmp_path, FP32, "--input-range", "0,1")
    assert code == 0, err
    code, stdout, err = run_cli(
        capsys, "model", "validate", str(out), "--reference", str(FP32), "--validation",
        str(tmp_path / "val.npz"), "--labels", str(LABELS), "--input-range", "0,1", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert stdout.startswith("ship")


def test_outlier_channel_is_found_and_raised_when_the_budget_allows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = outlier_channel(tmp_path / "outlier.tflite")
    code, err, report, out = quantize(
        capsys, tmp_path, model, "--input-range", "0,1", "--max-size-ratio", "0.6"
    )
    assert code == 0, err
    assert report["decision"] == "mixed"
    # Every calibration choice fails: the crushed channels are no range problem.
    calibration = [c for c in report["candidates"] if c["stage"] == "calibration"]
    assert len(calibration) >= 4 and all(c["decision"] != "ship" for c in calibration)
    # The ranking puts conv1's range first: conv1, the pool sharing it, and conv2 reading it.
    first = report["ranking"][0]
    assert [op["index"] for op in first["ops"]] == [0, 1, 2]
    raised = {op["fp32_op_index"] for op in report["not_int8_ops"]}
    assert raised == {0, 1, 2}
    assert all("raised" in op["why"] for op in report["not_int8_ops"])
    assert report["gate"]["failed_classes"] == []
    graph = Graph.read(out)
    assert graph.integer_problems("int8-cpu", allow_float_ops=True) == []
    assert graph.integer_problems("int8-cpu")  # float islands inside, named
    assert {p for _, p in graph.op_precisions()} >= {"int8"}


def test_outlier_channel_refused_within_the_default_budget(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = outlier_channel(tmp_path / "outlier.tflite")
    code, err, report, out = quantize(capsys, tmp_path, model, "--input-range", "0,1")
    assert code == 3
    assert "refused" in err
    assert not out.exists()
    assert report["decision"] == "refuse"
    assert report["model"]["output"] is None
    assert "budget" in report["search"]["stop_reason"]
    assert report["gate"]["failed_classes"]


def test_edgetpu_target_refuses_instead_of_leaving_int8(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = outlier_channel(tmp_path / "outlier.tflite")
    code, _, report, out = quantize(
        capsys, tmp_path, model, "--input-range", "0,1", "--target", "int8-edgetpu",
        "--max-size-ratio", "1", "--max-latency-ratio", "100",
    )  # fmt: skip
    assert code == 3
    assert not out.exists()
    assert {c["stage"] for c in report["candidates"]} == {"calibration"}
    assert "Edge TPU" in report["search"]["stop_reason"]


def _bad_npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("int8 model", "not an FP32 model"),
        ("missing model", "does not exist"),
        ("calibration keys", "needs arrays x"),
        ("validation dtype", "must be uint8"),
        ("labels count", "has 9 labels"),
        ("output directory", "does not exist"),
        ("no mapping", "cannot tell how pixels map"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str, needle: str
) -> None:
    cal, val = write_sets(tmp_path)
    model, labels, out = FP32, LABELS, tmp_path / "out.tflite"
    mapping = ["--input-range", "0,1"]
    if case == "int8 model":
        model = INT8
    elif case == "missing model":
        model = tmp_path / "nope.tflite"
    elif case == "calibration keys":
        cal = _bad_npz(tmp_path / "c.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    elif case == "validation dtype":
        val = _bad_npz(tmp_path / "v.npz", x=np.zeros((2, 8, 8, 3), np.float32), y=np.zeros(2))
    elif case == "labels count":
        labels = tmp_path / "labels.txt"
        labels.write_text("".join(f"{i}\n" for i in range(9)))
    elif case == "output directory":
        out = tmp_path / "missing" / "out.tflite"
    elif case == "no mapping":
        mapping = []
    code, stdout, err = run_cli(
        capsys, "model", "quantize", str(model), "--calibration", str(cal), "--validation",
        str(val), "--labels", str(labels), "-o", str(out), "--report",
        str(tmp_path / "r.json"), "--quiet", *mapping,
    )  # fmt: skip
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edgefleet: error:"), err
    assert needle in err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()

"""Publishing runs the accuracy gate: real server on loopback, real LiteRT, real models.

The converter's INT8 digits model ships against its FP32 original and its report
is stored, served and shown; a model whose rare class collapsed (3 samples: 0.55
points overall) is refused by name over REST and the CLI unless an operator gives
an override reason, which every view of the release then shows; an FP32 file is
not an INT8 variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import server_config
from quantize_helpers import FP32, INT8, LABELS, damage_class, run_cli, write_rare_class_set

from server.app import ServerHandle, start_server

RARE = 7
LABEL_LIST = ",".join(LABELS.read_text().split())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gate")
    return {
        "rare": write_rare_class_set(folder / "rare.npz", RARE),
        "damaged": damage_class(folder / "damaged.tflite", RARE),
    }


def op(server: ServerHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.operator_token}"}


def publish(server: ServerHandle, model: Path, name: str, *, variant: str = "int8-cpu",
            gate: dict[str, Path] | None = None, **fields: str) -> requests.Response:  # fmt: skip
    """POST /api/v1/models with the digits contract, and the gate's files if given."""
    data = {"name": name, "release": "1", "variant": variant, "labels": LABEL_LIST,
            "input_range": "0,1", **fields}  # fmt: skip
    parts = {"file": (model.name, model.read_bytes())}
    parts.update({key: (path.name, path.read_bytes()) for key, path in (gate or {}).items()})
    return requests.post(f"{server.url}/api/v1/models", data=data, files=parts,
                         headers=op(server), timeout=300)  # fmt: skip


def cli(server: ServerHandle, capsys: pytest.CaptureFixture[str], *argv: str) -> (
    tuple[int, str, str]
):  # fmt: skip
    return run_cli(capsys, "--server", server.url, "--token", server.operator_token, *argv)


def cli_publish(server: ServerHandle, capsys: pytest.CaptureFixture[str], model: Path,
                name: str, validation: Path, *extra: str) -> tuple[int, str, str]:  # fmt: skip
    return cli(
        server, capsys, "model", "publish", str(model), "--name", name, "--version", "1",
        "--labels", str(LABELS), "--input-range", "0,1", "--fp32", str(FP32),
        "--validation", str(validation), *extra,
    )  # fmt: skip


def report(server: ServerHandle, name: str, **params: str) -> requests.Response:
    return requests.get(f"{server.url}/api/v1/models/{name}/1/report", params=params,
                        headers=op(server), timeout=30)  # fmt: skip


def listed(server: ServerHandle, name: str) -> list[dict[str, Any]]:
    resp = requests.get(f"{server.url}/api/v1/models", params={"name": name}, headers=op(server),
                        timeout=30)  # fmt: skip
    assert resp.status_code == 200
    return list(resp.json())


def test_the_converter_int8_ships_and_its_report_is_stored_served_and_shown(
    module_server: ServerHandle, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli_publish(module_server, capsys, INT8, "shipped", files["rare"])
    assert code == 0, err
    assert err.startswith(f"uploading {INT8.name} ({INT8.stat().st_size} bytes), ")
    assert "accuracy gate first" in err
    assert "published shipped@1 int8-cpu" in out and "accuracy gate: ship: " in out

    data = report(module_server, "shipped").json()
    assert data["decision"] == "ship" and data["passed"] and data["failed_classes"] == []
    assert data["override"] is None
    assert {"reference", "candidate", "drop"} <= set(data["overall"])
    assert {row["label"] for row in data["per_class"]} == {str(i) for i in range(10)}
    assert data["release"]["name"] == "shipped"
    signed = module_server.repo.targets()["models/shipped/1/int8-cpu.tflite"]
    assert data["release"]["sha256"] == signed.sha256
    assert data["input_contract"] == signed.custom["input"]  # the release's own preprocessing
    ref = data["reference"]
    assert ref["samples"] == data["overall"]["n"] == data["validation"]["samples"]
    assert set(ref["class_freq"]) == {str(i) for i in range(10)}
    assert sum(ref["class_freq"].values()) == pytest.approx(1.0, abs=1e-4)
    assert ref["class_freq"][str(RARE)] < 0.02  # 3 of 543, plus any mistakes
    assert len(ref["confidence_hist"]) == 10
    assert sum(ref["confidence_hist"]) == pytest.approx(1.0, abs=1e-4)
    assert ref["confidence_hist"][-1] > 0.5  # a good classifier is mostly sure
    for label, hist in ref["per_class_confidence_hist"].items():
        assert len(hist) == 10
        assert sum(hist) == pytest.approx(1.0 if ref["class_counts"][label] else 0.0, abs=1e-4)

    (row,) = listed(module_server, "shipped")
    assert row["gate"]["decision"] == "ship" and row["gate"]["override"] is None
    code, out, _ = cli(module_server, capsys, "model", "list", "--name", "shipped")
    assert code == 0 and out.splitlines()[0].split()[-1] == "GATE"
    assert out.splitlines()[1].split()[-1] == "ship"

    code, out, err = cli(module_server, capsys, "model", "show", "shipped@1")
    assert code == 0, err
    assert f"sha256   {signed.sha256}" in out and "32x32x3 NHWC" in out
    assert "report (int8-cpu): ship: " in out and "failed    none" in out
    code, out, _ = cli(module_server, capsys, "model", "show", "shipped@1", "--json")
    shown = json.loads(out)
    assert shown["report"] == data and shown["variants"][0]["sha256"] == signed.sha256


def test_a_rare_collapsed_class_is_refused_by_name(
    module_server: ServerHandle, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gate = {"fp32": FP32, "validation": files["rare"]}
    resp = publish(module_server, files["damaged"], "collapsed", gate=gate)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert "mixed-precision-or-qat" in error and f"failed classes: {RARE} " in error
    assert f"class '{RARE}' collapsed" in error and "\n" not in error
    assert listed(module_server, "collapsed") == []  # nothing signed or recorded
    assert not any("/collapsed/" in path for path in module_server.repo.targets())
    assert report(module_server, "collapsed").status_code == 404

    damaged, rare = files["damaged"], files["rare"]
    code, out, err = cli_publish(module_server, capsys, damaged, "collapsed", rare)
    assert code == 1 and out == ""
    assert "server answered 422: accuracy gate refused collapsed@1 int8-cpu" in err
    assert f"failed classes: {RARE}" in err


def test_an_override_publishes_and_every_view_shows_it(
    module_server: ServerHandle, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "class 7 is retired from this site"
    code, out, err = cli_publish(module_server, capsys, files["damaged"], "overridden",
                                 files["rare"], "--override", reason)  # fmt: skip
    assert code == 0, err
    assert "accuracy gate: mixed-precision-or-qat" in out
    assert "OVERRIDDEN by operator at " in out and repr(reason) in out

    (row,) = listed(module_server, "overridden")
    assert row["gate"]["decision"] == "mixed-precision-or-qat"
    assert row["gate"]["failed_classes"] == [str(RARE)]
    assert row["gate"]["override"]["reason"] == reason
    assert row["gate"]["override"]["by"] == "operator" and row["gate"]["override"]["at"]
    code, out, _ = cli(module_server, capsys, "model", "list", "--name", "overridden")
    assert out.splitlines()[1].split()[-1] == "OVERRIDDEN:mixed-precision-or-qat"

    data = report(module_server, "overridden").json()
    assert data["override"]["reason"] == reason and not data["passed"]
    assert data["failed_classes"] == [str(RARE)]
    assert data["reference"]["class_freq"][str(RARE)] == 0.0  # the collapsed class is never seen

    code, out, _ = cli(module_server, capsys, "model", "show", "overridden@1")
    assert code == 0
    assert f"failed    {RARE}" in out and f"override  {reason!r} by operator" in out
    assert "gate     OVERRIDDEN:mixed-precision-or-qat" in out


def test_an_fp32_file_is_not_an_int8_variant(
    module_server: ServerHandle, files: dict[str, Path]
) -> None:
    for variant in ("int8-cpu", "edgetpu"):
        resp = publish(module_server, FP32, "floaty", variant=variant)
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert f"uploaded file '{FP32.name}' is not integer where variant {variant}" in error
        assert "input 'serving_default_image:0' is float32" in error
        assert "output 'StatefulPartitionedCall_1:0' is float32" in error
    # As the fp32 variant it is accepted, and the gate may judge it too (against itself).
    resp = publish(module_server, FP32, "floaty", variant="fp32",
                   gate={"fp32": FP32, "validation": files["rare"]})  # fmt: skip
    assert resp.status_code == 201, resp.text
    assert resp.json()["gate"]["decision"] == "ship"
    assert report(module_server, "floaty").json()["variant"]["name"] == "fp32"


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("not an npz", "validation set 'v.npz' is not an .npz file"),
        ("wrong keys", "validation set 'v.npz' needs arrays x"),
        ("x float", "must be uint8 camera-space RGB images"),
        ("class id out of range", "class ids must be 0..9"),
        ("labels mismatch", "2 labels given but output 0 has 10 classes"),
        ("validation without fp32", "fp32 and validation go together"),
        ("override without the gate", "max_drop, max_class_drop and override need fp32"),
        ("negative max drop", "max_drop"),
        ("blank override", "an override reason must be printable text"),
    ],
)
def test_bad_gate_inputs_are_one_line_422s(
    module_server: ServerHandle, tmp_path: Path, files: dict[str, Path], case: str, needle: str
) -> None:
    val = tmp_path / "v.npz"
    x8, y = np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64)
    arrays: dict[str, Any] = {"x": x8, "y": y}
    if case == "wrong keys":
        arrays = {"images": x8, "labels": y}
    elif case == "x float":
        arrays = {"x": x8.astype(np.float32), "y": y}
    elif case == "class id out of range":
        arrays = {"x": x8, "y": y + 10}
    if case == "not an npz":
        val.write_bytes(b"PK garbage")
    else:
        np.savez(val, **arrays)
    gate: dict[str, Path] = {"fp32": FP32, "validation": val}
    fields: dict[str, str] = {}
    if case == "labels mismatch":
        fields["labels"] = "a,b"
    elif case == "validation without fp32":
        gate = {"validation": val}
    elif case == "override without the gate":
        gate, fields["override"] = {}, "because"
    elif case == "negative max drop":
        fields["max_drop"] = "-1"
    elif case == "blank override":
        fields["override"] = "   "
    resp = publish(module_server, INT8, "badgate", gate=gate, **fields)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert needle in error
    assert "\n" not in error and "upload-" not in error  # no server spool paths
    assert listed(module_server, "badgate") == []


def test_the_report_endpoint_needs_the_operator_and_a_published_report(
    module_server: ServerHandle, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{module_server.url}/api/v1/models/plain/1/report"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert requests.get(url, headers=wrong, timeout=10).status_code == 401
    missing = report(module_server, "plain")
    assert missing.status_code == 404
    assert missing.json() == {"error": "model plain release 1 is not published"}
    assert publish(module_server, INT8, "plain").status_code == 201
    no_report = report(module_server, "plain")
    assert no_report.status_code == 404 and "has no validation report" in no_report.json()["error"]
    assert report(module_server, "plain", variant="edgetpu").status_code == 404
    for variant in ("edgetpu", "int8-xnnpack"):
        assert publish(module_server, INT8, "twovar", variant=variant).status_code == 201
    ambiguous = report(module_server, "twovar")
    assert ambiguous.status_code == 422 and "choose one with ?variant=" in ambiguous.json()["error"]
    code, out, _ = cli(module_server, capsys, "model", "show", "plain@1")
    assert code == 0 and "no validation report for int8-cpu" in out
    code, _, err = cli(module_server, capsys, "model", "show", "plain@9")
    assert code == 1 and "server answered 404" in err
    code, _, err = cli(
        module_server, capsys, "model", "publish", str(INT8), "--name", "x", "--version", "1",
        "--labels", str(LABELS), "--validation", str(INT8),
    )  # fmt: skip
    assert code == 1 and "--validation needs --fp32" in err


@pytest.mark.production
def test_the_report_survives_a_restart_on_postgresql(
    pg_url: str, tmp_path: Path, files: dict[str, Path]
) -> None:
    config = server_config(tmp_path / "server", db_url=pg_url)
    server = start_server(config)
    try:
        gate = {"fp32": FP32, "validation": files["rare"]}
        resp = publish(server, files["damaged"], "kept", gate=gate, override="kept on purpose")
        assert resp.status_code == 201, resp.text
        stored = report(server, "kept").json()
    finally:
        server.stop()
    server = start_server(config)  # same data directory, database and operator token
    try:
        assert report(server, "kept").json() == stored
        (row,) = listed(server, "kept")
        assert row["gate"]["override"]["reason"] == "kept on purpose"
        assert row["gate"]["override"]["at"] == stored["override"]["at"]
    finally:
        server.stop()

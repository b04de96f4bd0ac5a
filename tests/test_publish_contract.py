"""Publishing with an input contract: refused without a pixel mapping, from flags or metadata.

Real server on loopback, real uploads, real LiteRT; golden sets in camera space
scored at publish through the release's own contract.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import requests

from server import cli
from server.app import ServerHandle

FIXTURES = Path(__file__).parent / "fixtures"
DIGITS = FIXTURES / "digits_int8_r1.tflite"
SIGNED = FIXTURES / "digits_signed_int8.tflite"  # trained on inputs in [-1, 1]
META = FIXTURES / "digits_int8_meta.tflite"  # TFLite Metadata: mean 0, std 255
LABELS = ",".join(str(i) for i in range(10))


def camera_set(size: tuple[int, int] = (48, 40)) -> tuple[npt.NDArray[np.uint8], Any]:
    """The validation digits as a camera would see them: uint8 RGB at another size."""
    with np.load(FIXTURES / "digits_val.npz") as data:
        x, y = data["x"], data["y"]
    pixels = np.rint(x * 255.0).astype(np.uint8)
    frames = [cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for f in pixels]
    return np.stack(frames), y


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def post(
    server: ServerHandle,
    model: Path,
    name: str,
    fields: dict[str, str] | None = None,
    *,
    golden: bytes | None = None,
    min_accuracy: float | None = None,
) -> requests.Response:
    """POST /api/v1/models; ``fields`` are the contract's form fields."""
    files: dict[str, Any] = {"file": (model.name, model.read_bytes())}
    data = {"name": name, "release": "1", "variant": "int8-cpu", "labels": LABELS}
    data.update(fields or {})
    if golden is not None:
        files["golden_set"] = ("set.npz", golden)
        data["min_accuracy"] = str(min_accuracy)
    return requests.post(
        f"{server.url}/api/v1/models", data=data, files=files, timeout=120,
        headers={"Authorization": f"Bearer {server.operator_token}"},
    )  # fmt: skip


def test_rest_refuses_an_image_model_without_a_mapping(module_server: ServerHandle) -> None:
    resp = post(module_server, DIGITS, "nomap")
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert "cannot tell how pixels map to input values" in error
    assert "--input-range" in error and "--mean" in error and "--std" in error
    listed = requests.get(f"{module_server.url}/api/v1/models", timeout=10,
                          headers={"Authorization": f"Bearer {module_server.operator_token}"})
    assert all(m["name"] != "nomap" for m in listed.json())  # nothing signed  # fmt: skip


def test_rest_takes_the_mapping_from_flags(module_server: ServerHandle) -> None:
    resp = post(module_server, SIGNED, "flags", {"input_range": "-1,1", "resize": "area",
                                                "crop": "0.9"})  # fmt: skip
    assert resp.status_code == 201, resp.text
    out = resp.json()
    assert out["input"] == {
        "layout": "NHWC", "height": 32, "width": 32, "channels": 3, "resize": "area",
        "crop": 0.9, "color": "RGB", "range": [-1.0, 1.0],
    }  # fmt: skip
    assert "value mapping from the flags" in out["input_notes"]
    assert "the model carries no TFLite Metadata" in out["input_notes"]
    signed = module_server.repo.targets()["models/flags/1/int8-cpu.tflite"].custom
    assert signed["input"] == out["input"]
    listed = requests.get(f"{module_server.url}/api/v1/models", params={"name": "flags"},
                          headers={"Authorization": f"Bearer {module_server.operator_token}"},
                          timeout=10).json()  # fmt: skip
    assert listed[0]["input"] == out["input"]


def test_rest_reads_the_mapping_from_tflite_metadata(module_server: ServerHandle) -> None:
    resp = post(module_server, META, "meta")
    assert resp.status_code == 201, resp.text
    out = resp.json()
    assert out["input"]["mean"] == [0.0] and out["input"]["std"] == [255.0]
    assert any("from the model's TFLite Metadata: mean [0] std [255]" in n
               for n in out["input_notes"])  # fmt: skip
    over = post(module_server, META, "meta-over", {"mean": "127.5", "std": "127.5", "color": "BGR"})
    assert over.status_code == 201, over.text
    assert over.json()["input"]["mean"] == [127.5] and over.json()["input"]["color"] == "BGR"
    assert any("override the model's TFLite Metadata" in n for n in over.json()["input_notes"])


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"input_range": "1,-1"}, "--input-range '1,-1' must be LO,HI with HI > LO"),
        ({"input_range": "0,1", "mean": "0", "std": "1"}, "not both"),
        ({"mean": "0"}, "--mean and --std go together"),
        ({"mean": "0", "std": "0"}, "std must be positive"),
        ({"mean": "0,0", "std": "1"}, "mean needs 1 or 3 values, got 2"),
        ({"input_range": "0,1", "resize": "cubic"}, "--resize 'cubic' is not one of"),
        ({"input_range": "0,1", "pad": "9"}, "--pad applies only to --resize letterbox"),
        ({"input_range": "0,1", "crop": "2"}, "--crop '2' must be a number in (0, 1]"),
        ({"input_range": "0,1", "color": "YUV"}, "--color 'YUV' must be RGB or BGR"),
    ],
)
def test_rest_refuses_bad_contract_fields(
    module_server: ServerHandle, fields: dict[str, str], words: str
) -> None:
    resp = post(module_server, DIGITS, "badflags", fields)
    assert resp.status_code == 422, resp.text
    assert words in resp.json()["error"]


def run_cli(capsys: pytest.CaptureFixture[str], server: ServerHandle, *argv: str
            ) -> tuple[int, str, str]:  # fmt: skip
    base = ["--server", server.url, "--token", server.operator_token, "model", "publish"]
    try:
        code = cli.main([*base, *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_without_a_mapping_and_accepts_flags_or_metadata(
    module_server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = str(FIXTURES / "digits_labels.txt")
    common = ["--version", "1", "--labels", labels]
    code, _, err = run_cli(capsys, module_server, str(DIGITS), "--name", "cli-none", *common)
    assert code == 1
    assert "server answered 422: cannot tell how pixels map to input values" in err
    assert "--input-range LO,HI" in err and "--mean M[,M,M] with --std S[,S,S]" in err
    assert "Traceback" not in err

    code, out, err = run_cli(capsys, module_server, str(SIGNED), "--name", "cli-flags", *common,
                             "--input-range=-1,1", "--resize", "letterbox", "--pad", "0")
    assert code == 0, err  # fmt: skip
    assert "published cli-flags@1 int8-cpu" in out
    assert "input contract: 32x32x3 NHWC, letterbox pad 0, RGB, range -1,1" in out
    assert "value mapping from the flags" in out

    code, out, err = run_cli(capsys, module_server, str(META), "--name", "cli-meta", *common)
    assert code == 0, err
    assert "value mapping from the model's TFLite Metadata: mean [0] std [255]" in out

    code, _, err = run_cli(capsys, module_server, str(DIGITS), "--name", "cli-bad", *common,
                           "--mean", "1")  # fmt: skip
    assert code == 1 and "--mean and --std go together" in err  # refused before any upload


def test_a_signed_range_model_is_judged_through_its_contract(module_server: ServerHandle) -> None:
    x, y = camera_set()
    golden = npz_bytes(x=x, y=y)
    right = post(module_server, SIGNED, "judged", {"input_range": "-1,1"}, golden=golden,
                 min_accuracy=0.9)  # fmt: skip
    assert right.status_code == 201, right.text
    spec = module_server.repo.targets()["models/judged/1/int8-cpu.tflite"].custom["extra"]
    assert spec["golden_set"]["count"] == 300
    assert spec["golden_set"]["reference_accuracy"] > 0.95
    # The same model told its pixels are [0, 1] scores far worse, and publish says so.
    wrong = post(module_server, SIGNED, "misjudged", {"input_range": "0,1"}, golden=golden,
                 min_accuracy=0.9)  # fmt: skip
    assert wrong.status_code == 422
    error = wrong.json()["error"]
    assert "below the minimum 0.9000" in error
    assert float(error.split("scores ")[1].split()[0]) < 0.5


def bad_sets() -> list[tuple[str, bytes, str]]:
    x, y = camera_set((20, 24))
    return [
        ("not an npz", b"PK\x03\x04 nope", "not an .npz with arrays x and y"),
        ("no y", npz_bytes(x=x), "golden set has no array 'y'"),
        ("grey images", npz_bytes(x=x[..., 0], y=y), "camera-space images are N x H x W x 3"),
        ("int16 pixels", npz_bytes(x=x.astype(np.int16), y=y), "it must be uint8 N x H x W x 3"),
        ("rgba", npz_bytes(x=np.zeros((4, 8, 8, 4), np.uint8), y=y[:4]),
         "it must be uint8 N x H x W x 3"),
        ("short y", npz_bytes(x=x, y=y[:-1]), "one class id per image (300)"),
        ("float labels", npz_bytes(x=x, y=y.astype(np.float32)), "must hold integer class ids"),
        ("label 10", npz_bytes(x=x, y=np.full_like(y, 10)), "labels must be in 0..9"),
        ("no images", npz_bytes(x=x[:0], y=y[:0]), "must hold 1..5000 images, has 0"),
        ("float at camera size", npz_bytes(x=x.astype(np.float32) / 255, y=y),
         "float sets must be in [0, 1] at the model's size [32, 32, 3]"),
        ("float out of range", npz_bytes(x=np.full((3, 32, 32, 3), 2.0, np.float32), y=y[:3]),
         "float but not finite values in [0, 1]"),
        ("huge side", npz_bytes(x=np.zeros((1, 1, 5000, 3), np.uint8), y=y[:1]),
         "at most 4096"),
    ]  # fmt: skip


@pytest.mark.parametrize(("what", "data", "words"), bad_sets(), ids=[b[0] for b in bad_sets()])
def test_bad_golden_sets_are_refused_with_the_reason(
    module_server: ServerHandle, what: str, data: bytes, words: str
) -> None:
    resp = post(module_server, DIGITS, "badset", {"input_range": "0,1"}, golden=data,
                min_accuracy=0.5)  # fmt: skip
    assert resp.status_code == 422, (what, resp.text)
    assert words in resp.json()["error"], (what, resp.json())
    assert str(module_server.config.data_dir) not in resp.text

"""Golden-set scoring on the device path: camera-space sets, the old float format, legacy."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from agent.common.errors import ProtocolError
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import load_model
from agent.inference.scoring import GoldenSetSpec, evaluate, load_set
from agent.protocol.input_contract import InputContract
from agent.protocol.input_options import ContractOptions
from agent.update.smoke import FetchAux, RuntimeChoice, score_golden_set, smoke_test
from server.publish.registry import build_manifest

FIXTURES = Path(__file__).parent / "fixtures"
SIGNED = FIXTURES / "digits_signed_int8.tflite"
DIGITS = FIXTURES / "digits_int8_r1.tflite"


def val() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(FIXTURES / "digits_val.npz") as data:
        return data["x"], data["y"]


def npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_old_float_sets_become_the_same_pixels_as_camera_sets() -> None:
    x, y = val()
    old, labels = load_set(npz(x=x, y=y), (1, 32, 32, 3), 10)
    assert old.dtype == np.uint8 and old.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(old, np.rint(x * 255).astype(np.uint8))
    camera, _ = load_set(npz(x=old, y=y), (1, 32, 32, 3), 10)
    np.testing.assert_array_equal(camera, old)
    np.testing.assert_array_equal(labels, y)
    grey, _ = load_set(npz(x=x[..., :1], y=y), (1, 32, 32, 1), 10)
    assert grey.shape == (300, 32, 32, 3)  # luma of (g, g, g) is g: grey models see the same
    with pytest.raises(ProtocolError, match=r"float sets must be in \[0, 1\] at the model's size"):
        load_set(npz(x=x, y=y), (1, 28, 28, 3), 10)


def test_a_range_model_scores_as_it_should_only_through_the_right_contract() -> None:
    x, y = val()
    pixels = np.rint(x * 255).astype(np.uint8)
    camera = np.stack([cv2.resize(f, (57, 45), interpolation=cv2.INTER_AREA) for f in pixels])
    model = load_model(SIGNED)
    try:
        right = Preprocessor(InputContract(32, 32, 3, value_range=(-1.0, 1.0)), model.input)
        wrong = Preprocessor(InputContract(32, 32, 3, value_range=(0.0, 1.0)), model.input)
        for images in (pixels, camera):
            good = evaluate(model, (), images, y, right)
            bad = evaluate(model, (), images, y, wrong)
            assert good.accuracy > 0.95, good
            assert bad.accuracy < 0.5, bad  # fed [0, 1]: wrong without any error
            assert set(good.per_class) == {str(i) for i in range(10)}
    finally:
        model.close()


def fetch_from(source: Path) -> FetchAux:
    def fetch(_target: str, dest: Path) -> Path:
        shutil.copyfile(source, dest)
        return dest

    return fetch


def test_the_device_scores_with_the_releases_contract_or_the_legacy_range(tmp_path: Path) -> None:
    x, y = val()
    camera = np.stack([cv2.resize(np.rint(f * 255).astype(np.uint8), (40, 48)) for f in x])
    set_path = tmp_path / "set.npz"
    set_path.write_bytes(npz(x=camera, y=y))
    extra = {"golden_set": GoldenSetSpec("golden/x.npz", 0.9, 300, 0.99).to_extra()}
    choice = RuntimeChoice("litert", 1)
    manifest = build_manifest(SIGNED, "digits", 1, "int8-cpu", extra=extra,
                              input_options=ContractOptions(value_range=(-1.0, 1.0)))  # fmt: skip
    smoke_test(SIGNED, manifest, choice)
    scored = score_golden_set(SIGNED, manifest, choice, fetch_from(set_path), tmp_path)
    assert scored is not None and scored[1].accuracy > 0.95
    # A release from before contracts: the device falls back to its configured range.
    legacy = dataclasses.replace(manifest, input=None)
    for value_range, ok in (((0.0, 1.0), False), ((-1.0, 1.0), True)):
        result = score_golden_set(SIGNED, legacy, choice, fetch_from(set_path), tmp_path,
                                  legacy_range=value_range)  # fmt: skip
        assert result is not None and (result[1].accuracy > 0.95) is ok, (value_range, result)

"""agent.inference.classifier: real uint8 frames through the real INT8 digits model under LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from agent.common.errors import ConfigError, FrameSourceError, ModelError
from agent.inference.classifier import InferenceEngine, load_labels
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import Model, load_model
from agent.protocol.input_contract import InputContract

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden_frames"
UNIT = InputContract(32, 32, 3, value_range=(0.0, 1.0))  # the digits fixtures take [0, 1]


def frame(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(FIXTURES / "digits_int8_r1.tflite", num_threads=1)


@pytest.fixture(scope="module")
def labels() -> tuple[str, ...]:
    return load_labels(FIXTURES / "digits_labels.txt")


def test_golden_frames_are_classified_as_their_label(
    model: Model, labels: tuple[str, ...]
) -> None:
    engine = InferenceEngine(model, UNIT, labels, top_k=3)
    for path in sorted(GOLDEN.glob("*.png")):
        expected = path.stem.split("_")[1]  # digit_<label>_<index>.png
        result = engine.run(frame(path))
        assert result.label == expected, path.name
        assert result.class_index == labels.index(expected)
        assert result.top_k[0] == (result.label, result.score)
        assert len(result.top_k) == 3
        scores = [s for _, s in result.top_k]
        assert scores == sorted(scores, reverse=True)
        assert 0.0 <= result.score <= 1.0
        assert result.pre_ns >= 0 and result.invoke_ns > 0 and result.post_ns >= 0
        assert result.total_ns == result.pre_ns + result.invoke_ns + result.post_ns


def test_camera_sized_frames_are_resized_by_the_contract(
    model: Model, labels: tuple[str, ...]
) -> None:
    engine = InferenceEngine(model, Preprocessor(UNIT, model.input), labels)
    for path in sorted(GOLDEN.glob("*.png")):
        big = np.repeat(np.repeat(frame(path), 3, axis=0), 2, axis=1)  # 96x64, not 32x32
        assert engine.run(big).label == path.stem.split("_")[1], path.name


def test_class_counts_follow_results(model: Model, labels: tuple[str, ...]) -> None:
    engine = InferenceEngine(model, UNIT, labels)
    frames = [frame(p) for p in sorted(GOLDEN.glob("*.png"))]
    seen: dict[str, int] = {}
    for i in range(25):
        label = engine.run(frames[i % len(frames)]).label
        seen[label] = seen.get(label, 0) + 1
    assert engine.class_counts() == seen
    assert engine.inference_count == 25
    engine.reset_counts()
    assert engine.class_counts() == {} and engine.inference_count == 0


def test_default_labels_are_class_indices(model: Model) -> None:
    engine = InferenceEngine(model, UNIT, top_k=50)
    assert engine.labels == tuple(str(i) for i in range(10))
    assert engine.top_k == 10  # clamped to the number of classes
    result = engine.run(frame(GOLDEN / "digit_7_2.png"))
    assert result.label == "7"
    assert len(result.top_k) == 10


def test_label_count_must_match_outputs(model: Model) -> None:
    with pytest.raises(ModelError, match="10 output classes but 3 labels"):
        InferenceEngine(model, UNIT, ("a", "b", "c"))


@pytest.mark.parametrize("top_k", [0, -2, True])
def test_top_k_must_be_positive(model: Model, top_k: int) -> None:
    with pytest.raises(ConfigError, match="top_k"):
        InferenceEngine(model, UNIT, top_k=top_k)


def test_mobilenet_runs_on_a_vga_frame_through_its_contract() -> None:
    mobilenet = load_model(FIXTURES / "mobilenetv2_int8.tflite", num_threads=2)
    contract = InputContract(224, 224, 3, value_range=(-1.0, 1.0))
    engine = InferenceEngine(mobilenet, contract, top_k=5)
    camera = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    result = engine.run(camera)
    assert len(result.top_k) == 5 and 0 <= result.class_index < 100


def test_a_contract_for_another_input_is_refused(model: Model) -> None:
    with pytest.raises(ModelError, match=r"input contract is for \[1, 224, 224, 3\]"):
        InferenceEngine(model, InputContract(224, 224, 3, value_range=(0.0, 1.0)))
    mobilenet = load_model(FIXTURES / "mobilenetv2_int8.tflite")
    other = Preprocessor(InputContract(224, 224, 3, value_range=(-1.0, 1.0)), mobilenet.input)
    with pytest.raises(ModelError, match="another input"):
        InferenceEngine(model, other)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32, 3), np.float32),  # the old float frames
        np.zeros((32, 32), np.uint8),
        np.zeros((32, 32, 4), np.uint8),
    ],
)
def test_frames_must_be_uint8_rgb(model: Model, bad: npt.NDArray[np.generic]) -> None:
    engine = InferenceEngine(model, UNIT)
    with pytest.raises(FrameSourceError, match="uint8 HxWx3 RGB"):
        engine.run(bad)  # type: ignore[arg-type]


def test_labels_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_labels(tmp_path / "absent.txt")
    bad = tmp_path / "labels.txt"
    bad.write_text("cat\n\ndog\n")
    with pytest.raises(ConfigError, match="empty label"):
        load_labels(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_labels(bad)

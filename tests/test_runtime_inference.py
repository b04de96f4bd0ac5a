"""agent.inference.classifier: real frames through the real INT8 digits model under LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.common.errors import ConfigError, ModelError
from agent.inference.classifier import InferenceEngine, load_labels
from agent.inference.runtime import Model, load_model
from agent.inference.sources import open_source

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden_frames"


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(FIXTURES / "digits_int8_r1.tflite", num_threads=1)


@pytest.fixture(scope="module")
def labels() -> tuple[str, ...]:
    return load_labels(FIXTURES / "digits_labels.txt")


def test_golden_frames_are_classified_as_their_label(
    model: Model, labels: tuple[str, ...]
) -> None:
    engine = InferenceEngine(model, labels, top_k=3)
    for path in sorted(GOLDEN.glob("*.npy")):
        expected = path.stem.split("_")[1]  # digit_<label>_<index>.npy
        result = engine.run(np.load(path))
        assert result.label == expected, path.name
        assert result.class_index == labels.index(expected)
        assert result.top_k[0] == (result.label, result.score)
        assert len(result.top_k) == 3
        scores = [s for _, s in result.top_k]
        assert scores == sorted(scores, reverse=True)
        assert 0.0 <= result.score <= 1.0
        assert result.pre_ns >= 0 and result.invoke_ns > 0 and result.post_ns >= 0
        assert result.total_ns == result.pre_ns + result.invoke_ns + result.post_ns


def test_class_counts_follow_results(model: Model, labels: tuple[str, ...]) -> None:
    engine = InferenceEngine(model, labels)
    source = open_source(f"dir:{GOLDEN}", model.input.shape)
    seen: dict[str, int] = {}
    for _ in range(25):
        label = engine.run(next(source)).label
        seen[label] = seen.get(label, 0) + 1
    assert engine.class_counts() == seen
    assert engine.inference_count == 25
    engine.reset_counts()
    assert engine.class_counts() == {} and engine.inference_count == 0


def test_default_labels_are_class_indices(model: Model) -> None:
    engine = InferenceEngine(model, top_k=50)
    assert engine.labels == tuple(str(i) for i in range(10))
    assert engine.top_k == 10  # clamped to the number of classes
    result = engine.run(np.load(GOLDEN / "digit_7_2.npy"))
    assert result.label == "7"
    assert len(result.top_k) == 10


def test_label_count_must_match_outputs(model: Model) -> None:
    with pytest.raises(ModelError, match="10 output classes but 3 labels"):
        InferenceEngine(model, ("a", "b", "c"))


@pytest.mark.parametrize("top_k", [0, -2, True])
def test_top_k_must_be_positive(model: Model, top_k: int) -> None:
    with pytest.raises(ConfigError, match="top_k"):
        InferenceEngine(model, top_k=top_k)


def test_input_range_maps_frames_for_mobilenet_style_models() -> None:
    mobilenet = load_model(FIXTURES / "mobilenetv2_int8.tflite", num_threads=2)
    engine = InferenceEngine(mobilenet, input_range=(-1.0, 1.0), top_k=5)
    source = open_source("synthetic", mobilenet.input.shape)
    result = engine.run(next(source))
    assert len(result.top_k) == 5 and 0 <= result.class_index < 100
    with pytest.raises(ConfigError, match="input_range"):
        InferenceEngine(mobilenet, input_range=(1.0, -1.0))


def test_wrong_frame_shape_is_a_model_error(model: Model) -> None:
    engine = InferenceEngine(model)
    with pytest.raises(ModelError, match="does not fit"):
        engine.run(np.zeros((64, 64, 3), np.float32))


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

"""agent.inference.model_metadata: TFLite Metadata read from real .tflite files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent.common.errors import ModelError
from agent.inference.model_metadata import metadata_buffer, parse_metadata, read_metadata
from agent.protocol.input_options import MetadataHints

FIXTURES = Path(__file__).parent / "fixtures"
META = FIXTURES / "digits_int8_meta.tflite"
SCRIPTS = Path(__file__).parent.parent / "scripts"


def test_the_fixture_carries_normalization_and_colour_space() -> None:
    assert read_metadata(META) == MetadataHints(mean=(0.0,), std=(255.0,), color_space="RGB")


@pytest.mark.parametrize(
    "name", ["digits_int8_r1.tflite", "mobilenetv2_int8.tflite", "digits_fp32_r1.tflite"]
)
def test_models_without_metadata_say_none(name: str) -> None:
    assert read_metadata(FIXTURES / name) is None


def test_the_metadata_copy_runs_exactly_like_the_original() -> None:
    outputs = []
    for path in (FIXTURES / "digits_int8_r1.tflite", META):
        interp = Interpreter(model_path=str(path), num_threads=1)
        interp.allocate_tensors()
        detail = interp.get_input_details()[0]
        x = np.random.default_rng(1).integers(-128, 128, detail["shape"]).astype(np.int8)
        interp.set_tensor(detail["index"], x)
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_the_writer_script_makes_per_channel_metadata(tmp_path: Path) -> None:
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(SCRIPTS))
    try:
        import add_tflite_metadata as writer  # noqa: PLC0415
    finally:
        sys.path.remove(str(SCRIPTS))
    out = tmp_path / "grey.tflite"
    assert writer.main([str(FIXTURES / "digits_int8_r1.tflite"), str(out), "--mean", "1,2,3",
                        "--std", "4,5,6", "--color-space", "GRAYSCALE"]) == 0  # fmt: skip
    assert read_metadata(out) == MetadataHints((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "GRAYSCALE")


def test_broken_metadata_is_an_error_not_silence(tmp_path: Path) -> None:
    data = bytearray(META.read_bytes())
    meta = metadata_buffer(bytes(data))
    assert meta is not None and meta[4:8] == b"M001"
    start = bytes(data).index(meta)
    broken = data.copy()
    broken[start + 4 : start + 8] = b"XXXX"  # not TFLite Metadata any more
    path = tmp_path / "broken.tflite"
    path.write_bytes(bytes(broken))
    with pytest.raises(ModelError, match="not TFLite Metadata"):
        read_metadata(path)
    truncated = data.copy()
    truncated[start : start + len(meta)] = b"\x00\x00\x00\x7f" + meta[4:]  # root offset past end
    path.write_bytes(bytes(truncated))
    with pytest.raises(ModelError, match="malformed"):
        read_metadata(path)
    with pytest.raises(ModelError, match="no TFL3"):
        metadata_buffer(b"garbage!" * 4)
    with pytest.raises(ModelError, match="cannot read"):
        read_metadata(tmp_path / "absent.tflite")


def test_metadata_without_an_input_says_nothing() -> None:
    assert parse_metadata(b"\x0c\x00\x00\x00M001\x04\x00\x04\x00\x04\x00\x00\x00") == (
        MetadataHints()
    )

"""The input contract on the wire: strict parsing, the manifest field, the signed TUF round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.common.errors import ProtocolError
from agent.protocol.custom_fields import decode_custom, encode_custom
from agent.protocol.input_contract import InputContract, image_input_shape, legacy_contract
from agent.protocol.input_options import (
    ContractOptions,
    MetadataHints,
    resolve_contract,
)
from agent.protocol.manifest import ModelManifest, model_target_path
from server.publish.keys import init_keys
from server.publish.registry import build_manifest, publish_model
from server.publish.tuf_repo import TufRepository

FIXTURES = Path(__file__).parent / "fixtures"
DIGITS = FIXTURES / "digits_int8_r1.tflite"
SIGNED = FIXTURES / "digits_signed_int8.tflite"
GOOD: dict[str, Any] = {
    "layout": "NHWC", "height": 224, "width": 224, "channels": 3, "resize": "bilinear",
    "crop": 1.0, "color": "RGB", "range": [-1.0, 1.0],
}  # fmt: skip

CONTRACTS = [
    InputContract(224, 224, 3, value_range=(-1.0, 1.0)),
    InputContract(32, 32, 3, resize="letterbox", pad=114, color="BGR", value_range=(0.0, 1.0)),
    InputContract(
        299, 299, 3, resize="area", crop=0.875, mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375),
    ),
    InputContract(28, 28, 1, resize="nearest", mean=(0.0,), std=(255.0,)),
]


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.describe())
def test_contracts_round_trip_through_the_custom_field_codec(contract: InputContract) -> None:
    wire = contract.to_dict()
    assert InputContract.from_dict(wire) == contract
    signed = json.loads(json.dumps(encode_custom(wire), sort_keys=True))
    assert InputContract.from_dict(decode_custom(signed)) == contract
    assert ("pad" in wire) == (contract.resize == "letterbox")


def test_ints_and_lists_normalise_so_equal_contracts_compare_equal() -> None:
    a = InputContract(8, 8, 3, crop=1, mean=[127, 127, 127], std=[128])  # type: ignore[arg-type]
    b = InputContract.from_dict(
        {**_without("range"), "height": 8, "width": 8, "crop": 1, "mean": [127, 127, 127],
         "std": [128]}
    )  # fmt: skip
    assert a == b and a.mean == (127.0, 127.0, 127.0) and a.crop == 1.0


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


GARBAGE: list[tuple[Any, str]] = [
    ("not an object", "input contract must be an object"),
    ({**GOOD, "gamma": 2.2}, "unknown field(s) gamma"),
    (_without("resize"), "field 'resize' is missing"),
    ({**GOOD, "layout": "NCHW"}, "layout 'NCHW' is not supported; only NHWC"),
    ({**GOOD, "height": "224"}, "height must be an integer"),
    ({**GOOD, "height": True}, "height must be an integer"),
    ({**GOOD, "width": 0}, "width must be in 1..8192"),
    ({**GOOD, "channels": 4}, "channels must be in 1..3"),
    ({**GOOD, "channels": 2}, "channels must be 1 or 3"),
    ({**GOOD, "resize": "bicubic"}, "resize 'bicubic' is not one of bilinear, area, nearest"),
    ({**GOOD, "resize": 3}, "resize must be a string"),
    ({**GOOD, "pad": 7}, "pad applies only to resize 'letterbox'"),
    ({**GOOD, "resize": "letterbox", "pad": 256}, "pad must be in 0..255"),
    ({**GOOD, "crop": 0}, "crop must be in (0, 1]"),
    ({**GOOD, "crop": 1.5}, "crop must be in (0, 1]"),
    ({**GOOD, "crop": "all"}, "crop must be a number"),
    ({**GOOD, "color": "rgb"}, "color must be RGB or BGR"),
    (_without("range"), "give exactly one value mapping, range or mean/std"),
    ({**GOOD, "mean": [127.5], "std": [127.5]}, "one value mapping, range or mean/std, not both"),
    ({**GOOD, "range": [1.0, -1.0]}, "range must be [LO, HI] with HI > LO"),
    ({**GOOD, "range": [0.0, 0.5, 1.0]}, "range must be [LO, HI], got 3 values"),
    ({**GOOD, "range": [0.0, float("nan")]}, "range must be finite, got nan"),
    ({**GOOD, "range": [0.0, float("inf")]}, "range must be finite, got inf"),
    ({**GOOD, "range": "0,1"}, "range must be a list of numbers"),
    ({**GOOD, "range": [False, 1]}, "range must be a number, got bool"),
    ({**_without("range"), "mean": [127.5]}, "mean and std go together"),
    ({**_without("range"), "mean": [1, 2], "std": [1]}, "mean needs 1 or 3 values, got 2"),
    ({**_without("range"), "mean": [0.0], "std": [0.0]}, "std must be positive, got [0]"),
    ({**_without("range"), "mean": [0.0], "std": [-1.0]}, "std must be positive"),
    ({**_without("range"), "mean": [float("nan")], "std": [1.0]}, "mean must be finite, got nan"),
]


@pytest.mark.parametrize(("raw", "words"), GARBAGE, ids=[w for _, w in GARBAGE])
def test_garbage_contracts_are_refused_with_one_line(raw: Any, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        InputContract.from_dict(raw)
    message = str(caught.value)
    assert words in message and "\n" not in message, message


def test_manifest_carries_the_contract_and_checks_it_against_input_zero() -> None:
    manifest = build_manifest(
        SIGNED, "digits", 1, "int8-cpu", input_options=ContractOptions(value_range=(-1.0, 1.0))
    )
    assert manifest.input == InputContract(32, 32, 3, value_range=(-1.0, 1.0))
    custom = manifest.to_custom()
    assert custom["input"]["range"] == [-1.0, 1.0]
    assert ModelManifest.from_custom(decode_custom(encode_custom(custom))) == manifest
    wrong = {**custom, "input": {**custom["input"], "height": 64}}
    with pytest.raises(ProtocolError, match=r"input contract is for \[1, 64, 32, 3\] but input 0"):
        ModelManifest.from_custom(wrong)
    with pytest.raises(ProtocolError, match="unknown field"):
        ModelManifest.from_custom({**custom, "input": {**custom["input"], "gain": 2}})


def test_old_manifests_without_a_contract_still_parse_and_stay_unchanged() -> None:
    manifest = build_manifest(DIGITS, "digits", 1, "int8-cpu",
                              input_options=ContractOptions(value_range=(0.0, 1.0)))  # fmt: skip
    old = {k: v for k, v in manifest.to_custom().items() if k != "input"}
    parsed = ModelManifest.from_custom(old)
    assert parsed.input is None
    assert parsed.to_custom() == old  # re-serialised exactly as an older server signed it
    assert ModelManifest.from_custom({**old, "input": None}).input is None


def test_the_contract_survives_signing_in_the_real_tuf_repository(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys")
    repo = TufRepository.create(tmp_path / "repo", tmp_path / "keys")
    options = ContractOptions.parse(input_range="-1,1", resize="letterbox", pad="114",
                                    crop="0.875", color="BGR")  # fmt: skip
    manifest = publish_model(repo, SIGNED, "digits", 1, "int8-cpu", input_options=options)
    target = model_target_path("digits", 1, "int8-cpu")
    reopened = TufRepository.open(tmp_path / "repo", tmp_path / "keys")  # read back from disk
    assert ModelManifest.from_custom(reopened.targets()[target].custom) == manifest
    assert manifest.input is not None and manifest.input.crop == 0.875
    version = repo.versions()["targets"]
    signed = json.loads((repo.metadata_dir / f"{version}.targets.json").read_text())
    raw = signed["signed"]["targets"][target]["custom"]["input"]
    assert raw["crop"] == {"__float__": "0.875"}  # canonical JSON has no floats
    assert raw["range"] == [{"__float__": "-1.0"}, {"__float__": "1.0"}]
    assert raw["pad"] == 114 and raw["color"] == "BGR"


def test_options_parse_flag_text_and_name_the_bad_flag() -> None:
    opts = ContractOptions.parse(mean="127.5", std="127.5, 127.5, 127.5", color="bgr")
    assert opts.mean == (127.5,) and opts.std == (127.5,) * 3 and opts.color == "BGR"
    assert ContractOptions.parse().empty and not ContractOptions.parse().has_mapping
    for kwargs, words in [
        ({"input_range": "0"}, "--input-range '0' must be LO,HI"),
        ({"input_range": "1,0"}, "must be LO,HI with HI > LO"),
        ({"input_range": "a,b"}, "--input-range 'a,b' is not a comma-separated list"),
        ({"input_range": "0,nan"}, "must hold finite numbers"),
        ({"input_range": "0,1", "mean": "1", "std": "1"}, "not both"),
        ({"mean": "1"}, "--mean and --std go together"),
        ({"resize": "cubic"}, "--resize 'cubic' is not one of"),
        ({"color": "RGBA"}, "--color 'RGBA' must be RGB or BGR"),
        ({"pad": "300"}, "--pad '300' must be an integer 0..255"),
        ({"crop": "0"}, "--crop '0' must be a number in (0, 1]"),
    ]:
        with pytest.raises(ProtocolError) as caught:
            ContractOptions.parse(**kwargs)
        assert words in str(caught.value), (kwargs, str(caught.value))


def test_resolution_prefers_flags_then_metadata_and_refuses_neither() -> None:
    shape = (1, 224, 224, 3)
    meta = MetadataHints(mean=(127.5,), std=(127.5,), color_space="RGB")
    by_flags = resolve_contract(ContractOptions(value_range=(0.0, 1.0)), shape, meta)
    assert by_flags.contract is not None and by_flags.contract.value_range == (0.0, 1.0)
    assert any("override the model's TFLite Metadata" in n for n in by_flags.notes)
    by_meta = resolve_contract(ContractOptions(resize="area"), shape, meta)
    assert by_meta.contract == InputContract(224, 224, 3, resize="area", mean=(127.5,),
                                             std=(127.5,))  # fmt: skip
    assert any("from the model's TFLite Metadata" in n for n in by_meta.notes)
    with pytest.raises(ProtocolError) as caught:
        resolve_contract(ContractOptions(resize="area"), shape, MetadataHints(color_space="RGB"))
    assert "--input-range" in str(caught.value) and "--mean" in str(caught.value)
    with pytest.raises(ProtocolError, match="pad applies only to --resize letterbox"):
        resolve_contract(ContractOptions(value_range=(0.0, 1.0), pad=3), shape, None)
    # Not an image: no contract, and contract flags make no sense for it.
    assert resolve_contract(ContractOptions(), (1, 10), None).contract is None
    with pytest.raises(ProtocolError, match="not a 1xHxWxC image input"):
        resolve_contract(ContractOptions(value_range=(0.0, 1.0)), (1, 3, 224, 224), None)


def test_image_shapes_and_the_legacy_contract() -> None:
    assert image_input_shape((1, 32, 32, 3)) == (32, 32, 3)
    assert image_input_shape([1, 28, 28, 1]) == (28, 28, 1)
    for shape in [(1, 3, 224, 224), (2, 32, 32, 3), (1, 10), (1, 0, 32, 3)]:
        assert image_input_shape(shape) is None, shape
    assert legacy_contract((1, 32, 32, 3)) == InputContract(32, 32, 3, value_range=(0.0, 1.0))
    with pytest.raises(ProtocolError, match="is not a 1xHxWxC image input"):
        legacy_contract((1, 10))

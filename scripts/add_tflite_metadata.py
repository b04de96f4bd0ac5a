#!/usr/bin/env python3
"""Write TFLite Metadata (image input normalization and colour space) into a .tflite copy.

    .venv/bin/python scripts/add_tflite_metadata.py IN.tflite OUT.tflite \\
        --mean 0 --std 255 [--color-space RGB|GRAYSCALE] [--name NAME]

Makes ``tests/fixtures/digits_int8_meta.tflite`` (from ``digits_int8_r1.tflite``,
mean 0, std 255: pixels to [0, 1], as the model was trained) without
tflite-support: the metadata flatbuffer (tflite-support's ``metadata_schema.fbs``,
identifier ``M001``) is built with ``flatbuffers``' generic Builder, and the model
is re-packed with ai-edge-litert's ``schema_py_generated`` object API with one
more buffer and a ``TFLITE_METADATA`` entry naming it. The graph and weights
are unchanged, which the script checks by running both models on one input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.inference.model_metadata import (  # noqa: E402 - field numbers shared with the reader
    CONTENT_TYPE,
    CONTENT_VALUE,
    IMAGE_COLOR_SPACE,
    IMAGE_PROPERTIES,
    METADATA_IDENTIFIER,
    METADATA_NAME,
    MODEL_SUBGRAPHS,
    NORM_MEAN,
    NORM_STD,
    NORMALIZATION,
    SUBGRAPH_INPUTS,
    TENSOR_CONTENT,
    TENSOR_PROCESS_UNITS,
    TFLITE_IDENTIFIER,
    UNIT_TYPE,
    UNIT_VALUE,
    read_metadata,
)

COLOR_SPACES = {"RGB": 1, "GRAYSCALE": 2}
MODEL_NAME, MODEL_MIN_PARSER = 0, 7  # ModelMetadata.name, .min_parser_version
TENSOR_NAME = 0


def _vector(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return int(builder.EndVector())


def metadata_flatbuffer(
    mean: list[float], std: list[float], color_space: str, name: str
) -> bytes:
    """A ModelMetadata with one subgraph and one input: normalization + image properties."""
    b = flatbuffers.Builder(256)
    mean_vec = b.CreateNumpyVector(np.asarray(mean, np.float32))
    std_vec = b.CreateNumpyVector(np.asarray(std, np.float32))
    b.StartObject(2)  # NormalizationOptions
    b.PrependUOffsetTRelativeSlot(NORM_MEAN, mean_vec, 0)
    b.PrependUOffsetTRelativeSlot(NORM_STD, std_vec, 0)
    norm = b.EndObject()
    b.StartObject(2)  # ProcessUnit
    b.PrependUint8Slot(UNIT_TYPE, NORMALIZATION, 0)
    b.PrependUOffsetTRelativeSlot(UNIT_VALUE, norm, 0)
    unit = b.EndObject()
    b.StartObject(2)  # ImageProperties
    b.PrependInt8Slot(IMAGE_COLOR_SPACE, COLOR_SPACES[color_space], 0)
    image = b.EndObject()
    b.StartObject(3)  # Content
    b.PrependUint8Slot(CONTENT_TYPE, IMAGE_PROPERTIES, 0)
    b.PrependUOffsetTRelativeSlot(CONTENT_VALUE, image, 0)
    content = b.EndObject()
    units = _vector(b, [unit])
    tensor_name = b.CreateString("image")
    b.StartObject(7)  # TensorMetadata
    b.PrependUOffsetTRelativeSlot(TENSOR_NAME, tensor_name, 0)
    b.PrependUOffsetTRelativeSlot(TENSOR_CONTENT, content, 0)
    b.PrependUOffsetTRelativeSlot(TENSOR_PROCESS_UNITS, units, 0)
    tensor = b.EndObject()
    inputs = _vector(b, [tensor])
    b.StartObject(7)  # SubGraphMetadata
    b.PrependUOffsetTRelativeSlot(SUBGRAPH_INPUTS, inputs, 0)
    subgraph = b.EndObject()
    subgraphs = _vector(b, [subgraph])
    model_name, version = b.CreateString(name), b.CreateString("1.0.0")
    b.StartObject(8)  # ModelMetadata
    b.PrependUOffsetTRelativeSlot(MODEL_NAME, model_name, 0)
    b.PrependUOffsetTRelativeSlot(MODEL_SUBGRAPHS, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(MODEL_MIN_PARSER, version, 0)
    root = b.EndObject()
    b.Finish(root, file_identifier=METADATA_IDENTIFIER)
    return bytes(b.Output())


def with_metadata(model: bytes, meta: bytes) -> bytes:
    """``model`` re-packed with ``meta`` in a new buffer named by a TFLITE_METADATA entry."""
    obj = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    obj.metadata = [m for m in obj.metadata or [] if m.name != METADATA_NAME.decode()]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(meta, np.uint8)
    obj.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME.decode()
    entry.buffer = len(obj.buffers) - 1
    obj.metadata.append(entry)
    b = flatbuffers.Builder(len(model) + len(meta) + 1024)
    b.Finish(obj.Pack(b), file_identifier=TFLITE_IDENTIFIER)
    return bytes(b.Output())


def same_outputs(a: Path, b: Path) -> bool:
    outputs = []
    for path in (a, b):
        interp = Interpreter(model_path=str(path), num_threads=1)
        interp.allocate_tensors()
        detail = interp.get_input_details()[0]
        rng = np.random.default_rng(7)
        info = np.iinfo(detail["dtype"]) if np.dtype(detail["dtype"]).kind in "iu" else None
        x = (rng.integers(info.min, info.max + 1, detail["shape"]).astype(detail["dtype"])
             if info is not None else rng.random(detail["shape"], np.float32))  # fmt: skip
        interp.set_tensor(detail["index"], x)
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    return bool(np.array_equal(outputs[0], outputs[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mean", required=True, help="M or M,M,M (pixel units)")
    parser.add_argument("--std", required=True, help="S or S,S,S (pixel units)")
    parser.add_argument("--color-space", choices=sorted(COLOR_SPACES), default="RGB")
    parser.add_argument("--name", default="", help="model name in the metadata")
    args = parser.parse_args(argv)
    mean = [float(v) for v in args.mean.split(",")]
    std = [float(v) for v in args.std.split(",")]
    meta = metadata_flatbuffer(mean, std, args.color_space, args.name or args.model.stem)
    args.out.write_bytes(with_metadata(args.model.read_bytes(), meta))
    if not same_outputs(args.model, args.out):
        print(f"{args.out}: outputs differ from {args.model}", file=sys.stderr)
        return 1
    hints = read_metadata(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {hints}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

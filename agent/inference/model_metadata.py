"""What a .tflite file's TFLite Metadata says about its image input.

TFLite Metadata (tflite-support's ``metadata_schema.fbs``, file identifier
``M001``) is a flatbuffer stored in one of the model's buffers, named by the
model's ``metadata`` entry ``TFLITE_METADATA``. Of it we read, for input 0 of
subgraph 0: ``NormalizationOptions`` (per-channel mean and std, in pixel
units: ``value = (p - mean) / std``) among its process units, and the
``ImageProperties`` colour space.

Neither ai-edge-litert nor the ``flatbuffers`` package ships the generated
metadata classes, and tflite-support is too heavy for a camera, so the few
tables needed are read with ``flatbuffers``' generic ``Table`` accessor. Field
slots below are the schema's field order (a union takes two: type, then value).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

from flatbuffers import encode, number_types
from flatbuffers.table import Table

from agent.common.errors import ModelError
from agent.protocol.input_options import MetadataHints

log = logging.getLogger(__name__)

METADATA_NAME = b"TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
TFLITE_IDENTIFIER = b"TFL3"

# tflite schema.fbs: Model, Metadata, Buffer.
MODEL_BUFFERS, MODEL_METADATA = 4, 6
METADATA_ENTRY_NAME, METADATA_ENTRY_BUFFER = 0, 1
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2
# metadata_schema.fbs.
MODEL_SUBGRAPHS = 3  # ModelMetadata.subgraph_metadata
SUBGRAPH_INPUTS = 2  # SubGraphMetadata.input_tensor_metadata
TENSOR_CONTENT, TENSOR_PROCESS_UNITS = 3, 4  # TensorMetadata
CONTENT_TYPE, CONTENT_VALUE = 0, 1  # Content.content_properties (union)
IMAGE_PROPERTIES = 2  # ContentProperties.ImageProperties
IMAGE_COLOR_SPACE = 0  # ImageProperties.color_space
UNIT_TYPE, UNIT_VALUE = 0, 1  # ProcessUnit.options (union)
NORMALIZATION = 1  # ProcessUnitOptions.NormalizationOptions
NORM_MEAN, NORM_STD = 0, 1
COLOR_SPACES = {1: "RGB", 2: "GRAYSCALE"}  # 0 is UNKNOWN


def _slot(field: int) -> int:
    return 4 + 2 * field


def _root(data: bytes, at: int = 0) -> Table:
    return Table(data, at + encode.Get(number_types.UOffsetTFlags.packer_type, data, at))


def _offset(tab: Table, field: int) -> int:
    return int(tab.Offset(_slot(field)))


def _table(tab: Table, field: int) -> Table | None:
    o = _offset(tab, field)
    return Table(tab.Bytes, tab.Indirect(tab.Pos + o)) if o else None


def _tables(tab: Table, field: int) -> list[Table]:
    o = _offset(tab, field)
    if not o:
        return []
    start = tab.Vector(o)
    return [Table(tab.Bytes, tab.Indirect(start + 4 * i)) for i in range(tab.VectorLen(o))]


def _scalar(tab: Table, field: int, flags: Any, default: int = 0) -> int:
    return int(tab.GetSlot(_slot(field), default, flags))


def _bytes(tab: Table, field: int) -> bytes:
    o = _offset(tab, field)
    if not o:
        return b""
    start = tab.Vector(o)
    return bytes(tab.Bytes[start : start + tab.VectorLen(o)])


def _floats(tab: Table, field: int) -> tuple[float, ...] | None:
    o = _offset(tab, field)
    if not o:
        return None
    start, count = tab.Vector(o), tab.VectorLen(o)
    return struct.unpack_from(f"<{count}f", tab.Bytes, start)


def _string(tab: Table, field: int) -> bytes:
    o = _offset(tab, field)
    return bytes(tab.String(tab.Pos + o)) if o else b""


def metadata_buffer(model: bytes) -> bytes | None:
    """The raw TFLITE_METADATA flatbuffer of a .tflite file, or None if it has none."""
    if len(model) < 8 or model[4:8] != TFLITE_IDENTIFIER:
        raise ModelError("not a .tflite model (no TFL3 file identifier)")
    root = _root(model)
    for entry in _tables(root, MODEL_METADATA):
        if _string(entry, METADATA_ENTRY_NAME) != METADATA_NAME:
            continue
        index = _scalar(entry, METADATA_ENTRY_BUFFER, number_types.Uint32Flags)
        buffers = _tables(root, MODEL_BUFFERS)
        if index >= len(buffers):
            raise ModelError(f"TFLITE_METADATA names buffer {index} of {len(buffers)}")
        buf = buffers[index]
        offset = _scalar(buf, BUFFER_OFFSET, number_types.Uint64Flags)
        if offset > 1:  # large models keep buffers after the flatbuffer, by offset/size
            size = _scalar(buf, BUFFER_SIZE, number_types.Uint64Flags)
            return bytes(model[offset : offset + size])
        return _bytes(buf, BUFFER_DATA)
    return None


def parse_metadata(meta: bytes) -> MetadataHints:
    """Normalization and colour space of input 0 from a TFLite Metadata flatbuffer."""
    if len(meta) < 8 or meta[4:8] != METADATA_IDENTIFIER:
        raise ModelError("TFLITE_METADATA buffer is not TFLite Metadata (no M001 identifier)")
    subgraphs = _tables(_root(meta), MODEL_SUBGRAPHS)
    inputs = _tables(subgraphs[0], SUBGRAPH_INPUTS) if subgraphs else []
    if not inputs:
        return MetadataHints()
    tensor = inputs[0]
    color = None
    content = _table(tensor, TENSOR_CONTENT)
    if content is not None and _scalar(content, CONTENT_TYPE, number_types.Uint8Flags) == (
        IMAGE_PROPERTIES
    ):
        image = _table(content, CONTENT_VALUE)
        if image is not None:
            color = COLOR_SPACES.get(_scalar(image, IMAGE_COLOR_SPACE, number_types.Int8Flags))
    for unit in _tables(tensor, TENSOR_PROCESS_UNITS):
        if _scalar(unit, UNIT_TYPE, number_types.Uint8Flags) != NORMALIZATION:
            continue
        options = _table(unit, UNIT_VALUE)
        if options is None:
            continue
        mean, std = _floats(options, NORM_MEAN), _floats(options, NORM_STD)
        if mean and std:
            return MetadataHints(mean=tuple(mean), std=tuple(std), color_space=color)
    return MetadataHints(color_space=color)


def read_metadata(path: str | Path) -> MetadataHints | None:
    """What ``path``'s TFLite Metadata says about input 0, or None when it carries none.

    A metadata buffer that cannot be parsed is a ModelError: publishing must
    not silently fall back to "no metadata" for a model that claims some.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelError(f"cannot read model {path}: {err.strerror or err}") from err
    try:
        meta = metadata_buffer(data)
        if meta is None:
            return None
        hints = parse_metadata(meta)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: TFLite Metadata is malformed: {err}") from err
    log.info("%s carries TFLite Metadata: %s", path, hints)
    return hints

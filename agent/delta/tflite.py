"""Find the constant tensors of a .tflite flatbuffer, as byte ranges of the file.

Only the encoder parses models; the decoder works from the byte ranges the patch
records, so a device needs no schema. Buffers may be inline vectors of the
flatbuffer or, in large models, ``offset``/``size`` ranges appended after it; both
become absolute ``(offset, length)`` ranges here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

FILE_IDENTIFIER = b"TFL3"
# TensorType enum value -> numpy dtype string. Types missing here (strings, packed
# 4-bit, complex, fp8) are coded as plain bytes with a flat shape.
TFLITE_DTYPES = {
    0: "<f4",  # FLOAT32
    1: "<f2",  # FLOAT16
    2: "<i4",  # INT32
    3: "|u1",  # UINT8
    4: "<i8",  # INT64
    6: "|u1",  # BOOL
    7: "<i2",  # INT16
    9: "|i1",  # INT8
    10: "<f8",  # FLOAT64
    12: "<u8",  # UINT64
    15: "<u4",  # UINT32
    16: "<u2",  # UINT16
    18: "<u2",  # BFLOAT16, coded by its bits
}


@dataclass(frozen=True)
class ConstTensor:
    """One constant buffer and the first tensor that uses it."""

    key: tuple[str, tuple[int, ...], int]  # (name, shape, TensorType): how tensors match
    dtype: str  # numpy dtype string for the codec
    shape: tuple[int, ...]  # codec shape (flat for types coded as bytes)
    offset: int  # absolute, in the file
    length: int
    scales: npt.NDArray[np.float32] | None
    zero_points: npt.NDArray[np.int64] | None
    axis: int
    scale_offset: int = -1  # absolute offset of the float32 scale vector, -1 if none


@dataclass(frozen=True)
class ScaleLink:
    """Absolute ranges of a bias scale vector equal to f32(input scale * filter scale)."""

    target: int
    count: int
    a_offset: int  # filter scales
    a_count: int
    b_offset: int  # input scale (one float)


def _schema() -> Any | None:
    try:
        from ai_edge_litert import schema_py_generated  # noqa: PLC0415 - encoder only
    except ImportError:  # pragma: no cover - depends on the install
        log.warning("ai_edge_litert is not installed: model-aware deltas are disabled")
        return None
    return schema_py_generated


def looks_like_tflite(data: bytes | memoryview) -> bool:
    return len(data) >= 8 and bytes(data[4:8]) == FILE_IDENTIFIER


def _buffer_range(buf: Any, file_size: int) -> tuple[int, int] | None:
    """Absolute (offset, length) of a buffer's bytes, or None when it holds none."""
    offset, size = int(buf.Offset()), int(buf.Size())
    if offset > 1:  # offset/size buffers; 0 and 1 are "unset" sentinels in the schema
        return (offset, size) if size and offset + size <= file_size else None
    field = buf._tab.Offset(4)  # the `data` vector
    if not field:
        return None
    start, length = int(buf._tab.Vector(field)), int(buf._tab.VectorLen(field))
    return (start, length) if length and start + length <= file_size else None


def _scale_vector(tensor: Any) -> tuple[int, int]:
    """(absolute offset, count) of a tensor's float32 scale vector, or (-1, 0)."""
    quant = tensor.Quantization()
    if quant is None:
        return -1, 0
    field = quant._tab.Offset(8)  # QuantizationParameters.scale
    if not field:
        return -1, 0
    return int(quant._tab.Vector(field)), int(quant._tab.VectorLen(field))


def _quantization(tensor: Any) -> tuple[Any, Any, int]:
    quant = tensor.Quantization()
    if quant is None or not quant.ScaleLength():
        return None, None, 0
    scales = np.asarray(quant.ScaleAsNumpy(), dtype=np.float32).copy()
    zps = (
        np.asarray(quant.ZeroPointAsNumpy(), dtype=np.int64).copy()
        if quant.ZeroPointLength()
        else np.zeros(1, dtype=np.int64)
    )
    return scales, zps, int(quant.QuantizedDimension())


def _make_const(tensor: Any, rng: tuple[int, int]) -> ConstTensor:
    name = (tensor.Name() or b"").decode("utf-8", "replace")
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    ttype = int(tensor.Type())
    dtype = TFLITE_DTYPES.get(ttype)
    offset, length = rng
    scales, zps, axis = _quantization(tensor)
    codec_shape = shape or (1,)
    if (
        dtype is None
        or any(d < 0 for d in shape)
        or math.prod(codec_shape) * np.dtype(dtype).itemsize != length
    ):
        dtype, codec_shape, scales, zps = "|u1", (length,), None, None
    scale_offset = _scale_vector(tensor)[0] if scales is not None else -1
    return ConstTensor((name, shape, ttype), dtype, codec_shape, offset, length, scales, zps,
                       axis, scale_offset)


def parse_constants(data: bytes) -> list[ConstTensor] | None:
    """Constant tensors of a .tflite file, in file order; None if it is not one.

    Never raises on garbage: anything the flatbuffer reader trips over means "not a
    model", and the encoder falls back to byte-level modes.
    """
    if not looks_like_tflite(data):
        return None
    schema = _schema()
    if schema is None:
        return None
    try:
        return _parse(schema, data)
    except Exception as err:  # flatbuffers raises anything on malformed input
        log.info("not a parseable .tflite (%s): byte-level modes only", err)
        return None


def _parse(schema: Any, data: bytes) -> list[ConstTensor]:
    model = schema.Model.GetRootAs(data, 0)
    n_buffers = model.BuffersLength()
    owners: dict[int, ConstTensor] = {}
    for sg_index in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(sg_index)
        for t_index in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t_index)
            b_index = int(tensor.Buffer())
            if b_index <= 0 or b_index >= n_buffers or b_index in owners:
                continue
            rng = _buffer_range(model.Buffers(b_index), len(data))
            if rng is not None:
                owners[b_index] = _make_const(tensor, rng)
    consts = sorted(owners.values(), key=lambda c: c.offset)
    # Overlapping ranges mean a malformed or exotic file: keep the first of each overlap.
    kept: list[ConstTensor] = []
    end = 0
    for const in consts:
        if const.offset >= end:
            kept.append(const)
            end = const.offset + const.length
    return kept


def match_constants(
    old: list[ConstTensor], new: list[ConstTensor]
) -> list[tuple[ConstTensor, ConstTensor]]:
    """Pair new tensors with old ones of the same name, shape and type, in order."""
    by_key: dict[tuple[str, tuple[int, ...], int], list[ConstTensor]] = {}
    for const in old:
        by_key.setdefault(const.key, []).append(const)
    pairs = []
    for const in new:
        candidates = by_key.get(const.key)
        if candidates:
            pairs.append((candidates.pop(0), const))
    return pairs


def scale_links(data: bytes) -> list[ScaleLink]:
    """Bias scale vectors that equal f32(input scale * filter scale) exactly.

    Checked value by value on this file, so a model that breaks the TFLite
    convention just yields fewer links. Never raises on garbage.
    """
    schema = _schema() if looks_like_tflite(data) else None
    if schema is None:
        return []
    try:
        return _scale_links(schema, data)
    except Exception as err:  # flatbuffers raises anything on malformed input
        log.info("no scale links (%s)", err)
        return []


def _scale_links(schema: Any, data: bytes) -> list[ScaleLink]:
    model = schema.Model.GetRootAs(data, 0)
    links: dict[int, ScaleLink] = {}
    for sg_index in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(sg_index)
        n_tensors = subgraph.TensorsLength()
        for op_index in range(subgraph.OperatorsLength()):
            inputs = subgraph.Operators(op_index).InputsAsNumpy()
            if not isinstance(inputs, np.ndarray) or len(inputs) < 3:
                continue
            x, w, b = (int(i) for i in inputs[:3])
            if min(x, w, b) < 0 or max(x, w, b) >= n_tensors:
                continue
            vecs = [_scale_vector(subgraph.Tensors(i)) for i in (x, w, b)]
            (x_off, x_n), (w_off, w_n), (b_off, b_n) = vecs
            if min(x_off, w_off, b_off) < 0 or x_n != 1 or b_n == 0 or w_n not in (1, b_n):
                continue
            if b_off in links or max(o + 4 * n for o, n in vecs) > len(data):
                continue
            xs = np.frombuffer(data, "<f4", 1, x_off).astype(np.float64)
            ws = np.frombuffer(data, "<f4", w_n, w_off).astype(np.float64)
            bs = np.frombuffer(data, "<f4", b_n, b_off)
            pred = np.broadcast_to(ws * xs[0], (b_n,)).astype("<f4")
            if pred.tobytes() == bs.tobytes():
                links[b_off] = ScaleLink(b_off, b_n, w_off, w_n, x_off)
    return sorted(links.values(), key=lambda link: link.target)

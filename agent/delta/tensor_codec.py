"""Element-wise prediction of a target tensor from its base tensor.

Forward (encoder) and inverse (decoder) transforms of one chunk. All arithmetic is
integer, or IEEE multiply + rint in float32 (one-byte types) or float64, so every
platform decodes bit-exactly:

    pred   = old                                             (DIFF)
           = clip(rint((old - zp_old) * ratio[ch]) + zp_new)  (RESCALE)
    r      = new - pred            wrapped to the element width
    e      = r - ((a*r_left + b*r_up + c*r_upleft + 32) >> 6)  when spatial coeffs
    bytes  = e (little endian), as byte planes within the chunk, or
             context-sorted and packed (packing.py)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.delta.ans import decode_chunk, encode_chunk
from agent.delta.format import CHUNK_ELEMS
from agent.delta.packing import (
    BoolArray,
    Contexts,
    KeyArray,
    context_keys,
    pack_sorted,
    unpack_sorted,
)
from agent.delta.table import Layout, Predictor, TensorEntry

Int64Array = npt.NDArray[Any]  # int64 by convention; numpy stubs lose it
FloatArray = npt.NDArray[np.float64]
AnyArray = npt.NDArray[Any]
Reader = Callable[[int], bytes]


def unsigned(dtype: str) -> np.dtype[Any]:
    return np.dtype(f"<u{np.dtype(dtype).itemsize}")


def signed(dtype: str) -> np.dtype[Any]:
    return np.dtype(f"<i{np.dtype(dtype).itemsize}")


def work_types(entry: TensorEntry) -> tuple[np.dtype[Any], np.dtype[Any]]:
    """(float, int) types the chunk math runs in: as narrow as stays exact.

    One-byte types predict in float32 and keep residuals in int8, whose arithmetic
    wraps exactly as the format does; wider types use float64 and int32/int64.
    """
    size = entry.itemsize
    if size == 1:
        return np.dtype(np.float32), np.dtype(np.int8)
    return np.dtype(np.float64), np.dtype(np.int32 if size == 2 else np.int64)


def row_elems(entry: TensorEntry) -> int:
    return math.prod(entry.shape[1:])


def chunks(entry: TensorEntry) -> Iterator[tuple[int, int]]:
    """(first element, element count) of each chunk, in order.

    Chunks are whole slabs along axis 0 (so per-channel parameters broadcast and
    spatial prediction never crosses a chunk) of at most CHUNK_ELEMS elements;
    a tensor whose single row exceeds that is cut into flat runs instead.
    """
    total = entry.count
    row = row_elems(entry)
    step = max(1, CHUNK_ELEMS // row) * row if row <= CHUNK_ELEMS else CHUNK_ELEMS
    for start in range(0, total, step):
        yield start, min(step, total - start)


Param = Callable[[npt.NDArray[Any]], Any]


def _channels(entry: TensorEntry, start: int, count: int) -> tuple[tuple[int, ...], Param]:
    """A 2-D shape for the chunk and how to lay a per-channel vector against it."""
    n = len(entry.ratios)
    if n == 1:
        return (count,), lambda p: p[0]
    row = row_elems(entry)
    if entry.axis == 0 and start % row == 0 and count % row == 0:
        r0, rows = start // row, count // row
        return (rows, row), lambda p: p[r0 : r0 + rows, None] if len(p) > 1 else p[0]
    inner = math.prod(entry.shape[entry.axis + 1 :])
    if inner == 1 and start % n == 0 and count % n == 0:
        return (count // n, n), lambda p: p[None, :] if len(p) > 1 else p[0]
    period = n * inner
    offset = start % period
    reps = -(-(offset + count) // period)
    ch = np.tile(np.repeat(np.arange(n, dtype=np.int64), inner), reps)[offset : offset + count]
    return (count,), lambda p: p[ch] if len(p) > 1 else p[0]


class Workspace:
    """Chunk-sized scratch arrays reused from chunk to chunk by the decoder.

    Fresh megabyte-sized temporaries cost page faults, which made up most of the
    decoder's time. One per decode call: never shared between threads.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, np.dtype[Any]], AnyArray] = {}

    def get(self, slot: int, n: int, dtype: np.dtype[Any]) -> AnyArray:
        buf = self._bufs.get((slot, dtype))
        if buf is None or buf.size < n:
            buf = self._bufs[(slot, dtype)] = np.empty(max(n, CHUNK_ELEMS), dtype)
        return buf[:n]


def _fresh(slot: int, n: int, dtype: np.dtype[Any]) -> AnyArray:
    return np.empty(n, dtype)


class _Chunk:
    """The prediction of one chunk and what context keys need from it."""

    def __init__(
        self, entry: TensorEntry, old: AnyArray, start: int, ws: Workspace | None = None
    ) -> None:
        self.entry = entry
        self.alloc = ws.get if ws is not None else _fresh
        n = old.size
        self.fdt, self.idt = work_types(entry)
        self.udt = unsigned(entry.dtype)
        self.sdt = signed(entry.dtype)
        shape, pick = _channels(entry, start, old.size)
        needs_float = entry.predictor is Predictor.RESCALE or entry.layout in (
            Layout.SORTED, Layout.ANS)
        self.scaled = self.rounded = None
        if needs_float:
            x = self.alloc(0, n, self.fdt).reshape(shape)
            x[...] = old.reshape(shape)
            if np.any(entry.zp_old):
                x -= pick(entry.zp_old.astype(self.fdt))
            if entry.predictor is Predictor.RESCALE:
                x *= pick(entry.ratios.astype(self.fdt))
                self.rounded = np.rint(x, out=self.alloc(1, n, self.fdt).reshape(shape))
            else:
                self.rounded = x
            self.scaled = x
        if entry.predictor is Predictor.RESCALE:
            assert self.rounded is not None
            info = np.iinfo(np.dtype(entry.dtype))
            tmp = self.alloc(2, n, self.fdt).reshape(shape)
            if np.any(entry.zp_new):
                np.add(self.rounded, pick(entry.zp_new.astype(self.fdt)), out=tmp)
                np.clip(tmp, info.min, info.max, out=tmp)
            else:
                np.clip(self.rounded, info.min, info.max, out=tmp)
            pred = self.alloc(3, n, np.dtype(entry.dtype))
            pred[...] = tmp.reshape(-1)
            self.pred = pred.view(self.udt)
        else:
            self.pred = old.view(self.udt)

    def keys(self) -> tuple[KeyArray, BoolArray | None]:
        e = self.entry
        assert self.scaled is not None and self.rounded is not None
        ctx = Contexts(e.key_shift, e.key_mags, e.key_fracs)
        n = self.scaled.size
        scratch = (self.alloc(4, n, self.fdt), self.alloc(5, n, self.fdt))
        return context_keys(self.scaled.reshape(-1), self.rounded.reshape(-1), ctx, scratch)


def scaled_values(entry: TensorEntry, old: AnyArray, start: int) -> FloatArray:
    """The base elements in the target's quantization, before rounding (float64)."""
    probe = replace(entry, layout=Layout.SORTED)
    chunk = _Chunk(probe, old, start)
    assert chunk.scaled is not None
    return chunk.scaled.reshape(-1).astype(np.float64)


def predict(entry: TensorEntry, old: AnyArray, start: int) -> AnyArray:
    """The prediction of one chunk, as unsigned bits of the element width."""
    pred: AnyArray = _Chunk(entry, old, start).pred
    return pred


def wrap_signed(values: Int64Array, bits: int) -> Int64Array:
    half = np.int64(1 << (bits - 1))
    return ((values + half) & np.int64((1 << bits) - 1)) - half


def _slab(entry: TensorEntry, flat: AnyArray) -> AnyArray:
    return flat.reshape((-1, *entry.shape[1:]))


def _spatial_pred(r: Int64Array, coeffs: tuple[int, int, int]) -> Int64Array:
    """Causal prediction over axes 1 (up) and 2 (left) from known residuals."""
    a, b, c = coeffs
    acc = np.zeros_like(r)
    acc[:, :, 1:] += a * r[:, :, :-1]
    acc[:, 1:, :] += b * r[:, :-1, :]
    acc[:, 1:, 1:] += c * r[:, :-1, :-1]
    return (acc + 32) >> 6


def forward(
    entry: TensorEntry, old: AnyArray, new: AnyArray, start: int
) -> tuple[float | None, list[bytes]]:
    """Residual bytes of one chunk (encoder side), as pieces worth separate zstd blocks.

    The float is the packer's size estimate for context-sorted chunks, else None.
    """
    chunk = _Chunk(entry, old, start)
    r_u = new.view(chunk.udt) - chunk.pred
    if entry.itemsize == 8:  # DIFF only: plain wrapping arithmetic on the bits
        return None, [_planes(entry, r_u)]
    e = r_u.view(chunk.sdt).astype(np.int64)
    if entry.coeffs is not None:
        bits = 8 * entry.itemsize
        r = _slab(entry, e)
        e = wrap_signed(r - _spatial_pred(r, entry.coeffs), bits).reshape(-1)
    if entry.layout is Layout.SORTED:
        return pack_sorted(e, *chunk.keys(), entry.itemsize)
    if entry.layout is Layout.ANS:
        keys, flip = chunk.keys()
        return None, [encode_chunk(keys, flipped(e, flip), entry.models)]
    return None, [_planes(entry, (e & ((1 << (8 * entry.itemsize)) - 1)).astype(chunk.udt))]


def flipped(e: Int64Array, flip: BoolArray | None) -> npt.NDArray[np.int8]:
    """One-byte residuals negated where the rounding fraction was negative (wrapping)."""
    v = e.astype(np.int8)
    if flip is not None:  # (x ^ -1) + 1 == -x, wrapping like the decoder
        neg = np.negative(flip.view(np.int8))
        v ^= neg
        v -= neg
    return v


def chunk_features(
    entry: TensorEntry, old: AnyArray, new: AnyArray
) -> Iterator[tuple[FloatArray, FloatArray, npt.NDArray[np.int8]]]:
    """Encoder, one-byte types: per chunk, what context keys are made of (the scaled
    and rounded prediction) and the int8 residual the ANS layout codes."""
    probe = replace(entry, layout=Layout.ANS)
    for s, n in chunks(entry):
        chunk = _Chunk(probe, old[s : s + n], s)
        e = (new[s : s + n].view(chunk.udt) - chunk.pred).view(np.int8)
        if entry.coeffs is not None:
            r = _slab(entry, e.astype(np.int64))
            e = wrap_signed(r - _spatial_pred(r, entry.coeffs), 8).reshape(-1).astype(np.int8)
        assert chunk.scaled is not None and chunk.rounded is not None
        yield chunk.scaled.reshape(-1), chunk.rounded.reshape(-1), e


def _planes(entry: TensorEntry, e_u: AnyArray) -> bytes:
    if entry.layout is Layout.PLANES:
        return e_u.view(np.uint8).reshape(-1, entry.itemsize).T.tobytes()
    return e_u.tobytes()


def inverse(
    entry: TensorEntry, old: AnyArray, read: Reader, start: int, ws: Workspace | None = None
) -> npt.NDArray[Any]:
    """Target elements of one chunk (unsigned bits, contiguous: write them as a buffer)."""
    count = old.size
    chunk = _Chunk(entry, old, start, ws)
    size = entry.itemsize
    if entry.layout is Layout.SORTED:
        e: AnyArray = unpack_sorted(read, *chunk.keys(), size, chunk.idt)
    elif entry.layout is Layout.ANS:
        keys, flip = chunk.keys()
        e = decode_chunk(read, keys, entry.models)
        if flip is not None:  # (x ^ -1) + 1 == -x: int8 wraps exactly like the encoder's
            neg = np.negative(flip.view(np.int8))
            e ^= neg
            e -= neg
    elif entry.layout is Layout.PLANES:
        planes = np.frombuffer(read(count * size), np.uint8).reshape(size, count)
        e = np.ascontiguousarray(planes.T).view(chunk.udt).reshape(count)
    else:
        e = np.frombuffer(read(count * size), chunk.udt)
    if entry.coeffs is not None:
        e = _undo_spatial(entry, e.view(chunk.sdt) if e.dtype == chunk.udt else e)
    if e.dtype.itemsize == size:
        e = e.view(chunk.udt)
    else:
        e = (e & ((1 << (8 * size)) - 1)).astype(chunk.udt)
    out: AnyArray = chunk.pred + e
    return out


def _undo_spatial(entry: TensorEntry, e_flat: AnyArray) -> Int64Array:
    bits = 8 * entry.itemsize
    e = _slab(entry, e_flat.astype(np.int64))
    assert entry.coeffs is not None
    a, b, c = entry.coeffs
    r = np.zeros_like(e)
    height, width = e.shape[1], e.shape[2]
    for h in range(height):
        for w in range(width):
            acc = np.zeros_like(e[:, 0, 0])
            if w:
                acc += a * r[:, h, w - 1]
            if h:
                acc += b * r[:, h - 1, w]
                if w:
                    acc += c * r[:, h - 1, w - 1]
            r[:, h, w] = wrap_signed(e[:, h, w] + ((acc + 32) >> 6), bits)
    return r.reshape(-1)


def encode_tensor(entry: TensorEntry, old: AnyArray, new: AnyArray) -> list[bytes]:
    """All residual pieces of a tensor, chunk after chunk."""
    return encode_tensor_estimate(entry, old, new)[1]


def encode_tensor_estimate(
    entry: TensorEntry, old: AnyArray, new: AnyArray
) -> tuple[float | None, list[bytes]]:
    """Pieces plus the packer's size estimate (None unless context-sorted)."""
    pieces: list[bytes] = []
    total: float | None = None
    for s, n in chunks(entry):
        estimate, parts = forward(entry, old[s : s + n], new[s : s + n], s)
        pieces += parts
        if estimate is not None:
            total = (total or 0.0) + estimate
    return total, pieces

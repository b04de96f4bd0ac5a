"""Context-sorted packing: how residuals reach zstd close to their entropy.

zstd's Huffman stage spends at least one bit per byte and sees one mix of all
residuals. Both hurt INT8 residuals, which are mostly -1/0/+1 but whose spread
grows with the weight's magnitude. So, per chunk:

1. every element gets a context key the decoder can compute too: the magnitude
   bucket of its prediction (``|rounded| >> shift``, ``mags`` buckets) and, for
   rescaled tensors, how far the prediction was from an integer before rounding
   (``|frac|`` in ``fracs`` bins). Where ``frac < 0`` the residual is negated, so
   both rounding directions share one bin;
2. residuals are stably sorted by key, giving one segment per key;
3. each segment is packed in base ``k = 2a + 2``: symbols ``r + a`` for
   ``|r| <= a``, symbol ``k - 1`` as an escape whose value follows later,
   ``m`` symbols per byte with ``k**m <= 256`` (``a = RAW`` stores plain values).

Chunk layout: one ``a`` byte per non-empty segment (in key order), each
segment's packed bytes, then the escaped values of all segments (element width).
The encoder ends a zstd block after each piece, so every segment gets its own
Huffman table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.delta.errors import CorruptPatchError

Int64Array = npt.NDArray[np.int64]
KeyArray = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
MAX_MAGS = 16
MAX_FRACS = 3
RAW = 255
MAX_A = 126
# Candidate alphabets tried by the encoder (a = 0 codes only zero vs escape).
A_CANDIDATES = (0, 1, 2, 3, 4, 5, 6, 7, 9, 12, 15, 20, 31, 63, MAX_A)
# Segments with at least this many symbols are unpacked alone, in place.
BIG_SEGMENT = 2048
# Rough zstd cost of starting a block with its own Huffman table, in bytes.
SEGMENT_OVERHEAD = 40


@dataclass(frozen=True)
class Contexts:
    """How keys are formed: ``mags`` magnitude buckets of width ``2**shift``, ``fracs`` bins."""

    shift: int
    mags: int
    fracs: int

    @property
    def count(self) -> int:
        return self.mags * self.fracs


def symbols_per_byte(a: int) -> int:
    k = 2 * a + 2
    m = 1
    while k ** (m + 1) <= 256:
        m += 1
    return m


def context_keys(
    scaled: FloatArray,
    rounded: FloatArray,
    ctx: Contexts,
    scratch: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[KeyArray, BoolArray | None]:
    """Per-element key in [0, ctx.count) and where the residual is negated.

    In-place steps (into ``scratch`` when given): fresh chunk-sized temporaries cost
    page faults, not arithmetic.
    """
    mag = np.abs(rounded, out=scratch[0] if scratch is not None else None)
    mag *= 2.0**-ctx.shift
    np.minimum(mag, ctx.mags - 0.5, out=mag)
    np.floor(mag, out=mag)
    if ctx.fracs == 1:
        return mag.astype(np.uint8), None
    frac = np.subtract(scaled, rounded, out=scratch[1] if scratch is not None else None)
    flip = frac < 0
    np.abs(frac, out=frac)
    frac *= 2 * ctx.fracs
    np.floor(frac, out=frac)
    np.minimum(frac, ctx.fracs - 1, out=frac)
    mag *= ctx.fracs
    mag += frac
    return mag.astype(np.uint8), flip


def _pack(sym: Int64Array, a: int) -> bytes:
    k, m = 2 * a + 2, symbols_per_byte(a)
    pad = (-len(sym)) % m
    digits = np.concatenate([sym, np.zeros(pad, np.int64)]).reshape(-1, m)
    weights = k ** np.arange(m, dtype=np.int64)
    return (digits @ weights).astype(np.uint8).tobytes()


@functools.cache
def _digit_table(a: int) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.bool_]]:
    """Byte -> its m values (digit - a, least significant digit first); and byte ->
    whether it holds an escape (digit 2a+1, value a+1) or is no valid packing."""
    k, m = 2 * a + 2, symbols_per_byte(a)
    values = np.arange(256, dtype=np.int64)
    digits = np.stack([(values // k**j) % k for j in range(m)], axis=1)
    special = (digits == k - 1).any(axis=1) | (values >= k**m)
    return (digits - a).astype(np.int8), special


def _unpack(a: int, raw: npt.NDArray[np.uint8], count: int) -> tuple[npt.NDArray[Any], Int64Array]:
    """``count`` values (escape slots hold a+1) and the escapes' positions."""
    table, special = _digit_table(a)
    m = table.shape[1]
    values = np.take(table, raw, axis=0).reshape(-1)[:count]
    # Escapes and invalid bytes are found byte-wise: m times fewer elements.
    hits = np.flatnonzero(np.take(special, raw))
    if not hits.size:
        return values, np.zeros(0, np.int64)
    if int(raw[hits].max()) >= (2 * a + 2) ** m:
        raise CorruptPatchError("corrupt patch: packed symbol out of range")
    cand = (hits[:, None] * m + np.arange(m)).reshape(-1)
    cand = cand[cand < count]
    return values, cand[values[cand] == a + 1]


def _entropy_bytes(data: npt.NDArray[np.uint8]) -> float:
    if data.size == 0:
        return 0.0
    counts = np.bincount(data, minlength=256)
    p = counts[counts > 0] / data.size
    return float(-(p * np.log2(p)).sum() * data.size / 8)


def _to_bytes(values: Int64Array, itemsize: int) -> bytes:
    return (values & ((1 << (8 * itemsize)) - 1)).astype(f"<u{itemsize}").tobytes()


def _segment(seg: Int64Array, itemsize: int) -> tuple[float, int, bytes, Int64Array]:
    """(estimated coded bytes, alphabet, packed bytes, escaped values) of a segment."""
    span = int(np.abs(seg).max())
    alphabets = [c for c in A_CANDIDATES if c <= span] or [0]
    best: tuple[float, int, bytes, Int64Array] | None = None
    for a in alphabets:
        esc = np.abs(seg) > a
        packed = _pack(np.where(esc, 2 * a + 1, seg + a), a)
        escaped = seg[esc]
        cost = _entropy_bytes(np.frombuffer(packed, np.uint8)) + 1.2 * itemsize * len(escaped)
        if best is None or cost < best[0]:
            best = (cost, a, packed, escaped)
    if itemsize > 1:
        raw = _to_bytes(seg, itemsize)
        cost = _entropy_bytes(np.frombuffer(raw, np.uint8))
        if best is None or cost < best[0]:
            best = (cost, RAW, raw, seg[:0])
    assert best is not None
    return best


def _wrap(values: npt.NDArray[Any], itemsize: int) -> npt.NDArray[Any]:
    """Wrap to the signed range of ``itemsize`` bytes, in the array's own type."""
    bits = 8 * itemsize
    half = 1 << (bits - 1)
    return ((values + half) & ((1 << bits) - 1)) - half


def pack_sorted(
    values: Int64Array, keys: KeyArray, flip: BoolArray | None, itemsize: int
) -> tuple[float, list[bytes]]:
    """Encoder: a chunk's signed residuals -> (estimated size, pieces).

    Pieces are [alphabets, segment..., escapes]; the estimate is what the encoder
    uses to choose the context layout without running zstd.
    """
    if flip is not None:
        values = _wrap(np.where(flip, -values, values), itemsize)
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys)
    ordered = values[order]
    params = bytearray()
    body: list[bytes] = []
    escapes: list[Int64Array] = []
    estimate = 0.0
    pos = 0
    for count in counts[counts > 0].tolist():
        cost, a, packed, escaped = _segment(ordered[pos : pos + count], itemsize)
        pos += count
        estimate += cost + SEGMENT_OVERHEAD
        params.append(a)
        body.append(packed)
        escapes.append(escaped)
    tail = _to_bytes(np.concatenate(escapes), itemsize)
    return estimate + len(tail) * 0.2, [bytes(params), *body, tail]


def _ragged_arange(starts: Int64Array, lengths: Int64Array) -> Int64Array:
    """Concatenated ``arange(start, start + length)`` for each pair, vectorized."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def unpack_sorted(
    read: Callable[[int], bytes],
    keys: KeyArray,
    flip: BoolArray | None,
    itemsize: int,
    work: np.dtype[Any],
) -> npt.NDArray[Any]:
    """Decoder: the chunk's residuals (wrapped, signed, in ``work``) in element order.

    Big segments are unpacked in place one by one; small ones that share an
    alphabet are unpacked together, so no chunk costs a Python step per segment.
    """
    order = np.argsort(keys, kind="stable")
    present = _segment_sizes(keys[order])
    params = np.frombuffer(read(len(present)), np.uint8).astype(np.int64)
    raw_mask = params == RAW
    if np.any(params[~raw_mask] > MAX_A) or (itemsize == 1 and raw_mask.any()):
        raise CorruptPatchError("corrupt patch: bad segment alphabet")
    per_byte = np.array([1 if a == RAW else symbols_per_byte(a) for a in params.tolist()],
                        dtype=np.int64)
    sizes = np.where(raw_mask, present * itemsize, -(-present // per_byte))
    body = np.frombuffer(read(int(sizes.sum())), np.uint8)
    byte_start = np.cumsum(sizes) - sizes
    sym_start = np.cumsum(present) - present
    values = np.empty(int(present.sum()), work)
    sdt = np.dtype(f"<i{itemsize}")
    escaped: Any = []
    small: dict[int, list[int]] = {}
    for seg, (a, count) in enumerate(zip(params.tolist(), present.tolist(), strict=True)):
        if a != RAW and count < BIG_SEGMENT:
            small.setdefault(a, []).append(seg)
            continue
        lo, at = int(sym_start[seg]), int(byte_start[seg])
        raw = body[at : at + int(sizes[seg])]
        if a == RAW:
            values[lo : lo + count] = raw.view(sdt)
            continue
        values[lo : lo + count], escapes = _unpack(a, raw, count)
        escaped.append(escapes + lo)
    for a, group in small.items():
        segs = np.array(group, dtype=np.int64)
        m = symbols_per_byte(a)
        raw = body[_ragged_arange(byte_start[segs], sizes[segs])]
        padded = sizes[segs] * m
        sym, escapes = _unpack(a, raw, int(padded.sum()))
        # Drop each segment's padding symbols (only ever at its end).
        within = np.arange(int(padded.sum())) - np.repeat(np.cumsum(padded) - padded, padded)
        keep = within < np.repeat(present[segs], padded)
        dest = _ragged_arange(sym_start[segs], present[segs])
        values[dest] = sym[keep]
        escaped.append(dest[np.cumsum(keep)[escapes[keep[escapes]]] - 1])
    # Runs of increasing positions: a stable (merge) sort is nearly a copy.
    where = np.sort(np.concatenate(escaped), kind="stable") if escaped else escaped
    if len(where):
        values[where] = np.frombuffer(read(len(where) * itemsize), sdt)
    out = np.empty_like(values)
    out[order] = values
    if flip is not None:
        neg = -flip.astype(work)  # 0 or -1: (x ^ -1) + 1 == -x, two's complement
        out ^= neg
        out -= neg
        if work.itemsize != itemsize:  # same width wraps by itself
            out = _wrap(out, itemsize)
    return out


def _segment_sizes(sorted_keys: KeyArray) -> Int64Array:
    """Lengths of the runs of equal keys in a sorted key array."""
    if not sorted_keys.size:
        return np.zeros(0, np.int64)
    edges = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    return np.diff(np.concatenate([[0], edges, [sorted_keys.size]])).astype(np.int64)

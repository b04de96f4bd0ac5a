"""The tensor table of a model-aware patch: one entry per predicted tensor.

Each entry says where the tensor's bytes go in the target, where its reference
bytes sit in the base, and how the residual was formed (tensor_codec.py). The
decoder trusts nothing here: every field is range-checked against both files.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from agent.delta.ans import ContextModel, encode_models, parse_models
from agent.delta.errors import CorruptPatchError
from agent.delta.format import CHUNK_ELEMS, encode_uvarint
from agent.delta.packing import MAX_FRACS, MAX_MAGS

# Codec element types: the numpy dtype strings the table can name.
DTYPE_CODES = {
    "|u1": 1, "|i1": 2, "<u2": 3, "<i2": 4, "<u4": 5, "<i4": 6,
    "<u8": 7, "<i8": 8, "<f2": 9, "<f4": 10, "<f8": 11,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
MAX_NDIM = 8
MAX_COEFF = 1 << 12
MAX_SHIFT = 62
MAX_KEY_SHIFT = 40
# Ratios a predictor accepts; anything else (0/0, inf, huge) becomes 1.0.
MAX_RATIO = 2.0**31


def sanitize_ratios(ratios: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.where(np.isfinite(ratios) & (np.abs(ratios) < MAX_RATIO), ratios, 1.0)


def fixed_ratios(m: npt.NDArray[np.int64], shift: int) -> npt.NDArray[np.float64]:
    return sanitize_ratios(m.astype(np.float64) * 2.0**-shift)


def scale_ratios(
    old_scales: npt.NDArray[np.float32], new_scales: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    """old/new in float64: exact inputs, one IEEE division, same on every platform."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return sanitize_ratios(old_scales.astype(np.float64) / new_scales.astype(np.float64))


class Layout(IntEnum):
    PLAIN = 0  # little-endian elements
    PLANES = 1  # byte planes per chunk (multi-byte types)
    SORTED = 2  # context-sorted, packed (packing.py)
    ANS = 3  # one-byte types: per-context models, ANS-coded (ans.py; format version 2)


class Predictor(IntEnum):
    DIFF = 1  # residual = new - old, wrapping in the element's unsigned width
    RESCALE = 2  # residual = new - clip(rint((old - zp_old) * ratio) + zp_new)


@dataclass
class TensorEntry:
    """How one target tensor is rebuilt from a base tensor and a residual."""

    new_offset: int
    length: int
    old_offset: int
    dtype: str
    shape: tuple[int, ...]
    predictor: Predictor = Predictor.DIFF
    axis: int = 0
    ratios: npt.NDArray[np.float64] = field(default_factory=lambda: np.ones(1))
    # Where the ratios come from: base/target scale vectors (old offset in the base,
    # new offset in the skeleton), else fixed point ``ratio_m * 2**-ratio_shift``.
    ratio_ref: tuple[int, int] | None = None
    ratio_m: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    ratio_shift: int = 0
    zp_old: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))
    zp_new: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))
    # Spatial prediction of the residual over axes 1 and 2 (left, up, up-left) / 64.
    coeffs: tuple[int, int, int] | None = None
    layout: Layout = Layout.PLAIN
    # SORTED, ANS: contexts = key_mags buckets of |prediction| >> key_shift, key_fracs bins.
    key_shift: int = 0
    key_mags: int = 1
    key_fracs: int = 1
    # ANS: one model per context (None where the tensor has no residual in it).
    models: tuple[ContextModel | None, ...] = ()

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def count(self) -> int:
        return math.prod(self.shape)



def _svarint(value: int) -> bytes:
    return encode_uvarint((value << 1) ^ (value >> 63) if value < 0 else value << 1)


class FixupKind(IntEnum):
    PRODUCT = 0  # f32(a[i] * b) from two skeleton vectors: TFLite's bias scales
    DELTA32 = 1  # int32 difference from a base vector, stored as byte planes


@dataclass(frozen=True)
class Fixup:
    """A 4-byte-element vector of the skeleton coded through a prediction.

    PRODUCT: TFLite stores a bias scale as input scale x filter scale rounded to
    float32, so the skeleton holds ``(actual - predicted) mod 256`` bytewise, which
    is all zeros. ``a``/``b`` are skeleton offsets (``a_count`` 1 or ``count``).

    DELTA32: a filter's new scales are close to its old ones, so the skeleton holds
    the int32 differences of their bits from the base vector at ``a_offset`` (a
    base-file offset), as four byte planes: low-entropy high planes.

    DELTA32 fixups are undone first, so a PRODUCT may read a DELTA32 target.
    """

    kind: FixupKind
    target: int
    count: int
    a_offset: int
    a_count: int
    b_offset: int = 0

    @property
    def target_range(self) -> tuple[int, int]:
        return self.target, 4 * self.count

    def sources(self) -> tuple[tuple[int, int], ...]:
        """Skeleton ranges this fixup reads (PRODUCT only)."""
        if self.kind is FixupKind.PRODUCT:
            return ((self.a_offset, 4 * self.a_count), (self.b_offset, 4))
        return ()


def encode_entry(e: TensorEntry, prev_end: int) -> bytes:
    """One entry; offsets relative to the previous entry's end and to each other."""
    out = bytearray(encode_uvarint(e.new_offset - prev_end) + encode_uvarint(e.length))
    out += _svarint(e.old_offset - e.new_offset)
    out += bytes((DTYPE_CODES[e.dtype], len(e.shape)))
    for dim in e.shape:
        out += encode_uvarint(dim)
    out.append(int(e.predictor))
    if e.predictor is Predictor.RESCALE:
        out.append(e.axis)
        out += encode_uvarint(len(e.ratios))
        if e.ratio_ref is not None:
            out += b"\x01" + encode_uvarint(e.ratio_ref[0]) + encode_uvarint(e.ratio_ref[1])
        else:
            out += bytes((0, e.ratio_shift))
            for m in e.ratio_m:
                out += _svarint(int(m))
        for zps in (e.zp_old, e.zp_new):
            out += encode_uvarint(len(zps))
            for zp in zps:
                out += _svarint(int(zp))
    if e.coeffs is None:
        out.append(0)
    else:
        out.append(1)
        for c in e.coeffs:
            out += _svarint(c)
    out.append(int(e.layout))
    if e.layout in (Layout.SORTED, Layout.ANS):
        out += bytes((e.key_shift, e.key_mags, e.key_fracs))
    if e.layout is Layout.ANS:
        out += encode_models(e.models, encode_uvarint, _svarint)
    return bytes(out)


def encode_table(entries: list[TensorEntry], fixups: list[Fixup]) -> bytes:
    out = bytearray(encode_uvarint(len(entries)))
    prev_end = 0
    for e in entries:
        out += encode_entry(e, prev_end)
        prev_end = e.new_offset + e.length
    out += encode_uvarint(len(fixups))
    for f in fixups:
        out.append(int(f.kind))
        for value in (f.target, f.count, f.a_offset, f.a_count, f.b_offset):
            out += encode_uvarint(value)
    return bytes(out)


class _Cursor:
    """Bounds-checked reads from the decompressed table (hot: one call per field)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _ended(self) -> CorruptPatchError:
        return CorruptPatchError("corrupt patch: tensor table ends early")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._ended()
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        try:
            value = self.data[self.pos]
        except IndexError:
            raise self._ended() from None
        self.pos += 1
        return value

    def uvarint(self) -> int:
        data, pos = self.data, self.pos
        value = shift = 0
        try:
            while shift < 70:
                b = data[pos]
                pos += 1
                value |= (b & 0x7F) << shift
                if not b & 0x80:
                    self.pos = pos
                    return value
                shift += 7
        except IndexError:
            raise self._ended() from None
        raise CorruptPatchError("corrupt patch: varint too long in tensor table")

    def svarint(self) -> int:
        raw = self.uvarint()
        return (raw >> 1) ^ -(raw & 1)


def _parse_entry(cur: _Cursor, prev_end: int) -> TensorEntry:
    new_offset = prev_end + cur.uvarint()
    length = cur.uvarint()
    old_offset = new_offset + cur.svarint()
    if old_offset < 0:
        raise CorruptPatchError("corrupt patch: negative base offset in table")
    code, ndim = cur.byte(), cur.byte()
    if code not in CODE_DTYPES or not 1 <= ndim <= MAX_NDIM:
        raise CorruptPatchError("corrupt patch: bad tensor type or rank in table")
    shape = tuple(cur.uvarint() for _ in range(ndim))
    entry = TensorEntry(new_offset, length, old_offset, CODE_DTYPES[code], shape)
    try:
        entry.predictor = Predictor(cur.byte())
    except ValueError as err:
        raise CorruptPatchError("corrupt patch: unknown predictor in table") from err
    if entry.predictor is Predictor.RESCALE:
        _parse_rescale(cur, entry)
    _parse_layout(cur, entry)
    return entry


def _parse_rescale(cur: _Cursor, entry: TensorEntry) -> None:
    entry.axis = cur.byte()
    n = cur.uvarint()
    if n > entry.length or n == 0:
        raise CorruptPatchError("corrupt patch: bad channel count in table")
    source = cur.byte()
    if source == 1:
        entry.ratio_ref = (cur.uvarint(), cur.uvarint())
        entry.ratios = np.ones(n)  # resolved once the skeleton is decoded
    elif source == 0:
        entry.ratio_shift = cur.byte()
        if entry.ratio_shift > MAX_SHIFT:
            raise CorruptPatchError("corrupt patch: bad ratio shift in table")
        values = [cur.svarint() for _ in range(n)]
        if any(abs(m) >= 1 << 53 for m in values):
            raise CorruptPatchError("corrupt patch: ratio out of range in table")
        entry.ratio_m = np.array(values, dtype=np.int64)
        entry.ratios = fixed_ratios(entry.ratio_m, entry.ratio_shift)
    else:
        raise CorruptPatchError("corrupt patch: bad ratio source in table")
    zps = []
    for _ in range(2):
        k = cur.uvarint()
        if k > n:
            raise CorruptPatchError("corrupt patch: more zero points than channels")
        values = [cur.svarint() for _ in range(k)]
        if any(abs(z) >= 1 << 32 for z in values):
            raise CorruptPatchError("corrupt patch: zero point out of range in table")
        zps.append(np.array(values, dtype=np.int64))
    entry.zp_old, entry.zp_new = zps


def _parse_layout(cur: _Cursor, entry: TensorEntry) -> None:
    flag = cur.byte()
    if flag == 1:
        entry.coeffs = (cur.svarint(), cur.svarint(), cur.svarint())
    elif flag != 0:
        raise CorruptPatchError("corrupt patch: bad spatial flag in table")
    try:
        entry.layout = Layout(cur.byte())
    except ValueError as err:
        raise CorruptPatchError("corrupt patch: unknown layout in table") from err
    if entry.layout in (Layout.SORTED, Layout.ANS):
        entry.key_shift, entry.key_mags, entry.key_fracs = cur.byte(), cur.byte(), cur.byte()
    if entry.layout is Layout.ANS:
        entry.models = parse_models(cur, entry.key_mags * entry.key_fracs)


def validate_entry(e: TensorEntry, old_size: int) -> None:
    """Reject entries a correct encoder never writes; keeps the decoder in bounds."""
    bad = None
    if e.count * e.itemsize != e.length or e.length == 0:
        bad = "length does not match shape"
    elif e.old_offset + e.length > old_size:
        bad = "base range outside the base file"
    elif e.predictor is Predictor.RESCALE and not _rescale_ok(e):
        bad = "bad rescale parameters"
    elif e.coeffs is not None and not (
        len(e.shape) == 4
        and math.prod(e.shape[1:]) <= CHUNK_ELEMS
        and e.dtype[1] in "iu"
        and e.itemsize <= 4
        and all(abs(c) <= MAX_COEFF for c in e.coeffs)
    ):
        bad = "bad spatial predictor"
    elif e.layout is Layout.PLANES and e.itemsize == 1:
        bad = "byte planes on a one-byte type"
    elif e.layout in (Layout.SORTED, Layout.ANS) and not (
        e.dtype[1] in "iu"
        and (e.itemsize <= 4 if e.layout is Layout.SORTED else e.itemsize == 1)
        and e.key_shift <= MAX_KEY_SHIFT
        and 1 <= e.key_mags <= MAX_MAGS
        and 1 <= e.key_fracs <= (MAX_FRACS if e.predictor is Predictor.RESCALE else 1)
    ):
        bad = "bad context sorting"
    if bad:
        raise CorruptPatchError(f"corrupt patch: tensor at {e.new_offset}: {bad}")


def _rescale_ok(e: TensorEntry) -> bool:
    """Shape checks; ratios are finite and bounded by construction (sanitize_ratios)."""
    n = len(e.ratios)
    return (
        e.dtype[1] in "iu"
        and e.itemsize <= 4
        and e.axis < len(e.shape)
        and n in (1, e.shape[e.axis])
        and len(e.zp_old) in (1, n)
        and len(e.zp_new) in (1, n)
    )


def decode_table(
    data: bytes, old_size: int, target_size: int
) -> tuple[list[TensorEntry], list[Fixup]]:
    """Parse and validate a table: entries sorted, disjoint, inside both files."""
    cur = _Cursor(data)
    count = cur.uvarint()
    if count > len(data):
        raise CorruptPatchError("corrupt patch: tensor count larger than the table")
    entries = []
    end = 0
    for _ in range(count):
        entry = _parse_entry(cur, end)
        validate_entry(entry, old_size)
        if entry.new_offset < end or entry.new_offset + entry.length > target_size:
            raise CorruptPatchError("corrupt patch: tensor ranges overlap or overrun the target")
        end = entry.new_offset + entry.length
        entries.append(entry)
    n_fix = cur.uvarint()
    if n_fix > len(data):
        raise CorruptPatchError("corrupt patch: fixup count larger than the table")
    fixups = []
    for _ in range(n_fix):
        try:
            kind = FixupKind(cur.byte())
        except ValueError as err:
            raise CorruptPatchError("corrupt patch: unknown fixup kind") from err
        target, count, a_offset, a_count, b_offset = (cur.uvarint() for _ in range(5))
        fixups.append(Fixup(kind, target, count, a_offset, a_count, b_offset))
    if cur.pos != len(data):
        raise CorruptPatchError("corrupt patch: stray bytes after the tensor table")
    return entries, fixups


def validate_fixups(fixups: list[Fixup], skeleton_size: int, base_size: int) -> None:
    """In range, disjoint targets, and no PRODUCT source inside a PRODUCT target."""
    targets = sorted(f.target_range for f in fixups)
    for (a, n), (b, _) in itertools.pairwise(targets):
        if a + n > b:
            raise CorruptPatchError("corrupt patch: fixup targets overlap")
    products = [f.target_range for f in fixups if f.kind is FixupKind.PRODUCT]
    for f in fixups:
        if f.count == 0 or f.target + 4 * f.count > skeleton_size:
            raise CorruptPatchError("corrupt patch: fixup outside the skeleton")
        if f.kind is FixupKind.DELTA32:
            if f.a_count != f.count or f.a_offset + 4 * f.count > base_size:
                raise CorruptPatchError("corrupt patch: fixup base vector out of range")
            continue
        if f.a_count not in (1, f.count):
            raise CorruptPatchError("corrupt patch: bad fixup shape")
        for start, size in f.sources():
            if start + size > skeleton_size:
                raise CorruptPatchError("corrupt patch: fixup outside the skeleton")
            if any(start < t + tn and t < start + size for t, tn in products):
                raise CorruptPatchError("corrupt patch: fixup source inside a target")



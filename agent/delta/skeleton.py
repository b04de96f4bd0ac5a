"""The skeleton: a file with its predicted tensors cut out, plus its float fixups.

Shared by encoder and decoder so both cut, predict and rebase identically.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from agent.delta.errors import CorruptPatchError
from agent.delta.table import Fixup, FixupKind, TensorEntry

Range = tuple[int, int]  # (offset, length)


def cut(data: bytes, ranges: Sequence[Range]) -> bytes:
    """``data`` without the given sorted, disjoint ranges."""
    parts = []
    pos = 0
    for offset, length in ranges:
        if offset < pos:
            raise CorruptPatchError("corrupt patch: tensor ranges overlap")
        parts.append(data[pos:offset])
        pos = offset + length
    parts.append(data[pos:])
    return b"".join(parts)


def base_skeleton(base: bytes, entries: list[TensorEntry]) -> bytes:
    """The base with every referenced tensor range cut out (the skeleton dictionary)."""
    return cut(base, sorted((e.old_offset, e.length) for e in entries))


def target_skeleton(target: bytes, entries: list[TensorEntry]) -> bytes:
    return cut(target, [(e.new_offset, e.length) for e in entries])


class Rebase:
    """Maps absolute target offsets to skeleton offsets, given the cut entries."""

    def __init__(self, entries: list[TensorEntry]) -> None:
        self.starts = [e.new_offset for e in entries]
        self.ends = [e.new_offset + e.length for e in entries]
        self.removed = [0]
        for e in entries:
            self.removed.append(self.removed[-1] + e.length)

    def __call__(self, offset: int, length: int) -> int | None:
        """Skeleton offset of ``[offset, offset+length)``, None if it touches a tensor."""
        i = bisect.bisect_right(self.ends, offset)
        if i < len(self.starts) and self.starts[i] < offset + length:
            return None
        return offset - self.removed[i]


def predict_fixup(skel: bytes | bytearray, f: Fixup) -> npt.NDArray[np.uint8]:
    """Predicted bytes of a PRODUCT target: f32(a[i] * b), products taken in float64."""
    a = np.frombuffer(skel, dtype="<f4", count=f.a_count, offset=f.a_offset).astype(np.float64)
    b = np.frombuffer(skel, dtype="<f4", count=1, offset=f.b_offset).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        pred = np.broadcast_to(a * b[0], (f.count,)).astype("<f4")
    return pred.view(np.uint8)


def _region(skel: bytearray, f: Fixup) -> npt.NDArray[np.uint8]:
    return np.frombuffer(skel, dtype=np.uint8, count=4 * f.count, offset=f.target)


def _base_words(base: bytes, f: Fixup) -> npt.NDArray[np.uint32]:
    return np.frombuffer(base, dtype="<u4", count=f.count, offset=f.a_offset)


def residualize(skel: bytearray, fixups: list[Fixup], base: bytes) -> None:
    """Encoder, in place: PRODUCT targets -> residuals, then DELTA32 targets -> planes."""
    products = [f for f in fixups if f.kind is FixupKind.PRODUCT]
    preds = [predict_fixup(skel, f) for f in products]
    for f, pred in zip(products, preds, strict=True):
        skel[f.target : f.target + 4 * f.count] = (_region(skel, f) - pred).tobytes()
    for f in fixups:
        if f.kind is FixupKind.DELTA32:
            diff = _region(skel, f).view("<u4") - _base_words(base, f)
            skel[f.target : f.target + 4 * f.count] = diff.view(np.uint8).reshape(-1, 4).T.tobytes()


def restore(skel: bytearray, fixups: list[Fixup], base: bytes) -> None:
    """Decoder, in place: undo DELTA32 first, then add PRODUCT predictions back."""
    for f in fixups:
        if f.kind is FixupKind.DELTA32:
            planes = _region(skel, f).reshape(4, f.count)
            diff = np.ascontiguousarray(planes.T).view("<u4").reshape(-1)
            skel[f.target : f.target + 4 * f.count] = (_base_words(base, f) + diff).tobytes()
    products = [f for f in fixups if f.kind is FixupKind.PRODUCT]
    preds = [predict_fixup(skel, f) for f in products]
    for f, pred in zip(products, preds, strict=True):
        skel[f.target : f.target + 4 * f.count] = (_region(skel, f) + pred).tobytes()


def sub_reference(old_skel: bytes, fixups: list[Fixup]) -> bytes:
    """What SKELETON_SUB subtracts: the base skeleton, zero over fixup targets."""
    ref = bytearray(old_skel)
    for f in fixups:
        end = min(len(ref), f.target + 4 * f.count)
        if f.target < end:
            ref[f.target : end] = bytes(end - f.target)
    return bytes(ref)

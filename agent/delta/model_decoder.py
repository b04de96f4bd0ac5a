"""Decoding the model-aware method: table, skeleton, then tensors in file order."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from agent.delta.errors import CorruptPatchError
from agent.delta.format import DeltaHeader, Section, SectionRef
from agent.delta.limits import DeltaConfig
from agent.delta.skeleton import base_skeleton, restore, sub_reference
from agent.delta.streams import FrameReader, RawReader, decompress_bounded
from agent.delta.table import (
    Fixup,
    Layout,
    Predictor,
    TensorEntry,
    decode_table,
    scale_ratios,
    validate_entry,
    validate_fixups,
)
from agent.delta.tensor_codec import Workspace, chunks, inverse

Writer = Callable[[bytes | memoryview], object]


def _read_skeleton(
    handle: BinaryIO,
    ref: SectionRef,
    base: bytes,
    old_skel: bytes,
    *,
    length: int,
    fixups: list[Fixup],
    config: DeltaConfig,
) -> bytearray:
    """The whole target skeleton (it is needed for scale lookups before tensors)."""
    if ref.kind is Section.SKELETON_SUB:
        reference = sub_reference(old_skel, fixups)
        if len(reference) != length:
            raise CorruptPatchError("corrupt patch: skeleton diff length differs from the base")
        reader = FrameReader(handle, ref, config.max_window_log)
        skel = bytearray()
        if length:
            diff = np.frombuffer(reader.read_exact(length), dtype=np.uint8)
            skel = bytearray((np.frombuffer(reference, np.uint8) + diff).tobytes())
    else:
        reader = FrameReader(handle, ref, config.max_window_log, dictionary=old_skel)
        skel = bytearray(reader.read_exact(length)) if length else bytearray()
    reader.finish()
    restore(skel, fixups, base)
    return skel


def _resolve_ratios(entry: TensorEntry, base: bytes, skel: bytearray) -> None:
    if entry.predictor is not Predictor.RESCALE or entry.ratio_ref is None:
        return
    n = len(entry.ratios)
    old_off, new_off = entry.ratio_ref
    if old_off + 4 * n > len(base) or new_off + 4 * n > len(skel):
        raise CorruptPatchError("corrupt patch: scale reference outside its file")
    entry.ratios = scale_ratios(
        np.frombuffer(base, dtype="<f4", count=n, offset=old_off),
        np.frombuffer(skel, dtype="<f4", count=n, offset=new_off),
    )
    validate_entry(entry, len(base))


def decode_tflite(
    header: DeltaHeader,
    refs: list[SectionRef],
    handle: BinaryIO,
    base: bytes,
    write: Writer,
    *,
    config: DeltaConfig,
) -> None:
    raw_table = decompress_bounded(handle, refs[0], config.max_table_bytes, config.max_window_log)
    entries, fixups = decode_table(raw_table, len(base), header.target_length)
    skel_len = header.target_length - sum(e.length for e in entries)
    validate_fixups(fixups, skel_len, len(base))
    old_skel = base_skeleton(base, entries)
    skel = _read_skeleton(handle, refs[1], base, old_skel, length=skel_len, fixups=fixups,
                          config=config)
    for entry in entries:
        _resolve_ratios(entry, base, skel)
    residuals = FrameReader(handle, refs[2], config.max_window_log)
    coded = RawReader(handle, refs[3]) if len(refs) > 3 else None
    view = memoryview(skel)
    pos = 0  # in the target
    spos = 0  # in the skeleton
    ws = Workspace()
    for entry in entries:
        gap = entry.new_offset - pos
        write(view[spos : spos + gap])
        spos += gap
        size = entry.itemsize
        read = residuals.read_exact
        if entry.layout is Layout.ANS:
            if coded is None:
                raise CorruptPatchError("corrupt patch: ANS tensor in a version 1 patch")
            read = coded.read_exact
        for start, count in chunks(entry):
            old = np.frombuffer(base, dtype=entry.dtype, count=count,
                                offset=entry.old_offset + start * size)
            write(inverse(entry, old, read, start, ws).data.cast("B"))
        pos = entry.new_offset + entry.length
    write(view[spos:])
    residuals.finish()
    if coded is not None:
        coded.finish()

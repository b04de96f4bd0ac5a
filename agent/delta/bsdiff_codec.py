"""The bsdiff byte-level method: bsdiff4's matcher, zstd instead of bzip2.

The encoder borrows bsdiff4's suffix-array diff (server side only). The decoder is
a streaming bspatch of our own in numpy, so a device needs no bsdiff4.

Control stream: int64 LE triples (copy, extra, seek). For each triple the decoder
emits ``copy`` bytes of base[pos:] + diff (mod 256), then ``extra`` literal bytes,
then moves ``pos`` by ``copy + seek``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from agent.delta.errors import CorruptPatchError
from agent.delta.format import Section, SectionRef
from agent.delta.limits import DeltaConfig
from agent.delta.streams import FrameReader, compress, decompress_bounded, window_log_for

Writer = Callable[[bytes | memoryview], object]


def _decode_offtin(raw: bytes) -> npt.NDArray[np.int64]:
    """bsdiff's sign-magnitude int64 encoding -> plain int64."""
    words = np.frombuffer(raw, dtype="<u8")
    magnitude = (words & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)
    negative = (words >> np.uint64(63)).astype(bool)
    return np.where(negative, -magnitude, magnitude)


def encode_bsdiff(
    old: bytes, new: bytes, level: int, window_cap: int
) -> list[tuple[Section, bytes]] | None:
    """Sections of a bsdiff-method patch, or None when bsdiff4 is not installed."""
    try:
        import bsdiff4.core  # noqa: PLC0415 - optional, server side only
    except ImportError:  # pragma: no cover - depends on the install
        return None
    control_raw, diff, extra = bsdiff4.core.diff(old, new)
    control = _decode_offtin(control_raw).astype("<i8").reshape(-1, 3)
    # Columns apart: each is a smooth integer series that zstd codes better alone.
    columns = np.ascontiguousarray(control.T).tobytes()
    return [
        (Section.BSDIFF_CONTROL, compress(columns, level)),
        (Section.BSDIFF_DIFF, _stream(diff, level, window_cap)),
        (Section.BSDIFF_EXTRA, _stream(extra, level, window_cap)),
    ]


def _stream(data: bytes, level: int, window_cap: int) -> bytes:
    return compress(data, level, window_log=window_log_for(len(data), window_cap))


def _read_control(
    handle: BinaryIO, ref: SectionRef, limit: int, max_window_log: int
) -> npt.NDArray[np.int64]:
    raw = decompress_bounded(handle, ref, limit, max_window_log)
    if len(raw) % 24:
        raise CorruptPatchError("corrupt patch: bsdiff control stream is not whole triples")
    return np.frombuffer(raw, dtype="<i8").reshape(3, -1).T.astype(np.int64)


def decode_bsdiff(
    handle: BinaryIO,
    refs: list[SectionRef],
    old: bytes,
    write: Writer,
    *,
    target_length: int,
    config: DeltaConfig,
) -> None:
    """Stream the target through ``write``."""
    max_window_log, block = config.max_window_log, config.io_block_bytes
    control = _read_control(handle, refs[0], config.max_table_bytes, max_window_log)
    copies, extras = control[:, 0], control[:, 1]
    # Bound each value first so the sums below cannot overflow int64.
    in_range = bool(np.all((copies >= 0) & (copies <= target_length)
                           & (extras >= 0) & (extras <= target_length)))
    if not in_range or int(copies.sum()) + int(extras.sum()) != target_length:
        raise CorruptPatchError("corrupt patch: bsdiff control does not add up to the target")
    diff = FrameReader(handle, refs[1], max_window_log)
    extra = FrameReader(handle, refs[2], max_window_log)
    base = np.frombuffer(old, dtype=np.uint8)
    pos = 0
    for copy_len, extra_len, seek in control.tolist():
        if copy_len:
            if pos < 0 or pos + copy_len > len(base):
                raise CorruptPatchError("corrupt patch: bsdiff copy outside the base")
            done = 0
            while done < copy_len:
                n = min(block, copy_len - done)
                add = np.frombuffer(diff.read_exact(n), dtype=np.uint8)
                write((base[pos + done : pos + done + n] + add).tobytes())
                done += n
        left = extra_len
        while left:
            n = min(block, left)
            write(extra.read_exact(n))
            left -= n
        pos += copy_len + seek
    diff.finish()
    extra.finish()

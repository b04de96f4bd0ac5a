"""zstd framing shared by encoder and decoder: one frame per section.

The decoder reads each section through a bounded slice of the patch file, so a
corrupt or hostile frame can never make it read outside its section or produce
more bytes than the format says it should.
"""

from __future__ import annotations

import io
import math
from typing import Any, BinaryIO

import zstandard

from agent.delta.errors import CorruptPatchError
from agent.delta.format import SectionRef

# A raw-content dictionary shorter than this is not used (zstd ignores tiny ones).
MIN_DICT_BYTES = 8


def raw_dict(data: bytes) -> zstandard.ZstdCompressionDict | None:
    if len(data) < MIN_DICT_BYTES:
        return None
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def window_log_for(size: int, cap: int) -> int:
    return max(10, min(cap, math.ceil(math.log2(max(size, 1)))))


def compress(
    data: bytes,
    level: int,
    dictionary: bytes = b"",
    window_log: int | None = None,
    long_mode: bool = False,
) -> bytes:
    """One zstd frame with its content size; optional raw dictionary and window."""
    zdict = raw_dict(dictionary)
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(data),
        dict_size=len(dictionary),
        window_log=window_log or 0,
        enable_ldm=long_mode,
        write_content_size=True,
        write_checksum=False,
    )
    cctx = zstandard.ZstdCompressor(dict_data=zdict, compression_params=params)
    return cctx.compress(data)


def compress_blocks(
    pieces: list[bytes], level: int, min_block: int, window_cap: int, min_match: int = 0
) -> bytes:
    """One zstd frame that ends a block after each piece of at least ``min_block``.

    Every block chooses its own Huffman table, so pieces with different statistics
    (the context segments of packing.py) are each coded near their own entropy.
    """
    total = sum(map(len, pieces))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=total,
        window_log=window_log_for(total, window_cap),
        min_match=min_match,
        write_content_size=True,
        write_checksum=False,
    )
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj(size=total)
    out = []
    pending = 0
    for piece in pieces:
        out.append(cobj.compress(piece))
        pending += len(piece)
        if pending >= min_block:
            out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
            pending = 0
    out.append(cobj.flush())
    return b"".join(out)


class SliceReader(io.RawIOBase):
    """Reads ``length`` bytes of ``handle`` from ``offset``, then EOF."""

    def __init__(self, handle: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self._handle = handle
        self._pos = offset
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any, /) -> int:
        n = min(len(buffer), self._left)
        if n == 0:
            return 0
        self._handle.seek(self._pos)
        data = self._handle.read(n)
        got = len(data)
        buffer[:got] = data
        self._pos += got
        self._left -= got
        return got


class FrameReader:
    """Exact-size reads from one zstd frame held in a patch section."""

    def __init__(
        self, handle: BinaryIO, ref: SectionRef, max_window_log: int, dictionary: bytes = b""
    ) -> None:
        dctx = zstandard.ZstdDecompressor(
            dict_data=raw_dict(dictionary), max_window_size=1 << max_window_log
        )
        self._name = ref.kind.name
        self._reader = dctx.stream_reader(
            io.BufferedReader(SliceReader(handle, ref.offset, ref.length), 1 << 16),
            read_size=1 << 16,
            read_across_frames=True,
            closefd=False,
        )

    def read_exact(self, n: int) -> bytes:
        parts = []
        left = n
        try:
            while left:
                chunk = self._reader.read(left)
                if not chunk:
                    raise CorruptPatchError(f"corrupt patch: section {self._name} ends early")
                parts.append(chunk)
                left -= len(chunk)
        except zstandard.ZstdError as err:
            raise CorruptPatchError(f"corrupt patch: section {self._name}: {err}") from err
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> None:
        """Require the frame to hold nothing past what the decoder consumed."""
        try:
            extra = self._reader.read(1)
        except zstandard.ZstdError as err:
            raise CorruptPatchError(f"corrupt patch: section {self._name}: {err}") from err
        if extra:
            raise CorruptPatchError(f"corrupt patch: section {self._name} has stray data")


class RawReader:
    """Exact-size reads from a section stored as is (ANS streams), bounded to it."""

    def __init__(self, handle: BinaryIO, ref: SectionRef) -> None:
        self._name = ref.kind.name
        self._reader = io.BufferedReader(SliceReader(handle, ref.offset, ref.length), 1 << 16)

    def read_exact(self, n: int) -> bytes:
        data = self._reader.read(n) if n else b""
        if len(data) != n:
            raise CorruptPatchError(f"corrupt patch: section {self._name} ends early")
        return data

    def finish(self) -> None:
        if self._reader.read(1):
            raise CorruptPatchError(f"corrupt patch: section {self._name} has stray data")


def decompress_bounded(handle: BinaryIO, ref: SectionRef, limit: int, max_window_log: int) -> bytes:
    """A whole small section (tables, control streams), refusing more than ``limit``."""
    reader = FrameReader(handle, ref, max_window_log)
    parts: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = reader._reader.read(1 << 16)
        except zstandard.ZstdError as err:
            raise CorruptPatchError(f"corrupt patch: section {ref.kind.name}: {err}") from err
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > limit:
            raise CorruptPatchError(f"corrupt patch: section {ref.kind.name} is too large")
        parts.append(chunk)

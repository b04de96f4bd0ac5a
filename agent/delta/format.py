"""The EdgeFleet delta container: header, sections, trailer (docs/delta-format.md).

    header   magic "EFDL" | version u8 (1, or 2 when ANS-coded) | method u8 | target length u64 LE
             | base sha256 (32) | target sha256 (32)
    sections kind u8 | length uvarint | payload      (repeated)
    end      kind 0
    trailer  CRC-32 (u32 LE) of every byte before it

Pure byte handling only; the decoder does the file IO.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

from agent.delta.errors import CorruptPatchError, TruncatedPatchError

MAGIC = b"EFDL"
# Version 2 adds the RESIDUALS_ANS section and Layout.ANS; encoders write 1 whenever a
# patch uses neither, so agents that only read version 1 keep applying those.
VERSION = 2
VERSIONS = (1, 2)
HEADER = struct.Struct("<4sBBQ32s32s")
HEADER_SIZE = HEADER.size  # 78
TRAILER_SIZE = 4
# Tensors are coded in chunks of at most this many elements (slabs along axis 0 for
# spatially predicted tensors). Part of the format: it fixes the byte-plane layout.
CHUNK_ELEMS = 1 << 18


class Method(IntEnum):
    BYTES_ZSTD = 1
    BYTES_BSDIFF = 2
    TFLITE = 3


METHOD_NAMES = {Method.BYTES_ZSTD: "zstd", Method.BYTES_BSDIFF: "bsdiff", Method.TFLITE: "tflite"}


class Section(IntEnum):
    END = 0
    ZSTD_PATCH = 1  # zstd frame, dictionary = whole base file
    BSDIFF_CONTROL = 2  # zstd frame of int64 LE triples (copy, extra, seek)
    BSDIFF_DIFF = 3  # zstd frame of bytes added to the base
    BSDIFF_EXTRA = 4  # zstd frame of literal bytes
    TENSOR_TABLE = 5  # zstd frame of the tensor table (tensor_codec.py)
    SKELETON_DICT = 6  # zstd frame, dictionary = base skeleton
    SKELETON_SUB = 7  # zstd frame of (new skeleton - base skeleton) mod 256, equal lengths
    RESIDUALS = 8  # zstd frame of the tensor residual bytes, in table order
    RESIDUALS_ANS = 9  # version 2: raw ANS streams of Layout.ANS chunks, in table order


@dataclass(frozen=True)
class DeltaHeader:
    """The fixed header of a patch."""

    magic: bytes
    version: int
    method: str  # "zstd" | "bsdiff" | "tflite"
    base_sha256: str
    target_sha256: str
    target_length: int

    @property
    def mode(self) -> str:
        """``"tflite"`` for the model-aware method, ``"bytes"`` for the others."""
        return "tflite" if self.method == "tflite" else "bytes"


@dataclass(frozen=True)
class SectionRef:
    kind: Section
    offset: int  # of the payload, in the patch file
    length: int


def encode_header(
    method: Method, target_length: int, base_sha: bytes, target_sha: bytes, version: int = 1
) -> bytes:
    return HEADER.pack(MAGIC, version, int(method), target_length, base_sha, target_sha)


def decode_header(raw: bytes) -> DeltaHeader:
    """Parse the fixed header; raises CorruptPatchError/TruncatedPatchError."""
    if len(raw) < HEADER_SIZE:
        if MAGIC.startswith(raw[:4]) or raw[:4] == MAGIC:
            raise TruncatedPatchError(
                f"truncated patch: {len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header"
            )
        raise CorruptPatchError("not an EdgeFleet delta: bad magic")
    magic, version, method, length, base, target = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptPatchError("not an EdgeFleet delta: bad magic")
    if version not in VERSIONS:
        raise CorruptPatchError(
            f"unsupported delta format version {version} (this agent reads 1 to {VERSION})"
        )
    try:
        name = METHOD_NAMES[Method(method)]
    except ValueError as err:
        raise CorruptPatchError(f"corrupt patch: unknown method {method}") from err
    return DeltaHeader(magic, version, name, base.hex(), target.hex(), length)


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("uvarint must be >= 0")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def build_patch(header: bytes, sections: Iterable[tuple[Section, bytes]]) -> bytes:
    """Assemble header, sections, end marker and CRC trailer into one patch."""
    out = bytearray(header)
    for kind, payload in sections:
        out.append(int(kind))
        out += encode_uvarint(len(payload))
        out += payload
    out.append(Section.END)
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def _read_uvarint(handle: BinaryIO) -> int:
    value = 0
    for shift in range(0, 64, 7):
        raw = handle.read(1)
        if not raw:
            raise TruncatedPatchError("truncated patch: ends inside a section length")
        value |= (raw[0] & 0x7F) << shift
        if not raw[0] & 0x80:
            return value
    raise CorruptPatchError("corrupt patch: section length varint too long")


def scan_sections(handle: BinaryIO, file_size: int, block: int) -> list[SectionRef]:
    """Walk the section list after the header and check the CRC trailer.

    Distinguishes a truncated patch (ends before the end marker or trailer) from a
    corrupt one (bad kind, trailing bytes, CRC mismatch).
    """
    handle.seek(HEADER_SIZE)
    refs: list[SectionRef] = []
    while True:
        raw = handle.read(1)
        if not raw:
            raise TruncatedPatchError("truncated patch: ends before its end marker")
        try:
            kind = Section(raw[0])
        except ValueError as err:
            raise CorruptPatchError(f"corrupt patch: unknown section kind {raw[0]}") from err
        if kind is Section.END:
            break
        length = _read_uvarint(handle)
        offset = handle.tell()
        if offset + length > file_size:
            raise TruncatedPatchError(
                f"truncated patch: section {kind.name} needs {offset + length - file_size} "
                "more bytes"
            )
        refs.append(SectionRef(kind, offset, length))
        handle.seek(offset + length)
    body_end = handle.tell()
    remaining = file_size - body_end
    if remaining < TRAILER_SIZE:
        raise TruncatedPatchError("truncated patch: checksum trailer missing")
    if remaining > TRAILER_SIZE:
        raise CorruptPatchError(f"corrupt patch: {remaining - TRAILER_SIZE} stray bytes at the end")
    handle.seek(0)
    crc = 0
    left = body_end
    while left:
        chunk = handle.read(min(block, left))
        if not chunk:
            raise TruncatedPatchError("truncated patch: file shrank while reading")
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    (stored,) = struct.unpack("<I", handle.read(TRAILER_SIZE))
    if stored != crc:
        raise CorruptPatchError("corrupt patch: checksum mismatch")
    return refs


def expect_sections(refs: list[SectionRef], kinds: list[list[Section]]) -> list[SectionRef]:
    """Check the sections are exactly one of each allowed kind per slot, in order."""
    if len(refs) != len(kinds) or any(r.kind not in k for r, k in zip(refs, kinds, strict=True)):
        got = ", ".join(r.kind.name for r in refs) or "none"
        raise CorruptPatchError(f"corrupt patch: unexpected sections ({got})")
    return refs

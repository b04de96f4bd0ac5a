"""Streaming patch application: base + patch -> target, all or nothing.

Order of checks: header and section structure, patch CRC, base sha256 (before any
decoding), then decode straight into a temp file beside ``out`` while hashing, and
only when the target length and sha256 match is the temp file renamed over ``out``.
Memory stays near base + zstd window + one chunk, whatever the model size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from agent.common.atomic import fsync_dir
from agent.delta import ans
from agent.delta.bsdiff_codec import decode_bsdiff
from agent.delta.errors import (
    CorruptPatchError,
    DeltaInputError,
    UnsupportedPatchError,
    WrongBaseError,
)
from agent.delta.format import (
    HEADER_SIZE,
    DeltaHeader,
    Section,
    SectionRef,
    decode_header,
    expect_sections,
    scan_sections,
)
from agent.delta.limits import DEFAULT_CONFIG, DeltaConfig
from agent.delta.model_decoder import decode_tflite
from agent.delta.streams import FrameReader

log = logging.getLogger(__name__)

Writer = Callable[[bytes | memoryview], object]


@dataclass(frozen=True)
class ApplyInfo:
    mode: str  # "tflite" | "bytes"
    method: str  # "tflite" | "zstd" | "bsdiff"
    base_sha256: str
    target_sha256: str
    target_length: int
    patch_length: int
    seconds: float


class _HashingWriter:
    def __init__(self, sink: Writer, limit: int) -> None:
        self.sink = sink
        self.limit = limit
        self.written = 0
        self.sha = hashlib.sha256()

    def __call__(self, data: bytes | memoryview) -> None:
        self.written += len(data)
        if self.written > self.limit:
            raise CorruptPatchError("corrupt patch: decodes past the target length")
        self.sha.update(data)
        self.sink(data)


def read_header(patch: Path) -> DeltaHeader:
    """The fixed header of ``patch`` (cheap: reads 78 bytes, checks no CRC)."""
    try:
        with open(patch, "rb") as handle:
            return decode_header(handle.read(HEADER_SIZE))
    except OSError as err:
        raise DeltaInputError(f"cannot read patch {patch}: {err.strerror or err}") from err


def _read_base(old: Path) -> bytes:
    try:
        return Path(old).read_bytes()
    except OSError as err:
        raise DeltaInputError(f"cannot read base {old}: {err.strerror or err}") from err


def decode_stream(
    handle: BinaryIO, size: int, base: bytes, write: Writer, config: DeltaConfig = DEFAULT_CONFIG
) -> DeltaHeader:
    """Check ``handle`` (a patch of ``size`` bytes) and stream its target to ``write``.

    Raises before the first write when the patch is malformed or made for another
    base; raises after decoding when the target length or sha256 does not match.
    """
    handle.seek(0)
    header = decode_header(handle.read(HEADER_SIZE))
    if header.target_length > config.max_target_bytes:
        raise CorruptPatchError(
            f"corrupt patch: target of {header.target_length} bytes exceeds the limit"
        )
    refs = scan_sections(handle, size, config.io_block_bytes)
    if header.version >= 2 and not ans.available():
        raise UnsupportedPatchError(header.version, "the constriction package (ANS decoding)")
    actual = hashlib.sha256(base).hexdigest()
    if actual != header.base_sha256:
        raise WrongBaseError(header.base_sha256, actual)
    writer = _HashingWriter(write, header.target_length)
    try:
        _dispatch(header, refs, handle, base, writer, config=config)
    except (zstandard.ZstdError, ValueError, IndexError, OverflowError, MemoryError) as err:
        raise CorruptPatchError(f"corrupt patch: {err}") from err
    if writer.written != header.target_length:
        raise CorruptPatchError(
            f"corrupt patch: decoded {writer.written} bytes, expected {header.target_length}"
        )
    if writer.sha.hexdigest() != header.target_sha256:
        raise CorruptPatchError("corrupt patch: result does not match the target sha256")
    return header


def apply_bytes(old: bytes, patch: bytes, config: DeltaConfig = DEFAULT_CONFIG) -> bytes:
    """In-memory ``apply_delta`` (tests, the encoder's self-check)."""
    parts: list[bytes] = []
    decode_stream(io.BytesIO(patch), len(patch), old, lambda b: parts.append(bytes(b)), config)
    return b"".join(parts)


def apply_delta(
    old: Path, patch: Path, out: Path, config: DeltaConfig = DEFAULT_CONFIG
) -> ApplyInfo:
    """Rebuild the target from ``old`` and ``patch`` into ``out``, atomically.

    ``out`` appears only once the result matched the target length and sha256; on
    any failure no partial file is left behind.
    """
    started = time.perf_counter()
    out = Path(out)
    try:
        handle = open(patch, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as err:
        raise DeltaInputError(f"cannot read patch {patch}: {err.strerror or err}") from err
    try:
        size = os.fstat(handle.fileno()).st_size
        decode_header(handle.read(HEADER_SIZE))  # fail fast before reading the base
        base = _read_base(old)
        header = _decode_to(out, handle, size, base, config)
    finally:
        handle.close()
    seconds = time.perf_counter() - started
    log.info("applied %s patch %s -> %s (%d bytes) in %.3fs", header.method, patch, out,
             header.target_length, seconds)
    return ApplyInfo(header.mode, header.method, header.base_sha256, header.target_sha256,
                     header.target_length, size, seconds)


def _decode_to(
    out: Path, handle: BinaryIO, size: int, base: bytes, config: DeltaConfig
) -> DeltaHeader:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dest:
            header = decode_stream(handle, size, base, dest.write, config)
            dest.flush()
            os.fsync(dest.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return header


def _dispatch(
    header: DeltaHeader,
    refs: list[SectionRef],
    handle: BinaryIO,
    base: bytes,
    write: Writer,
    *,
    config: DeltaConfig,
) -> None:
    if header.method == "zstd":
        (ref,) = expect_sections(refs, [[Section.ZSTD_PATCH]])
        reader = FrameReader(handle, ref, config.max_window_log, dictionary=base)
        _copy_stream(reader, header.target_length, write, config.io_block_bytes)
        reader.finish()
    elif header.method == "bsdiff":
        expect_sections(refs, [[Section.BSDIFF_CONTROL], [Section.BSDIFF_DIFF],
                               [Section.BSDIFF_EXTRA]])
        decode_bsdiff(handle, refs, base, write, target_length=header.target_length,
                      config=config)
    else:
        slots = [[Section.TENSOR_TABLE], [Section.SKELETON_DICT, Section.SKELETON_SUB],
                 [Section.RESIDUALS]]
        expect_sections(refs, slots + ([[Section.RESIDUALS_ANS]] if header.version >= 2 else []))
        decode_tflite(header, refs, handle, base, write, config=config)


def _copy_stream(reader: FrameReader, length: int, write: Writer, block: int) -> None:
    left = length
    while left:
        n = min(block, left)
        write(reader.read_exact(n))
        left -= n

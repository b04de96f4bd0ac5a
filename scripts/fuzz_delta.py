#!/usr/bin/env python3
"""Fuzz the delta decoder with Hypothesis (outside CI: it runs for minutes).

    .venv/bin/python scripts/fuzz_delta.py [--minutes 5] [--out DIR]

Seeds are real patches of every method (the digits fixture release, mutated
models, byte-level patches). Each case mutates one: raw byte edits and cuts (the
CRC then refuses it), and edits *behind* the CRC, re-sealed so the decoder must
survive its deeper checks: header fields, section lengths, and the decompressed
tensor table, skeleton and residual streams re-compressed. The decoder must
either return the exact target or raise ``DeltaError``; anything else (another
exception, a hang past --case-seconds, memory past --max-rss-mb) is a finding,
written to --out with the base so it can be replayed.
"""

from __future__ import annotations

import argparse
import io
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np
import zstandard
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.delta import DeltaConfig, DeltaError, apply_bytes, make_patch_bytes
from agent.delta.format import HEADER_SIZE, TRAILER_SIZE, Section
from agent.delta.tflite import parse_constants

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


@dataclass(frozen=True)
class Seed:
    name: str
    base: bytes
    target: bytes
    patch: bytes


class CaseTimeoutError(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeoutError


def _rescaled(model: bytes) -> bytes:
    """Every quantized tensor re-quantized with scales moved up to 10% from unrounded
    values: RESCALE with fraction contexts (so sign folding) in the patch."""
    data = bytearray(model)
    rng = np.random.default_rng(1)
    for const in parse_constants(model) or []:
        if const.scales is None or const.dtype not in ("|i1", "<i4"):
            continue
        factor = rng.uniform(0.9, 1.1, len(const.scales))
        scales = (const.scales / factor).astype("<f4")
        data[const.scale_offset : const.scale_offset + scales.nbytes] = scales.tobytes()
        values = np.frombuffer(model, const.dtype, const.length // scales.itemsize
                               if const.dtype == "<i4" else const.length, const.offset)
        moved = np.moveaxis(values.reshape(const.shape).astype(np.float64), const.axis, -1)
        moved = np.rint((moved + rng.uniform(-0.5, 0.5, moved.shape)) * factor)
        info = np.iinfo(np.dtype(const.dtype))
        out = np.moveaxis(np.clip(moved, info.min, info.max), -1, const.axis)
        data[const.offset : const.offset + const.length] = out.astype(const.dtype).tobytes()
    return bytes(data)


def _seeds() -> list[Seed]:
    r1 = (FIXTURES / "digits_int8_r1.tflite").read_bytes()
    r2 = (FIXTURES / "digits_int8_r2.tflite").read_bytes()
    mobilenet = (FIXTURES / "mobilenetv2_int8.tflite").read_bytes()
    blob = bytes(range(256)) * 64
    edited = blob[:5000] + b"fuzz" * 50 + blob[5100:]
    out = []
    for name, base, target, config in [
        ("tflite-release", r1, r2, DeltaConfig()),
        ("zstd", blob, edited, DeltaConfig(methods=("zstd",))),
        ("bsdiff", blob, edited, DeltaConfig(methods=("bsdiff",))),
        ("tflite-small", r1, _rescaled(r1), DeltaConfig(methods=("tflite",))),
        ("tflite-rescaled", mobilenet, _rescaled(mobilenet), DeltaConfig(methods=("tflite",))),
        # Format version 1 (no ANS), as agents without constriction get it.
        ("tflite-v1", r1, _rescaled(r1), DeltaConfig(methods=("tflite",), ans=False)),
    ]:
        patch, info = make_patch_bytes(base, target, config)
        out.append(Seed(f"{name}/{info.method}", base, target, patch))
    return out


def _sections(patch: bytes) -> list[tuple[int, int, int]]:
    """(kind, payload offset, payload length) of a well-formed patch."""
    out = []
    pos = HEADER_SIZE
    while patch[pos] != Section.END:
        kind, pos = patch[pos], pos + 1
        length = shift = 0
        while True:
            byte, pos = patch[pos], pos + 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append((kind, pos, length))
        pos += length
    return out


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _rebuild(patch: bytes, replace: dict[int, bytes]) -> bytes:
    """The patch with some sections' payloads replaced, lengths and CRC redone."""
    out = bytearray(patch[:HEADER_SIZE])
    for i, (kind, offset, length) in enumerate(_sections(patch)):
        payload = replace.get(i, patch[offset : offset + length])
        out.append(kind)
        n = len(payload)
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                break
        out += payload
    out.append(Section.END)
    return _seal(bytes(out))


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value in edits:
        if not buf:
            break
        at = pos % len(buf)
        if op == 0:
            buf[at] = value
        elif op == 1:
            buf[at] ^= 1 << (value % 8)
        elif op == 2:
            del buf[at : at + 1 + value % 16]
        else:
            buf[at:at] = bytes([value]) * (1 + value % 8)
    return bytes(buf)


edits_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 30), st.integers(0, 255)),
                    min_size=1, max_size=6)


@st.composite
def cases(draw: st.DrawFn, seeds: list[Seed]) -> tuple[Seed, str, bytes]:
    s = draw(st.sampled_from(seeds))
    how = draw(st.sampled_from(["raw", "cut", "sealed", "section", "payload"]))
    patch = s.patch
    if how == "raw":
        return s, how, _mutate(patch, draw(edits_st))
    if how == "cut":
        return s, how, patch[: draw(st.integers(0, len(patch) - 1))]
    if how == "sealed":
        return s, how, _seal(_mutate(patch[:-TRAILER_SIZE], draw(edits_st)))
    sections = _sections(patch)
    index = draw(st.integers(0, len(sections) - 1))
    _, offset, length = sections[index]
    payload = patch[offset : offset + length]
    if how == "section":
        return s, how, _rebuild(patch, {index: _mutate(payload, draw(edits_st))})
    # "payload": edit the decompressed stream, then compress it again (same dictionary).
    kind = sections[index][0]
    # The skeleton needs the base skeleton as dictionary; ANS streams are stored raw.
    if kind in (Section.SKELETON_DICT, Section.RESIDUALS_ANS):
        return s, how, _rebuild(patch, {index: _mutate(payload, draw(edits_st))})
    zdict = None
    if kind == Section.ZSTD_PATCH:
        zdict = zstandard.ZstdCompressionDict(s.base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    reader = zstandard.ZstdDecompressor(dict_data=zdict).stream_reader(
        io.BytesIO(payload), read_across_frames=True)
    raw = reader.read()
    level = draw(st.sampled_from([1, 3]))
    cctx = zstandard.ZstdCompressor(level=level, dict_data=zdict)
    return s, how, _rebuild(patch, {index: cctx.compress(_mutate(raw, draw(edits_st)))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--case-seconds", type=int, default=10)
    parser.add_argument("--max-rss-mb", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "delta-fuzz")
    args = parser.parse_args(argv)
    seeds = _seeds()
    outcomes: Counter[str] = Counter()
    findings: list[str] = []
    signal.signal(signal.SIGALRM, _on_alarm)
    deadline = time.monotonic() + 60 * args.minutes

    def check(case: tuple[Seed, str, bytes]) -> None:
        s, how, patch = case
        signal.alarm(args.case_seconds)
        try:
            result = apply_bytes(s.base, patch)
            outcomes[f"{how}: decoded"] += 1
            if result != s.target:
                raise AssertionError("decoded to a different target without an error")
        except DeltaError as err:
            outcomes[f"{how}: {type(err).__name__}"] += 1
            if "\n" in str(err):
                raise AssertionError(f"multi-line message: {err!r}") from err
        finally:
            signal.alarm(0)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if rss_mb > args.max_rss_mb:
            raise AssertionError(f"peak RSS {rss_mb:.0f} MB")

    rounds = 0
    while time.monotonic() < deadline:
        test = settings(max_examples=300, deadline=None, database=None,
                        phases=[Phase.generate, Phase.shrink],
                        suppress_health_check=list(HealthCheck))(
            seed(rounds)(given(cases(seeds))(check)))
        try:
            test()
        except Exception as err:  # a finding: keep it and go on with the next seed
            args.out.mkdir(parents=True, exist_ok=True)
            report = args.out / f"finding-{rounds}.txt"
            report.write_text(f"{type(err).__name__}: {err}\n")
            findings.append(f"round {rounds}: {type(err).__name__}: {err}".splitlines()[0])
        rounds += 1
    total = sum(outcomes.values())
    print(f"{total} cases in {rounds} rounds over {args.minutes:g} min, {len(findings)} findings")
    for key, count in sorted(outcomes.items()):
        print(f"  {count:7d}  {key}")
    for finding in findings:
        print(f"FINDING {finding}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

"""The model-aware method: tensor residuals + skeleton, for two .tflite files.

Sections: the tensor table (entries and float fixups), the skeleton (the target
with every predicted tensor cut out, coded against the base skeleton), and the
residual stream (every entry's residual bytes, in target order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from agent.delta import ans
from agent.delta.ans_search import order0_bytes
from agent.delta.format import Section
from agent.delta.limits import DeltaConfig
from agent.delta.skeleton import (
    Rebase,
    base_skeleton,
    residualize,
    sub_reference,
    target_skeleton,
)
from agent.delta.streams import compress, compress_blocks, window_log_for
from agent.delta.table import Fixup, FixupKind, Layout, TensorEntry, encode_table
from agent.delta.tensor_codec import encode_tensor
from agent.delta.tensor_search import plan_tensor
from agent.delta.tflite import (
    ConstTensor,
    ScaleLink,
    match_constants,
    parse_constants,
    scale_links,
)

log = logging.getLogger(__name__)

Sections = list[tuple[Section, bytes]]


def _skeleton_section(
    old_skel: bytes, new_skel: bytes, fixups: list[Fixup], config: DeltaConfig
) -> tuple[Section, bytes]:
    """The smaller of: zstd with the base skeleton as dictionary; byte-wise difference."""
    window = window_log_for(len(new_skel), config.max_stream_window_log)
    best = (Section.SKELETON_DICT,
            compress(new_skel, config.zstd_level, dictionary=old_skel, window_log=window))
    if len(old_skel) == len(new_skel) and new_skel:
        reference = np.frombuffer(sub_reference(old_skel, fixups), np.uint8)
        diff = (np.frombuffer(new_skel, np.uint8) - reference).tobytes()
        sub = compress(diff, config.zstd_level, window_log=window)
        if len(sub) < len(best[1]):
            best = (Section.SKELETON_SUB, sub)
    return best


def _rebase_entries(
    entries: list[TensorEntry], residuals: list[list[bytes]], old: bytes, new: bytes,
    rebase: Rebase,
) -> None:
    """Turn absolute new-scale offsets into skeleton offsets; drop refs that cannot be."""
    for i, entry in enumerate(entries):
        if entry.ratio_ref is None:
            continue
        skel_off = rebase(entry.ratio_ref[1], 4 * len(entry.ratios))
        if skel_off is not None:
            entries[i] = replace(entry, ratio_ref=(entry.ratio_ref[0], skel_off))
            continue
        # Cannot happen for a well-formed file; fall back to a plain difference.
        log.warning("scale vector of tensor at %d overlaps a tensor", entry.new_offset)
        layout = Layout.PLAIN if entry.layout is Layout.ANS else entry.layout
        entries[i] = plain = replace(entry, predictor=type(entry.predictor).DIFF,
                                     ratio_ref=None, coeffs=None, layout=layout, models=())
        lo, hi = plain.old_offset, plain.old_offset + plain.length
        olds = np.frombuffer(old[lo:hi], plain.dtype)
        news = np.frombuffer(new[plain.new_offset : plain.new_offset + plain.length], plain.dtype)
        residuals[i] = encode_tensor(plain, olds, news)


def _fixups(
    links: list[ScaleLink], pairs: list[tuple[ConstTensor, ConstTensor]], rebase: Rebase
) -> list[Fixup]:
    """PRODUCT fixups for bias scales, DELTA32 for the other matched scale vectors."""
    fixups: list[Fixup] = []
    for link in links:
        spans = [(link.target, 4 * link.count), (link.a_offset, 4 * link.a_count),
                 (link.b_offset, 4)]
        mapped = [rebase(off, size) for off, size in spans]
        if any(m is None for m in mapped):
            continue
        t, a, b = (int(m) for m in mapped if m is not None)
        fixups.append(Fixup(FixupKind.PRODUCT, t, link.count, a, link.a_count, b))
    products = [f.target_range for f in fixups]

    def overlaps(off: int, size: int, ranges: list[tuple[int, int]]) -> bool:
        return any(off < t + n and t < off + size for t, n in ranges)

    # A PRODUCT source that is also a PRODUCT target would read a residual: drop those.
    fixups = [f for f in fixups if not any(overlaps(o, n, products) for o, n in f.sources())]
    taken = [f.target_range for f in fixups]
    for old, new in pairs:
        if old.scales is None or new.scales is None or len(old.scales) != len(new.scales):
            continue
        if old.scale_offset < 0 or new.scale_offset < 0:
            continue
        size = 4 * len(new.scales)
        target = rebase(new.scale_offset, size)
        if target is None or overlaps(target, size, taken):
            continue
        fixups.append(Fixup(FixupKind.DELTA32, target, len(new.scales), old.scale_offset,
                            len(new.scales)))
        taken.append((target, size))
    return fixups


def tensor_frame(pieces: list[bytes], config: DeltaConfig, level: int) -> bytes:
    """A tensor's residual pieces as one frame: the smaller of two match settings.

    Packed residuals are near-random bytes where zstd's short matches only cost
    bits; min_match 7 keeps it from taking them. Plain residuals prefer defaults.
    """
    cap = config.max_stream_window_log
    frames = [compress_blocks(pieces, level, config.min_block_bytes, cap, min_match=mm)
              for mm in (0, 7)]
    return min(frames, key=len)


def _residual_section(residuals: list[list[bytes]], config: DeltaConfig) -> bytes:
    """Consecutive zstd frames: one per tensor, small tensors pooled together."""
    frames: list[bytes] = []
    pool: list[bytes] = []
    pooled = 0
    for pieces in residuals:
        size = sum(map(len, pieces))
        if size >= config.frame_min_bytes:
            if pool:
                frames.append(tensor_frame(pool, config, config.zstd_level))
                pool, pooled = [], 0
            frames.append(tensor_frame(pieces, config, config.zstd_level))
        else:
            pool += pieces
            pooled += size
    if pool:
        frames.append(tensor_frame(pool, config, config.zstd_level))
    return b"".join(frames)


def _order0(entry: TensorEntry, old: bytes, new: bytes) -> float:
    olds = np.frombuffer(old, entry.dtype, entry.count, entry.old_offset)
    news = np.frombuffer(new, entry.dtype, entry.count, entry.new_offset)
    return order0_bytes(entry, olds, news)


def encode_tflite(
    old: bytes,
    new: bytes,
    config: DeltaConfig,
    tick: Callable[[int], None],
    stats: dict[str, float] | None = None,
) -> Sections | None:
    """Sections of a model-aware patch, or None when the method does not apply."""
    old_consts = parse_constants(old)
    new_consts = parse_constants(new) if old_consts is not None else None
    if old_consts is None or new_consts is None:
        return None
    pairs = match_constants(old_consts, new_consts)
    if not pairs:
        log.info("no constant tensors match between the two models")
        return None
    def probe(pieces: list[bytes]) -> int:
        # Small tensors are ranked at full effort: cheap, and level 3 misranks them.
        small = sum(map(len, pieces)) <= config.full_probe_bytes
        return len(tensor_frame(pieces, config, config.zstd_level if small else config.probe_level))

    use_ans = config.ans and ans.available()

    def quick_probe(pieces: list[bytes]) -> int:
        # Only a safety net next to ANS: one quick frame, not two at full effort.
        return len(compress_blocks(pieces, config.probe_level, config.min_block_bytes,
                                   config.max_stream_window_log))

    entries: list[TensorEntry] = []
    residuals: list[list[bytes]] = []
    for old_c, new_c in sorted(pairs, key=lambda p: p[1].offset):
        planned = plan_tensor(old_c, new_c, old, new, probe,
                              sorted_penalty=config.sorted_min_gain_bytes,
                              ans_probe=quick_probe if use_ans else None)
        tick(new_c.length)
        if planned is not None:
            entries.append(planned[0])
            residuals.append(planned[1])
    if not entries:
        return None
    rebase = Rebase(entries)
    _rebase_entries(entries, residuals, old, new, rebase)
    fixups = _fixups(scale_links(new), pairs, rebase)
    new_skel = bytearray(target_skeleton(new, entries))
    residualize(new_skel, fixups, old)
    is_ans = [e.layout is Layout.ANS for e in entries]
    sections = [
        (Section.TENSOR_TABLE, compress(encode_table(entries, fixups), config.zstd_level)),
        _skeleton_section(base_skeleton(old, entries), bytes(new_skel), fixups, config),
        (Section.RESIDUALS, _residual_section(
            [[] if a else r for a, r in zip(is_ans, residuals, strict=True)], config)),
    ]
    if any(is_ans):  # format version 2
        coded = b"".join(b"".join(r) for a, r in zip(is_ans, residuals, strict=True) if a)
        sections.append((Section.RESIDUALS_ANS, coded))
        if stats is not None and config.measure_bound:
            stats["ans_bytes"] = len(coded)
            stats["order0_bytes"] = sum(_order0(e, old, new) for e in entries
                                        if e.layout is Layout.ANS)
    return sections

"""Patch making: try every method that applies, keep the smallest that decodes.

Methods: ``tflite`` (model-aware, when both files parse as .tflite), ``zstd``
(the base as a raw zstd dictionary, like ``zstd --patch-from``) and ``bsdiff``
(bsdiff4's matcher with zstd streams). Each candidate is decoded again before it
can win, so a codec bug costs bytes, never a broken device.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.common.atomic import atomic_write
from agent.delta.bsdiff_codec import encode_bsdiff
from agent.delta.decoder import apply_bytes
from agent.delta.errors import DeltaError, DeltaInputError
from agent.delta.format import METHOD_NAMES, Method, Section, build_patch, encode_header
from agent.delta.limits import DEFAULT_CONFIG, DeltaConfig
from agent.delta.model_encoder import encode_tflite
from agent.delta.streams import compress, window_log_for

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Sections = list[tuple[Section, bytes]]

__all__ = ["DeltaInfo", "make_delta", "make_patch_bytes"]


@dataclass(frozen=True)
class DeltaInfo:
    """What ``make_delta`` chose and what every candidate measured."""

    mode: str  # "tflite" | "bytes"
    method: str  # "tflite" | "zstd" | "bsdiff"
    patch_size: int
    old_size: int
    new_size: int
    base_sha256: str
    target_sha256: str
    candidates: dict[str, int] = field(default_factory=dict)  # method -> patch bytes
    seconds: float = 0.0
    # The patch size if its ANS-coded residuals cost exactly their per-channel order-0
    # entropy with free models (None unless the chosen patch is ANS-coded).
    order0_bound: float | None = None


class _Ticker:
    """Turns per-method work into one monotonic (done, total) progress series."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = max(total, 1)
        self.done = 0

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.progress is not None:
            self.progress(self.done, self.total)


def _zstd_sections(old: bytes, new: bytes, config: DeltaConfig, best: int | None) -> Sections:
    """zstd with the base as dictionary, with and without long-distance matching.

    Full effort is ~1 MB/s with a big dictionary. A quick frame comes first; when
    the best patch so far is under ``zstd_skip_ratio`` of it, full effort cannot
    win (it saves ~25% on models, never half), so the quick frame is the candidate.
    """
    window = window_log_for(len(old) + len(new), config.max_window_log)
    quick = compress(new, config.probe_level, dictionary=old, window_log=window, long_mode=True)
    if best is not None and best < config.zstd_skip_ratio * len(quick):
        return [(Section.ZSTD_PATCH, quick)]
    plain = compress(new, config.zstd_level, dictionary=old, window_log=window)
    long_mode = compress(new, config.zstd_level, dictionary=old, window_log=window, long_mode=True)
    return [(Section.ZSTD_PATCH, min(plain, long_mode, quick, key=len))]


def make_patch_bytes(
    old: bytes,
    new: bytes,
    config: DeltaConfig = DEFAULT_CONFIG,
    progress: Progress | None = None,
) -> tuple[bytes, DeltaInfo]:
    """The smallest verified patch from ``old`` to ``new``, in memory."""
    started = time.perf_counter()
    base_sha = hashlib.sha256(old).digest()
    target_sha = hashlib.sha256(new).digest()
    plans: list[tuple[Method, Callable[[Callable[[int], None]], Sections | None]]] = []
    unknown = set(config.methods) - set(METHOD_NAMES.values())
    if unknown or not config.methods:
        raise ValueError(f"unknown or no delta methods: {sorted(unknown)}")
    if "tflite" in config.methods:
        plans.append((Method.TFLITE, lambda tick: encode_tflite(old, new, config, tick, stats)))
    if "zstd" in config.methods:
        plans.append((Method.BYTES_ZSTD, lambda tick: _zstd_sections(
            old, new, config, len(best[1]) if best is not None else None)))
    if "bsdiff" in config.methods and len(old) + len(new) <= config.bsdiff_max_bytes:
        plans.append((Method.BYTES_BSDIFF, lambda tick: encode_bsdiff(
            old, new, config.zstd_level, config.max_stream_window_log)))
    ticker = _Ticker(progress, len(new) * len(plans))
    stats: dict[str, float] = {}
    candidates: dict[str, int] = {}
    best: tuple[Method, bytes] | None = None
    for method, plan in plans:
        before = ticker.done
        name = METHOD_NAMES[method]
        try:
            sections = plan(ticker.advance)
        except Exception:  # one method's bug must not block a release; others remain
            log.exception("delta method %s failed; trying the others", name)
            sections = None
        ticker.advance(before + len(new) - ticker.done)
        if sections is None:
            continue
        version = 2 if any(kind is Section.RESIDUALS_ANS for kind, _ in sections) else 1
        header = encode_header(method, len(new), base_sha, target_sha, version)
        patch = build_patch(header, sections)
        if config.self_check and not _decodes(old, patch, new):
            log.error("delta method %s failed its self-check; dropped", name)
            continue
        candidates[name] = len(patch)
        if best is None or len(patch) < len(best[1]):
            best = (method, patch)
    if best is None:
        raise DeltaError("no delta method produced a valid patch")
    method, patch = best
    info = DeltaInfo(
        mode="tflite" if method is Method.TFLITE else "bytes",
        method=METHOD_NAMES[method],
        patch_size=len(patch),
        old_size=len(old),
        new_size=len(new),
        base_sha256=base_sha.hex(),
        target_sha256=target_sha.hex(),
        candidates=candidates,
        seconds=time.perf_counter() - started,
        order0_bound=(len(patch) - stats["ans_bytes"] + stats["order0_bytes"]
                      if method is Method.TFLITE and "ans_bytes" in stats else None),
    )
    return patch, info


def _decodes(old: bytes, patch: bytes, new: bytes) -> bool:
    try:
        return apply_bytes(old, patch) == new
    except DeltaError as err:
        log.error("self-check could not decode the candidate: %s", err)
        return False


def _read_input(path: Path, role: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DeltaInputError(f"cannot read {role} {path}: {err.strerror or err}") from err


def make_delta(
    old: Path,
    new: Path,
    out: Path,
    progress: Progress | None = None,
    config: DeltaConfig = DEFAULT_CONFIG,
) -> DeltaInfo:
    """Write the smallest verified patch from ``old`` to ``new`` into ``out`` atomically."""
    old_data = _read_input(Path(old), "base")
    new_data = _read_input(Path(new), "target")
    patch, info = make_patch_bytes(old_data, new_data, config, progress)
    atomic_write(Path(out), patch)
    log.info("delta %s -> %s: %s, %d bytes (new %d); candidates %s", old, new, info.method,
             info.patch_size, info.new_size, info.candidates)
    return info

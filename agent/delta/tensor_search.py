"""Encoder side: choose, per matched tensor, the prediction that codes smallest.

Predictors (difference, scale-ratio rescale, fitted rescale), each with and
without spatial prediction, are ranked by a zstd probe of their residual bytes
plus their table bytes; the best two are also tried context-sorted, with the
context layout picked by the packer's entropy estimate. Raw tensors stay in the
skeleton. The winner's pieces are coded again at full effort by the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from agent.delta.ans_search import plan_ans
from agent.delta.format import CHUNK_ELEMS
from agent.delta.packing import MAX_FRACS, MAX_MAGS
from agent.delta.table import (
    MAX_COEFF,
    MAX_KEY_SHIFT,
    MAX_SHIFT,
    Layout,
    Predictor,
    TensorEntry,
    encode_entry,
    fixed_ratios,
    sanitize_ratios,
    scale_ratios,
)
from agent.delta.tensor_codec import (
    AnyArray,
    encode_tensor,
    encode_tensor_estimate,
    predict,
    scaled_values,
    unsigned,
    wrap_signed,
)
from agent.delta.tflite import ConstTensor

log = logging.getLogger(__name__)

Probe = Callable[[list[bytes]], int]
# Elements used to fit the spatial predictor (the leading slabs of bigger tensors:
# sampling costs more than the fit, and slabs are alike).
FIT_SAMPLES = 1 << 18
# With ANS on, one-byte tensors up to this size are also ranked with every zstd layout.
SMALL_TENSOR_BYTES = 16 * 1024
# Context layouts tried for SORTED: (magnitude buckets, fraction bins).
CONTEXT_GRID = ((1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (2, 2), (4, 2), (8, 2), (16, 2),
                (4, 3), (8, 3))


def _base_entry(old: ConstTensor, new: ConstTensor) -> TensorEntry:
    return TensorEntry(new.offset, new.length, old.offset, new.dtype, new.shape)


def _rescale_entries(
    old: ConstTensor, new: ConstTensor, old_arr: AnyArray, new_arr: AnyArray
) -> list[TensorEntry]:
    """RESCALE candidates: the scale ratio, and a least-squares fit per channel.

    The scale ratio is referenced (``ratio_ref`` holds absolute offsets here; the
    model encoder rebases the new one into skeleton coordinates); the fit is stored
    in fixed point.
    """
    dt = np.dtype(new.dtype)
    if dt.kind not in "iu" or dt.itemsize > 4 or old.scales is None or new.scales is None:
        return []
    if old.zero_points is None or new.zero_points is None or old.axis != new.axis:
        return []
    n = len(new.scales)
    axis = new.axis if n > 1 else 0
    if len(old.scales) != n or axis >= len(new.shape) or n not in (1, new.shape[axis]):
        return []
    if len(old.zero_points) not in (1, n) or len(new.zero_points) not in (1, n):
        return []
    ratio = scale_ratios(old.scales, new.scales)
    base = replace(
        _base_entry(old, new), predictor=Predictor.RESCALE, axis=axis,
        zp_old=_collapse(old.zero_points), zp_new=_collapse(new.zero_points),
    )
    out = []
    unchanged = np.all(ratio == 1.0) and np.array_equal(base.zp_old, base.zp_new)
    if not unchanged and old.scale_offset >= 0 and new.scale_offset >= 0:
        out.append(replace(base, ratios=ratio, ratio_ref=(old.scale_offset, new.scale_offset)))
    fitted = _fit_ratio(base, old_arr, new_arr, ratio)
    if fitted is not None:
        out.append(fitted)
    return out


def _collapse(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return values[:1].copy() if np.all(values == values[0]) else values.copy()


def _fit_ratio(
    entry: TensorEntry, old_arr: AnyArray, new_arr: AnyArray, fallback: npt.NDArray[np.float64]
) -> TensorEntry | None:
    """Per-channel least-squares slope of (new - zp_new) on (old - zp_old), fixed point."""
    n = len(fallback)
    moved = np.moveaxis(np.arange(old_arr.size).reshape(entry.shape), entry.axis, 0)
    order = moved.reshape(n, -1)
    zpo = np.broadcast_to(entry.zp_old, (n,)).reshape(-1, 1)
    zpn = np.broadcast_to(entry.zp_new, (n,)).reshape(-1, 1)
    x = old_arr.astype(np.float64)[order] - zpo
    y = new_arr.astype(np.float64)[order] - zpn
    sxx = (x * x).sum(axis=1)
    sxy = (x * y).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = sanitize_ratios(np.where(sxx > 0, sxy / sxx, fallback))
    # Resolution: the prediction of the largest |x| moves by at most 1/512.
    span = float(np.abs(x).max()) if x.size else 1.0
    shift = int(min(MAX_SHIFT - 2, max(0, np.ceil(np.log2(span + 1)) + 9)))
    m = np.rint(fit * 2.0**shift)
    if np.any(np.abs(m) >= 2.0**52):
        return None
    m_int = m.astype(np.int64)
    return replace(entry, ratio_m=m_int, ratio_shift=shift, ratios=fixed_ratios(m_int, shift))


def _residual(entry: TensorEntry, old_arr: AnyArray, new_arr: AnyArray) -> npt.NDArray[np.int64]:
    r_u = new_arr.view(unsigned(entry.dtype)) - predict(entry, old_arr, 0)
    return wrap_signed(r_u.astype(np.int64), 8 * entry.itemsize)


def _fit_spatial(entry: TensorEntry, r: npt.NDArray[np.int64]) -> tuple[int, int, int] | None:
    """Least-squares (left, up, up-left) weights, in 64ths, for the residual field."""
    rows = max(1, FIT_SAMPLES // math.prod(entry.shape[1:]))
    field = r.reshape(entry.shape)[:rows].astype(np.float64)
    left = np.zeros_like(field)
    up = np.zeros_like(field)
    upleft = np.zeros_like(field)
    left[:, :, 1:] = field[:, :, :-1]
    up[:, 1:] = field[:, :-1]
    upleft[:, 1:, 1:] = field[:, :-1, :-1]
    feats = np.stack([left.ravel(), up.ravel(), upleft.ravel()], axis=1)
    target = field.ravel()
    if not np.any(feats):
        return None
    coef, *_ = np.linalg.lstsq(feats, target, rcond=None)
    q = np.clip(np.rint(coef * 64), -MAX_COEFF, MAX_COEFF).astype(int)
    if not np.any(q):
        return None
    return int(q[0]), int(q[1]), int(q[2])


def _score(
    entry: TensorEntry, old_arr: AnyArray, new_arr: AnyArray, probe: Probe
) -> tuple[int, TensorEntry, list[bytes]]:
    data = encode_tensor(entry, old_arr, new_arr)
    return probe(data) + len(encode_entry(entry, entry.new_offset)), entry, data


def _key_shift(entry: TensorEntry, old_arr: AnyArray, mags: int) -> int:
    """Shift that spreads the prediction magnitudes over ``mags`` buckets."""
    peak = int(np.abs(np.rint(scaled_values(entry, old_arr, 0))).max(initial=0))
    return max(0, min(MAX_KEY_SHIFT, peak.bit_length() - (mags - 1).bit_length()))


def _best_sorted(
    entry: TensorEntry, old_arr: AnyArray, new_arr: AnyArray
) -> TensorEntry:
    """The context layout with the smallest packer estimate (no zstd runs)."""
    best: tuple[float, TensorEntry] | None = None
    for mags, fracs in CONTEXT_GRID:
        if fracs > 1 and entry.predictor is not Predictor.RESCALE:
            continue
        assert mags <= MAX_MAGS and fracs <= MAX_FRACS
        candidate = replace(entry, layout=Layout.SORTED, key_mags=mags, key_fracs=fracs,
                            key_shift=_key_shift(entry, old_arr, mags))
        estimate, _ = encode_tensor_estimate(candidate, old_arr, new_arr)
        if estimate is not None and (best is None or estimate < best[0]):
            best = (estimate, candidate)
    assert best is not None
    return best[1]


def plan_tensor(
    old: ConstTensor,
    new: ConstTensor,
    old_data: bytes,
    new_data: bytes,
    probe: Probe,
    *,
    sorted_penalty: int = 0,
    ans_probe: Probe | None = None,
) -> tuple[TensorEntry, list[bytes]] | None:
    """The best entry and its residual bytes, or None to leave the tensor raw.

    Raw tensors stay in the skeleton, where zstd can still find them in the base.
    With ``ans_probe``, one-byte integer tensors are ANS-coded, and zstd (plain
    residuals, raw tensor) is only ranked with that quicker probe.
    """
    old_raw = old_data[old.offset : old.offset + old.length]
    new_raw = new_data[new.offset : new.offset + new.length]
    base = _base_entry(old, new)
    if old_raw == new_raw:
        return None  # in the skeleton it costs one long zstd match against the base
    old_arr = np.frombuffer(old_raw, dtype=new.dtype)
    new_arr = np.frombuffer(new_raw, dtype=new.dtype)
    preds = [base, *_rescale_entries(old, new, old_arr, new_arr)]
    dt = np.dtype(new.dtype)
    spatial_ok = (
        len(new.shape) == 4
        and new.shape[1] * new.shape[2] > 1
        and math.prod(new.shape[1:]) <= CHUNK_ELEMS
        and dt.kind in "iu"
        and dt.itemsize <= 4
    )
    candidates: list[TensorEntry] = []
    for entry in preds:
        candidates.append(entry)
        if spatial_ok:
            coeffs = _fit_spatial(entry, _residual(entry, old_arr, new_arr))
            if coeffs is not None:
                candidates.append(replace(entry, coeffs=coeffs))
    if dt.itemsize > 1:
        candidates += [replace(c, layout=Layout.PLANES) for c in candidates]
    if ans_probe is not None and dt.itemsize == 1 and dt.kind in "iu":
        small = new.length <= SMALL_TENSOR_BYTES
        full_probe, probe = probe, ans_probe
        # ANS codes one-byte residuals near their context entropy: no zstd ranking
        # or context sorting; plain zstd of the ANS winner's prediction stays a
        # candidate for residuals with long repeats.
        coded = plan_ans(candidates, old_arr, new_arr)
        plain = replace(coded[1], layout=Layout.PLAIN, models=(), key_shift=0, key_mags=1,
                        key_fracs=1)
        scored = [coded, _score(plain, old_arr, new_arr, probe)]
        if small:  # zstd layouts are cheap to rank here, and a table entry costs more
            scored += _rank(candidates, old_arr, new_arr, full_probe, sorted_penalty)
    else:
        scored = _rank(candidates, old_arr, new_arr, probe, sorted_penalty)
    best = min(scored, key=lambda t: t[0])
    raw_cost = probe([new_raw]) if new.length > 8 else new.length
    log.debug("tensor %s: %s/%s %d bytes, raw %d", new.key[0], best[1].predictor.name,
              best[1].layout.name, best[0], raw_cost)
    if raw_cost <= best[0]:
        return None
    return best[1], best[2]


def _rank(
    candidates: list[TensorEntry], old_arr: AnyArray, new_arr: AnyArray, probe: Probe,
    sorted_penalty: int,
) -> list[tuple[int, TensorEntry, list[bytes]]]:
    """zstd-probed candidates, and the two best also context-sorted."""
    scored = sorted(
        (_score(c, old_arr, new_arr, probe) for c in candidates), key=lambda t: t[0]
    )
    dt = np.dtype(candidates[0].dtype)
    if dt.kind in "iu" and dt.itemsize <= 4:
        # Context sorting is costlier to try: only on the two best predictions.
        for _, entry, _ in scored[:2]:
            sorted_entry = _best_sorted(replace(entry, layout=Layout.PLAIN), old_arr, new_arr)
            cost, chosen, pieces = _score(sorted_entry, old_arr, new_arr, probe)
            scored.append((cost + sorted_penalty, chosen, pieces))
    return scored

"""Encoder side of the ANS layout: pick the prediction and context layout, fit models.

Predictions are ranked by the fitted-model cost of one context layout; the best is
then tried with every layout of the grid. Costs are estimates from histograms
(cross-entropy under the quantized models plus model bytes): no coder runs until
the winner is encoded.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from agent.delta import ans
from agent.delta.packing import Contexts, context_keys
from agent.delta.table import MAX_KEY_SHIFT, Layout, Predictor, TensorEntry, encode_entry
from agent.delta.tensor_codec import (
    AnyArray,
    FloatArray,
    chunk_features,
    encode_tensor,
    flipped,
    predict,
    unsigned,
    wrap_signed,
)

Features = list[tuple[FloatArray, FloatArray, npt.NDArray[np.int8]]]
# Context layouts (magnitude buckets, fraction bins) tried for the winning prediction.
GRID = (
    (1, 1),
    (2, 1),
    (4, 1),
    (8, 1),
    (16, 1),
    (2, 2),
    (4, 2),
    (8, 2),
    (16, 2),
    (4, 3),
    (8, 3),
    (16, 3),
)
# The layout predictions are ranked with.
RANK_LAYOUT = {False: (8, 1), True: (8, 2)}  # by "is a rescale"
# Layouts are compared on the leading chunks holding about this many elements; the
# winner's models are then fitted on the whole tensor.
GRID_SAMPLE_ELEMS = 1 << 20


def order0_bytes(entry: TensorEntry, old_arr: AnyArray, new_arr: AnyArray) -> float:
    """Per-channel order-0 entropy of a one-byte tensor's residuals, in bytes.

    Channels run along the quantization axis (axis 0 for plain differences); the
    residual is the entry's prediction error, before any spatial step: what a coder
    with free, exact per-channel histograms would spend (the bench's yardstick).
    """
    r_u = new_arr.view(unsigned(entry.dtype)) - predict(entry, old_arr, 0)
    r = wrap_signed(r_u.astype(np.int64), 8).reshape(entry.shape)
    per_channel = np.moveaxis(r, entry.axis, 0).reshape(entry.shape[entry.axis], -1)
    n_ch, width = per_channel.shape
    flat = np.arange(n_ch, dtype=np.int64)[:, None] * 256 + (per_channel + 128)
    counts = np.bincount(flat.reshape(-1), minlength=n_ch * 256).reshape(n_ch, 256)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -np.where(counts > 0, counts * np.log2(counts / width), 0.0).sum()
    return float(bits / 8)


def _key_shift(peak: int, mags: int) -> int:
    """Shift that spreads prediction magnitudes up to ``peak`` over ``mags`` buckets."""
    return max(0, min(MAX_KEY_SHIFT, peak.bit_length() - (mags - 1).bit_length()))


def _fit(entry: TensorEntry, feats: Features, mags: int, fracs: int) -> tuple[float, TensorEntry]:
    peak = max((int(np.abs(r).max(initial=0)) for _, r, _ in feats), default=0)
    ctx = Contexts(_key_shift(peak, mags), mags, fracs)
    hist = np.zeros((ctx.count, 256), np.int64)
    for scaled, rounded, e in feats:
        keys, flip = context_keys(scaled, rounded, ctx)
        hist += ans.histogram(keys, flipped(e, flip), ctx.count)
    cost, models = ans.fit_models(hist)
    chosen = replace(
        entry,
        layout=Layout.ANS,
        key_shift=ctx.shift,
        key_mags=mags,
        key_fracs=fracs,
        models=tuple(models),
    )
    return cost + len(encode_entry(chosen, chosen.new_offset)), chosen


def _leading(feats: Features, elems: int) -> int:
    """How many leading chunks hold at least ``elems`` elements (at least one)."""
    total = 0
    for i, (_, _, e) in enumerate(feats):
        total += e.size
        if total >= elems:
            return i + 1
    return len(feats)


def _layouts(entry: TensorEntry) -> list[tuple[int, int]]:
    rescale = entry.predictor is Predictor.RESCALE
    return [(m, f) for m, f in GRID if f == 1 or rescale]


def plan_ans(
    candidates: list[TensorEntry], old_arr: AnyArray, new_arr: AnyArray
) -> tuple[int, TensorEntry, list[bytes]]:
    """(coded bytes incl. table entry, entry, pieces) of the best ANS-coded candidate."""
    ranked = []
    for entry in candidates:
        feats = list(chunk_features(entry, old_arr, new_arr))
        mags, fracs = RANK_LAYOUT[entry.predictor is Predictor.RESCALE]
        ranked.append((_fit(entry, feats, mags, fracs)[0], entry, feats))
    _, best, feats = min(ranked, key=lambda t: t[0])
    del ranked
    sample = feats[: _leading(feats, GRID_SAMPLE_ELEMS)]
    _, chosen = min((_fit(best, sample, m, f) for m, f in _layouts(best)), key=lambda t: t[0])
    if len(sample) < len(feats):
        _, chosen = _fit(best, feats, chosen.key_mags, chosen.key_fracs)
    data = encode_tensor(chosen, old_arr, new_arr)
    return sum(map(len, data)) + len(encode_entry(chosen, chosen.new_offset)), chosen, data

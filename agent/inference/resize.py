"""Pure-numpy image resizing, bit-exact with OpenCV where OpenCV itself is exact.

A camera has no OpenCV or Pillow to lean on, but models are trained on
OpenCV-resized pixels, so each method reproduces ``cv2.resize`` on uint8:

- ``bilinear``: INTER_LINEAR_EXACT, bit for bit: half-pixel centres, edge
  pixels replicated, 8-bit fixed-point weights, one rounding at the end. It
  differs from plain INTER_LINEAR by at most one grey level (that one truncates
  in its SIMD path, so even OpenCV's result depends on the CPU);
- ``area``: INTER_AREA. Shrinking both sides it is bit-exact: the integer box
  average for whole factors, else OpenCV's float32 area weights accumulated in
  its order. Otherwise OpenCV runs a linear variant with area weights, matched
  here within one grey level (it has no exact mode);
- ``nearest``: INTER_NEAREST, ``src = floor(dst * in / out)``, bit for bit;
- ``letterbox``: scale by ``min(H/h, W/w)`` keeping the aspect ratio
  (bilinear as above), centred, the rest filled with the pad value.

Every method is separable: each output row (column) is a weighted sum of at
most K source rows (columns). A ``Resampler`` is built once per (source size,
crop) and owns its index and weight tables and scratch buffers, so a camera
stream pays for them once. Channel reordering (RGB to BGR) is folded into the
column gather for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FIXED_BITS = 8  # INTER_LINEAR_EXACT's ufixedpoint16 weights for uint8
FIXED_ONE = 1 << FIXED_BITS
_EPS = 2.220446049250313e-16  # DBL_EPSILON: OpenCV's test for whole scale factors

IntArray = npt.NDArray[np.intp]
Uint8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Taps:
    """One axis: output i = sum_k weight[k, i] * source[index[k, i]]."""

    index: IntArray  # (K, n_out)
    weight: npt.NDArray[Any]  # (K, n_out): int32 fixed point, or float32 area weights


def _scale(n_in: int, n_out: int) -> tuple[float, float]:
    """(source/destination, destination/source) computed as OpenCV does, to the last bit."""
    inverse = n_out / n_in
    return 1.0 / inverse, inverse


def _two_taps(n_in: int, pos: npt.NDArray[np.float64]) -> Taps:
    """Linear taps at source positions ``pos``; outside the image, the edge pixel."""
    low = np.floor(pos)
    inside = (low >= 0) & (low < n_in - 1)
    frac = np.where(inside, pos - low, 0.0)
    first = np.clip(low, 0, n_in - 1).astype(np.intp)
    second = np.minimum(first + 1, n_in - 1)
    upper = np.rint(frac * FIXED_ONE).astype(np.int32)
    return Taps(np.stack([first, second]), np.stack([FIXED_ONE - upper, upper]))


def bilinear_taps(n_in: int, n_out: int) -> Taps:
    scale, _ = _scale(n_in, n_out)
    return _two_taps(n_in, scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5)


def area_linear_taps(n_in: int, n_out: int) -> Taps:
    """INTER_AREA when not shrinking both sides: linear with OpenCV's area coefficients."""
    scale, inverse = _scale(n_in, n_out)
    dx = np.arange(n_out, dtype=np.float64)
    sx = np.floor(dx * scale)
    fx = (dx + 1) - (sx + 1) * inverse
    fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
    return _two_taps(n_in, sx + fx)


def nearest_taps(n_in: int, n_out: int) -> Taps:
    scale, _ = _scale(n_in, n_out)
    index = np.minimum(np.floor(np.arange(n_out) * scale), n_in - 1).astype(np.intp)
    return Taps(index[np.newaxis], np.ones((1, n_out), np.int32))


def area_taps(n_in: int, n_out: int) -> Taps:
    """OpenCV's computeResizeAreaTab: overlap / cell width, as float32, in source order."""
    scale, _ = _scale(n_in, n_out)
    cells: list[list[tuple[int, float]]] = []
    for dx in range(n_out):
        start = dx * scale
        stop = start + scale
        width = min(scale, n_in - start)
        first, last = math.ceil(start), min(math.floor(stop), n_in - 1)
        first = min(first, last)
        taps = []
        if first - start > 1e-3:
            taps.append((first - 1, (first - start) / width))
        taps += [(sx, 1.0 / width) for sx in range(first, last)]
        if stop - last > 1e-3:
            taps.append((last, min(stop - last, 1.0, width) / width))
        cells.append(taps)
    k = max(len(t) for t in cells)
    index = np.zeros((k, n_out), np.intp)
    weight = np.zeros((k, n_out), np.float32)  # padding taps weigh 0 and add exactly 0
    for dx, taps in enumerate(cells):
        for i, (sx, alpha) in enumerate(taps):
            index[i, dx], weight[i, dx] = sx, alpha
        index[len(taps) :, dx] = taps[-1][0]
    return Taps(index, weight)


def box_taps(n_out: int, factor: int) -> Taps:
    """Whole-factor area: ``factor`` source pixels per output, weight 1 each."""
    index = np.arange(n_out)[np.newaxis] * factor + np.arange(factor)[:, np.newaxis]
    return Taps(index.astype(np.intp), np.ones((factor, n_out), np.int32))


def letterbox_size(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[int, int]:
    """The scaled image's (height, width) inside a ``dst`` letterbox, at least 1 pixel."""
    scale = min(dst_h / src_h, dst_w / src_w)
    return (
        max(1, min(dst_h, math.floor(src_h * scale + 0.5))),
        max(1, min(dst_w, math.floor(src_w * scale + 0.5))),
    )


def crop_box(src_h: int, src_w: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the central ``fraction`` of each side."""
    height = max(1, min(src_h, math.floor(src_h * fraction + 0.5)))
    width = max(1, min(src_w, math.floor(src_w * fraction + 0.5)))
    return (src_h - height) // 2, (src_w - width) // 2, height, width


def _plan(method: str, src: tuple[int, int], dst: tuple[int, int]) -> tuple[str, Taps, Taps]:
    """(mode, row taps, column taps) for one source size; mode picks the arithmetic."""
    (sh, sw), (dh, dw) = src, dst
    if method == "nearest":
        return "gather", nearest_taps(sh, dh), nearest_taps(sw, dw)
    if method == "area" and sh >= dh and sw >= dw:
        fy, fx = _scale(sh, dh)[0], _scale(sw, dw)[0]
        iy, ix = round(fy), round(fx)
        if abs(fy - iy) < _EPS and abs(fx - ix) < _EPS:
            return "box", box_taps(dh, iy), box_taps(dw, ix)
        return "float", area_taps(sh, dh), area_taps(sw, dw)
    if method == "area":
        return "fixed", area_linear_taps(sh, dh), area_linear_taps(sw, dw)
    return "fixed", bilinear_taps(sh, dh), bilinear_taps(sw, dw)


class Resampler:
    """Resizes frames of one source size to the model's size, reusing its tables and buffers.

    ``__call__`` returns an internal buffer, overwritten by the next call: the
    caller consumes it (the value tables do) before asking again.
    """

    def __init__(
        self,
        src_shape: tuple[int, int, int],
        dst_hw: tuple[int, int],
        method: str,
        *,
        crop: float = 1.0,
        order: tuple[int, ...] = (0, 1, 2),
        pad: int = 0,
    ) -> None:
        src_h, src_w, channels = src_shape
        top, left, crop_h, crop_w = crop_box(src_h, src_w, crop)
        dst_h, dst_w = dst_hw
        self.out = np.full((dst_h, dst_w, len(order)), pad, np.uint8)
        inner = (dst_h, dst_w)
        if method == "letterbox":
            inner = letterbox_size(crop_h, crop_w, dst_h, dst_w)
            y0, x0 = (dst_h - inner[0]) // 2, (dst_w - inner[1]) // 2
            self._target = self.out[y0 : y0 + inner[0], x0 : x0 + inner[1]]
            method = "bilinear"
        else:
            self._target = self.out
        self.mode, rows, cols = _plan(method, (crop_h, crop_w), inner)
        self._box_area = rows.index.shape[0] * cols.index.shape[0]
        # Only the source rows some output row reads are touched; the crop is an offset.
        self._rows_needed = np.unique(rows.index) + top
        self._rows = Taps(np.searchsorted(self._rows_needed, rows.index + top), rows.weight)
        perm = np.asarray(order, np.intp)  # columns gather elements of (rows, W*C) views
        elem = (cols.index[:, :, np.newaxis] + left) * channels + perm
        self._cols = Taps(elem.reshape(cols.index.shape[0], -1),
                          np.repeat(cols.weight, len(order), axis=1))  # fmt: skip
        # Integer sums are exact in any order, so they take the cheaper one; the float area
        # path adds columns first, as OpenCV does, to round as it rounds.
        k_rows, k_cols = rows.index.shape[0], cols.index.shape[0]
        self._columns_first = self.mode == "float" or (
            len(self._rows_needed) * inner[1] * k_cols <= inner[0] * crop_w * k_rows
        )
        self._bufs: dict[str, npt.NDArray[Any]] = {}

    def _buf(self, name: str, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._bufs[name] = np.empty(shape, dtype)
        return buf

    def __call__(self, frame: Uint8Array) -> Uint8Array:
        src = frame.reshape(frame.shape[0], -1)  # (H, W*C): a view of a contiguous frame
        band = self._buf("band", (len(self._rows_needed), src.shape[1]), np.uint8)
        np.take(src, self._rows_needed, axis=0, out=band)
        target = self._target
        if self.mode == "gather":
            rows = self._buf("rows", (target.shape[0], src.shape[1]), np.uint8)
            np.take(band, self._rows.index[0], axis=0, out=rows)
            # Nearest is never letterboxed, so the target is the whole (contiguous) output.
            np.take(rows, self._cols.index[0], axis=1, out=self.out.reshape(len(rows), -1))
            return self.out
        if self._columns_first:
            wide = np.float32 if self.mode == "float" else np.int32
            mid = self._pass(band, self._cols, axis=1, name="mid", dtype=wide)
            acc = self._pass(mid, self._rows, axis=0, name="acc", dtype=np.dtype(wide))
        else:
            mid = self._pass(band, self._rows, axis=0, name="mid", dtype=np.int32)
            acc = self._pass(mid, self._cols, axis=1, name="acc", dtype=np.int32)
        shaped = acc.reshape(target.shape)
        if self.mode == "float":
            np.rint(acc, out=acc)
            np.clip(acc, 0, 255, out=acc)
        elif self.mode == "fixed":
            acc += 1 << (2 * FIXED_BITS - 1)
            acc >>= 2 * FIXED_BITS
        elif self._box_area == 4:  # OpenCV's SIMD 2x2 average rounds half up
            acc += 2
            acc >>= 2
        else:
            total = acc.astype(np.float32) * np.float32(1.0 / self._box_area)
            shaped = np.rint(total).reshape(target.shape)
        np.copyto(target, shaped, casting="unsafe")
        return self.out

    def _pass(
        self, src: npt.NDArray[Any], taps: Taps, *, axis: int, name: str, dtype: Any
    ) -> npt.NDArray[Any]:
        """Weighted sum of K gathers along ``axis``, tap by tap, in ``dtype``."""
        n = taps.index.shape[1]
        shape = (n, src.shape[1]) if axis == 0 else (src.shape[0], n)
        acc = self._buf(name, shape, dtype)
        gathered = self._buf(name + "-g", shape, src.dtype)
        term = self._buf(name + "-t", shape, dtype)
        for k in range(taps.index.shape[0]):
            np.take(src, taps.index[k], axis=axis, out=gathered)
            weight = taps.weight[k][:, np.newaxis] if axis == 0 else taps.weight[k]
            if k == 0:
                np.multiply(gathered, weight, out=acc, dtype=dtype)
            else:
                np.multiply(gathered, weight, out=term, dtype=dtype)
                acc += term
        return acc

"""Camera frame to input tensor, by the release's signed input contract.

One code path for the daemon, golden-set scoring on the device and on the
server, and publish-time validation, so the pixels a model is judged on are
the pixels it sees in the field. The steps, in order:

1. crop: the central ``crop`` fraction of each side (folded into the resize tables);
2. resize to the model's size (``agent.inference.resize``, OpenCV's semantics);
3. colour order: frames are RGB; a BGR model gets its channels swapped (folded
   into the resize's column gather);
4. grey models: BT.601 luma, ``(4899 R + 9617 G + 1868 B + 2**13) >> 14`` as OpenCV;
5. value mapping and quantization, fused into 256-entry tables
   (``agent.inference.value_tables``): uint8 in, tensor dtype out, no float frame.

A ``Preprocessor`` is built once per (contract, input tensor) and keeps the
resize tables of the last few source sizes, so a camera stream pays for them
once. It is not thread-safe: each inference thread owns one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import FrameSourceError, ModelError
from agent.inference.resize import Resampler, crop_box
from agent.inference.runtime import TensorDetails
from agent.inference.value_tables import ValueTable, value_table
from agent.protocol.input_contract import InputContract, legacy_contract

log = logging.getLogger(__name__)

MAX_SOURCE_SIZES = 4  # resize tables kept per preprocessor (one per camera size seen)
_LUMA = (4899, 9617, 1868)  # BT.601, 14-bit fixed point, as cv2.COLOR_RGB2GRAY
_LUMA_SHIFT = 14

Array = npt.NDArray[Any]


class Preprocessor:
    """Maps uint8 RGB frames (H, W, 3) of any size to the input tensor (1, h, w, c)."""

    def __init__(self, contract: InputContract, tensor: TensorDetails) -> None:
        want = (1, contract.height, contract.width, contract.channels)
        if tuple(tensor.shape) != want:
            raise ModelError(
                f"input contract is for {list(want)} but model input {tensor.name!r} is "
                f"{list(tensor.shape)}"
            )
        self.contract = contract
        self.tensor = tensor
        self.shape: tuple[int, int, int, int] = want
        self.dtype = tensor.numpy_dtype
        self.table: ValueTable
        self.table, self.tables = value_table(contract, tensor)
        self._bgr = contract.color == "BGR" and contract.channels == 3
        # Frames already at the model's size (and not cropped) skip the resize.
        size = (contract.height, contract.width)
        self._identity = size if crop_box(*size, contract.crop)[2:] == size else None
        # Frames that need nothing but the value tables (RGB, 3 channels, model size).
        direct = self._identity is not None and not self._bgr and contract.channels == 3
        self._direct = (*size, 3) if direct else None
        self._resamplers: OrderedDict[tuple[int, int], Resampler] = OrderedDict()
        self._bgr_buf: npt.NDArray[np.uint8] | None = None
        self._luma: tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], Array] | None = None
        if contract.channels == 1:
            self._luma = (np.empty(size, np.int32), np.empty(size, np.int32),
                          np.empty((*size, 1), np.uint8))  # fmt: skip

    @classmethod
    def legacy(
        cls, tensor: TensorDetails, value_range: tuple[float, float] = (0.0, 1.0)
    ) -> Preprocessor:
        """For releases without a contract: bilinear to the model size, RGB, ``value_range``."""
        return cls(legacy_contract(tensor.shape, value_range), tensor)

    def new_tensor(self) -> Array:
        return np.empty(self.shape, self.dtype)

    def __call__(self, frame: npt.NDArray[np.uint8], out: Array | None = None) -> Array:
        """The input tensor for ``frame``, written into ``out`` when given, else a new array.

        ``out`` (shape ``self.shape``, dtype ``self.dtype``) lets a caller reuse
        one buffer per frame; the result never aliases ``frame`` or internal buffers.
        """
        if (  # the camera already delivers the model's size: one check, then the tables
            self._direct
            and out is not None
            and frame.__class__ is np.ndarray
            and frame.shape == self._direct
            and frame.dtype == np.uint8
            and frame.flags.c_contiguous
            and out.shape == self.shape
            and out.dtype == self.dtype
            and out.flags.c_contiguous
        ):
            self.table.apply(frame, out)
            return out
        return self._map(self.pixels(frame), out)

    def map_pixels(self, pixels: npt.NDArray[np.uint8], out: Array | None = None) -> Array:
        """Step 5 alone: pixels already at the model's size and channels (``pixels()``)."""
        if pixels.shape != self.shape[1:] or pixels.dtype != np.uint8:
            got = f"{pixels.dtype}{list(pixels.shape)}"
            raise FrameSourceError(f"pixels must be uint8 {list(self.shape[1:])}, got {got}")
        return self._map(pixels, out)

    def _map(self, pixels: npt.NDArray[np.uint8], out: Array | None) -> Array:
        if out is None:
            out = self.new_tensor()
        elif out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ModelError(f"output buffer must be a contiguous {self.dtype}{list(self.shape)}")
        self.table.apply(pixels, out)
        return out

    def pixels(self, frame: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Steps 1-4: the uint8 image at the model's size and channels.

        It may be ``frame`` itself or an internal buffer that the next call
        overwrites: copy it to keep it.
        """
        if (
            not isinstance(frame, np.ndarray)
            or frame.dtype != np.uint8
            or frame.ndim != 3
            or frame.shape[2] != 3
        ):
            what = (
                f"{frame.dtype}{list(frame.shape)}"
                if isinstance(frame, np.ndarray)
                else type(frame).__name__
            )
            raise FrameSourceError(f"frames must be uint8 HxWx3 RGB arrays, got {what}")
        if not frame.flags.c_contiguous:
            frame = np.ascontiguousarray(frame)
        size = frame.shape[:2]
        if size == self._identity:
            pixels = self._swap(frame) if self._bgr else frame
        else:
            pixels = self._resampler(*size)(frame)
        if self._luma is not None:
            return self._grey(pixels)
        return pixels

    def _resampler(self, height: int, width: int) -> Resampler:
        key = (height, width)
        found = self._resamplers.get(key)
        if found is not None:
            self._resamplers.move_to_end(key)
            return found
        c = self.contract
        order = (2, 1, 0) if self._bgr else (0, 1, 2)
        found = Resampler((height, width, 3), (c.height, c.width), c.resize, crop=c.crop,
                          order=order, pad=c.pad)  # fmt: skip
        self._resamplers[key] = found
        if len(self._resamplers) > MAX_SOURCE_SIZES:
            self._resamplers.popitem(last=False)
        log.debug("resize tables for %dx%d -> %dx%d built", height, width, c.height, c.width)
        return found

    def _swap(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        # Three channel copies: 5x faster than numpy's copy of a reversed-stride view.
        if self._bgr_buf is None:
            self._bgr_buf = np.empty(rgb.shape, np.uint8)
        out = self._bgr_buf
        for c in range(3):
            np.copyto(out[..., c], rgb[..., 2 - c])
        return out

    def _grey(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        assert self._luma is not None
        acc, term, grey = self._luma
        np.multiply(rgb[..., 0], _LUMA[0], out=acc, dtype=np.int32)
        for channel in (1, 2):
            np.multiply(rgb[..., channel], _LUMA[channel], out=term, dtype=np.int32)
            acc += term
        acc += 1 << (_LUMA_SHIFT - 1)
        acc >>= _LUMA_SHIFT
        np.copyto(grey[..., 0], acc, casting="unsafe")
        return grey


def preprocessor_for(
    contract: InputContract | None,
    tensor: TensorDetails,
    legacy_range: tuple[float, float] = (0.0, 1.0),
) -> Preprocessor:
    """The release's contract, or the pre-contract behaviour for releases without one."""
    if contract is not None:
        return Preprocessor(contract, tensor)
    return Preprocessor.legacy(tensor, legacy_range)

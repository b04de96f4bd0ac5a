"""Pixel values to tensor values: the contract's mapping and the quantization, fused.

For an int8/uint8 input the whole chain ``uint8 pixel -> float value ->
quantized integer`` has only 256 possible inputs per channel, so it is one
256-entry table per channel and no float frame is ever made. For a float32
input the table holds the float values.

Applying a table costs a gather per element (numpy's ``take``, ~1 ns each),
which is several percent of a 2 ms MobileNet invoke. Most real tables are
nearly the identity shifted: when the model's quantization was calibrated on
the same range the contract maps to, ``q(p) = p + K`` give or take a few
one-step corrections, with saturation at the ends. ``StepTable`` applies such a
table exactly with a handful of whole-array uint8 operations (clamp, add K
modulo 256, add or subtract a few ``p >= t`` masks); two's-complement wrap-around
makes the same arithmetic right for int8. Tables of other shapes are gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ModelError
from agent.inference.runtime import TensorDetails, quantize
from agent.protocol.input_contract import InputContract

MAX_STEPS = 4  # beyond this many corrections a gather is as fast

Array = npt.NDArray[Any]


def pixel_values(contract: InputContract) -> npt.NDArray[np.float32]:
    """(channels, 256) float32: the value each uint8 pixel maps to, per channel.

    Computed in float32 in the order a numpy pipeline writes it
    (``LO + (HI - LO) * x / 255``, ``(x - mean) / std``), so a float frame
    normalised the usual way and then quantized gives exactly these values.
    """
    c = contract.channels
    pixels = np.arange(256, dtype=np.float32)
    if contract.value_range is not None:
        low, high = contract.value_range
        row = np.float32(low) + np.float32(high - low) * pixels / np.float32(255.0)
        return np.stack([row] * c)
    assert contract.mean is not None and contract.std is not None  # one mapping, always
    mean = contract.mean * c if len(contract.mean) == 1 else contract.mean
    std = contract.std * c if len(contract.std) == 1 else contract.std
    return np.stack(
        [(pixels - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)]
    )


def _channel_quantization(tensor: TensorDetails, channels: int) -> list[tuple[float, int]]:
    """(scale, zero point) per channel: per-tensor, or per-channel on the channel axis."""
    if len(tensor.scales) > 1:
        if tensor.quantized_dimension != 3 or len(tensor.scales) != channels:
            raise ModelError(
                f"input {tensor.name!r} is quantized per channel on axis "
                f"{tensor.quantized_dimension} with {len(tensor.scales)} scales; only the "
                "channel axis (3) of an NHWC input is supported"
            )
        return list(zip(tensor.scales, tensor.zero_points, strict=True))
    if not tensor.scale > 0.0:
        raise ModelError(f"input {tensor.name!r} is {tensor.dtype} without a quantization scale")
    return [(tensor.scale, tensor.zero_point)] * channels


def tensor_tables(contract: InputContract, tensor: TensorDetails) -> Array:
    """(channels, 256) in the tensor's dtype: what each pixel becomes in the tensor."""
    values = pixel_values(contract)
    if tensor.dtype == "float32":
        return values
    if tensor.dtype not in ("int8", "uint8"):
        raise ModelError(
            f"input {tensor.name!r} is {tensor.dtype}; image inputs must be int8, uint8 or float32"
        )
    params = _channel_quantization(tensor, contract.channels)
    return np.stack(
        [quantize(v, s, z, tensor.numpy_dtype) for v, (s, z) in zip(values, params, strict=True)]
    )


class GatherTable:
    """Any table, applied by gathering: one ``take`` per distinct channel table."""

    def __init__(self, tables: Array) -> None:
        self.tables = tables
        self._shared = bool(np.all(tables == tables[0]))

    def apply(self, pixels: npt.NDArray[np.uint8], out: Array) -> None:
        """``out``: the (1, H, W, C) tensor; ``pixels``: (H, W, C) uint8."""
        if self._shared:
            np.take(self.tables[0], pixels, out=out[0])
            return
        for c, table in enumerate(self.tables):
            np.take(table, pixels[..., c], out=out[0, ..., c])


@dataclass(frozen=True)
class _Steps:
    """One channel's table as clamp(p, low, high) + shift + sum of +-1 steps."""

    low: int
    high: int
    shift: int  # modulo 256
    up: tuple[int, ...]  # thresholds t: add 1 where p >= t
    down: tuple[int, ...]  # thresholds t: subtract 1 where p >= t


def _steps(table: npt.NDArray[np.int64]) -> _Steps | None:
    if np.any(np.diff(table) < 0):
        return None
    low = int(np.flatnonzero(table == table[0])[-1])
    high = int(np.flatnonzero(table == table[-1])[0])
    if high <= low:  # a constant (or two-valued) table: a threshold does it
        high = low + 1 if low < 255 else low
    p = np.arange(low, high + 1)
    d = table[low : high + 1] - p
    jumps = np.diff(d)
    if np.any(np.abs(jumps) > 1):
        return None
    up = tuple(int(t) for t in p[1:][jumps == 1])
    down = tuple(int(t) for t in p[1:][jumps == -1])
    if len(up) + len(down) > MAX_STEPS:
        return None
    return _Steps(low, high, int(d[0]) % 256, up, down)


class StepTable:
    """A near-identity table applied with whole-array uint8 arithmetic (see module doc).

    Parameters shared by all channels stay scalars (the clamp is one ``clip``
    with uint8 scalar bounds); per-channel ones become full-frame constant
    arrays, because numpy 2.4's broadcasting of a short row, and its
    maximum/minimum against a scalar (or ``clip`` with a Python int bound at
    255), are ten times slower than two contiguous arrays. A channel with fewer
    steps pads with a threshold that no pixel passes.
    """

    def __init__(self, steps: list[_Steps], pixels: int) -> None:
        shared = all(s == steps[0] for s in steps)

        def full(values: list[int]) -> npt.NDArray[np.uint8]:
            return np.tile(np.asarray(values, np.uint8), pixels)

        def param(values: list[int]) -> int | npt.NDArray[np.uint8]:
            return values[0] if shared else full(values)

        lows, highs = [s.low for s in steps], [s.high for s in steps]
        self._clip = (np.uint8(lows[0]), np.uint8(highs[0])) if shared else None
        self._low = full(lows) if any(lows) and not shared else None
        self._high = full(highs) if min(highs) < 255 and not shared else None
        if shared and lows[0] == 0 and highs[0] == 255:
            self._clip = None
        self._shift = param([s.shift for s in steps])
        # "p > t - 1"; padding uses 255, which no uint8 is above. +1 steps, then -1 steps.
        self._steps: list[tuple[int | npt.NDArray[np.uint8], bool]] = [
            (param([s.up[i] - 1 if i < len(s.up) else 255 for s in steps]), True)
            for i in range(max(len(s.up) for s in steps))
        ] + [
            (param([s.down[i] - 1 if i < len(s.down) else 255 for s in steps]), False)
            for i in range(max(len(s.down) for s in steps))
        ]
        size = pixels * len(steps)
        self._clamped = np.empty(size, np.uint8)
        self._mask = np.empty(size, np.bool_)

    @classmethod
    def build(cls, tables: Array, pixels: int) -> StepTable | None:
        """None unless every channel's table has the clamp + shift + few steps form."""
        if tables.dtype not in (np.int8, np.uint8):
            return None
        found = [_steps(t.astype(np.int64)) for t in tables]
        if any(s is None for s in found):
            return None
        return cls([s for s in found if s is not None], pixels)

    def apply(self, pixels: npt.NDArray[np.uint8], out: Array) -> None:
        # Each pass over the frame costs ~15 us right after an invoke (cold caches), so
        # with one step the clamp goes straight into the output: 3-4 passes in all.
        p = pixels.reshape(-1)  # a copy only when pixels is a strided view
        dst = out.reshape(-1).view(np.uint8)
        mask, mask8 = self._mask, self._mask.view(np.uint8)
        clamped = dst if len(self._steps) <= 1 else self._clamped
        if self._clip is not None:
            p.clip(*self._clip, out=clamped)  # the method: np.clip's wrapper costs more
            p = clamped
        elif self._low is not None or self._high is not None:
            if self._low is not None:
                np.maximum(p, self._low, out=clamped)
                p = clamped
            if self._high is not None:
                np.minimum(p, self._high, out=clamped)
                p = clamped
        if len(self._steps) == 1:
            threshold, up = self._steps[0]
            np.greater(p, threshold, out=mask)  # before the shift overwrites p
            np.add(p, self._shift, out=dst)  # wraps modulo 256, as intended
            (np.add if up else np.subtract)(dst, mask8, out=dst)
            return
        np.add(p, self._shift, out=dst)
        for threshold, up in self._steps:
            np.greater(p, threshold, out=mask)
            (np.add if up else np.subtract)(dst, mask8, out=dst)


ValueTable = GatherTable | StepTable


def value_table(contract: InputContract, tensor: TensorDetails) -> tuple[ValueTable, Array]:
    """The fastest exact way to apply the contract's mapping to ``tensor``, and its tables."""
    tables = tensor_tables(contract, tensor)
    step = StepTable.build(tables, contract.height * contract.width)
    return (step if step is not None else GatherTable(tables)), tables

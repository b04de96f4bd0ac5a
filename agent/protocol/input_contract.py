"""The input contract: how a release turns a uint8 camera frame into its input tensor.

It travels signed, under ``"input"`` in the model manifest, because a wrong
pixel mapping fails silently: a model trained on [-1, 1] scored 17% instead of
93% when fed [0, 1]. Parsing is strict and refuses unknown keys: a field this
agent does not understand may change what the pixels mean, and guessing would
bring the silent failure back.

Value mapping, from a uint8 pixel ``p`` in 0..255, exactly one of:

- ``range [LO, HI]``: ``value = LO + (HI - LO) * p / 255``;
- ``mean``/``std`` (1 or C values, in pixel units, the TFLite Metadata
  convention): ``value = (p - mean_c) / std_c``.

The order on the device is crop -> resize -> colour order -> luma (grey
models) -> value mapping -> quantization (``agent.inference.preprocess``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.common.errors import ProtocolError

LAYOUTS = ("NHWC",)
RESIZE_METHODS = ("bilinear", "area", "nearest", "letterbox")
COLOR_ORDERS = ("RGB", "BGR")
CHANNELS = (1, 3)
MAX_SIDE = 8192
_KEYS = frozenset(
    {"layout", "height", "width", "channels", "resize", "pad", "crop", "color", "range",
     "mean", "std"}
)  # fmt: skip


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"input contract: {what} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ProtocolError(f"input contract: {what} must be finite, got {number}")
    return number


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"input contract: {what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ProtocolError(f"input contract: {what} must be in {low}..{high}, got {value}")
    return value


def _numbers(value: Any, what: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"input contract: {what} must be a list of numbers")
    return tuple(_number(v, what) for v in value)


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class InputContract:
    """Size, layout, resize, crop, colour order and value mapping of one model input.

    Construction validates, so an InputContract in hand is always a usable one.
    """

    height: int
    width: int
    channels: int
    resize: str = "bilinear"
    pad: int = 0  # letterbox fill, a uint8 pixel value (mapped like any other pixel)
    crop: float = 1.0  # central crop, as a fraction of each side, taken before the resize
    color: str = "RGB"
    value_range: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NHWC"

    def __post_init__(self) -> None:
        # Lists and ints from callers become tuples and floats, so equal contracts compare equal.
        for key in ("value_range", "mean", "std"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _numbers(value, key.replace("value_", "")))
        object.__setattr__(self, "crop", _number(self.crop, "crop"))
        if self.layout not in LAYOUTS:
            raise ProtocolError(
                f"input contract: layout {self.layout!r} is not supported; only NHWC is"
            )
        _integer(self.height, "height", 1, MAX_SIDE)
        _integer(self.width, "width", 1, MAX_SIDE)
        if self.channels not in CHANNELS or isinstance(self.channels, bool):
            raise ProtocolError(f"input contract: channels must be 1 or 3, got {self.channels!r}")
        if self.resize not in RESIZE_METHODS:
            raise ProtocolError(
                f"input contract: resize {self.resize!r} is not one of {', '.join(RESIZE_METHODS)}"
            )
        _integer(self.pad, "pad", 0, 255)
        if self.pad and self.resize != "letterbox":
            raise ProtocolError("input contract: pad applies only to resize 'letterbox'")
        if not 0.0 < self.crop <= 1.0:
            raise ProtocolError(f"input contract: crop must be in (0, 1], got {self.crop}")
        if self.color not in COLOR_ORDERS:
            raise ProtocolError(f"input contract: color must be RGB or BGR, got {self.color!r}")
        self._check_mapping()

    def _check_mapping(self) -> None:
        has_range = self.value_range is not None
        has_norm = self.mean is not None or self.std is not None
        if has_range == has_norm:
            raise ProtocolError(
                "input contract: give exactly one value mapping, range or mean/std"
                + (", not both" if has_range else "")
            )
        if self.value_range is not None:
            rng = self.value_range
            if len(rng) != 2 or not rng[1] > rng[0]:
                raise ProtocolError("input contract: range must be [LO, HI] with HI > LO")
            return
        if self.mean is None or self.std is None:
            raise ProtocolError("input contract: mean and std go together")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in {1, self.channels}:
                raise ProtocolError(
                    f"input contract: {what} needs 1 or {self.channels} values, got {len(values)}"
                )
        if any(not s > 0.0 for s in self.std):
            raise ProtocolError(f"input contract: std must be positive, got [{_fmt(self.std)}]")

    def mapping_text(self) -> str:
        if self.value_range is not None:
            return f"range {_fmt(self.value_range)}"
        assert self.mean is not None and self.std is not None
        return f"mean {_fmt(self.mean)} std {_fmt(self.std)}"

    def describe(self) -> str:
        """One line for logs and publish output."""
        resize = f"letterbox pad {self.pad}" if self.resize == "letterbox" else self.resize
        crop = f", crop {self.crop:g}" if self.crop < 1.0 else ""
        return (
            f"{self.height}x{self.width}x{self.channels} {self.layout}, {resize}{crop}, "
            f"{self.color}, {self.mapping_text()}"
        )

    # -- wire form ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layout": self.layout,
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "resize": self.resize,
            "crop": float(self.crop),
            "color": self.color,
        }
        if self.resize == "letterbox":
            out["pad"] = self.pad
        if self.value_range is not None:
            out["range"] = [float(v) for v in self.value_range]
        else:
            assert self.mean is not None and self.std is not None
            out["mean"] = [float(v) for v in self.mean]
            out["std"] = [float(v) for v in self.std]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> InputContract:
        if not isinstance(data, dict):
            raise ProtocolError("input contract must be an object")
        unknown = sorted(str(k) for k in set(data) - _KEYS)
        if unknown:
            raise ProtocolError(f"input contract: unknown field(s) {', '.join(unknown)}")
        for key in ("layout", "height", "width", "channels", "resize", "crop", "color"):
            if key not in data:
                raise ProtocolError(f"input contract: field {key!r} is missing")
        for key in ("layout", "resize", "color"):
            if not isinstance(data[key], str):
                raise ProtocolError(f"input contract: {key} must be a string")
        value_range = data.get("range")
        mean, std = data.get("mean"), data.get("std")
        return cls(
            height=_integer(data["height"], "height", 1, MAX_SIDE),
            width=_integer(data["width"], "width", 1, MAX_SIDE),
            channels=_integer(data["channels"], "channels", 1, 3),
            resize=data["resize"],
            pad=_integer(data.get("pad", 0), "pad", 0, 255),
            crop=_number(data["crop"], "crop"),
            color=data["color"],
            value_range=None if value_range is None else _pair(_numbers(value_range, "range")),
            mean=None if mean is None else _numbers(mean, "mean"),
            std=None if std is None else _numbers(std, "std"),
            layout=data["layout"],
        )


def _pair(values: tuple[float, ...]) -> tuple[float, float]:
    if len(values) != 2:
        raise ProtocolError(f"input contract: range must be [LO, HI], got {len(values)} values")
    return values[0], values[1]


def image_input_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int, int] | None:
    """(H, W, C) when ``shape`` is an NHWC image input with 1 or 3 channels, else None."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 4 or dims[0] != 1 or dims[3] not in CHANNELS or min(dims[1:3]) < 1:
        return None
    return dims[1], dims[2], dims[3]


def legacy_contract(
    shape: tuple[int, ...] | list[int], value_range: tuple[float, float] = (0.0, 1.0)
) -> InputContract:
    """What a release without a contract gets: bilinear to the model size, RGB, ``value_range``."""
    dims = image_input_shape(shape)
    if dims is None:
        raise ProtocolError(f"input shape {list(shape)} is not a 1xHxWxC image input (C 1 or 3)")
    height, width, channels = dims
    return InputContract(height, width, channels, value_range=value_range)

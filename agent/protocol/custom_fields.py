"""The TUF target's ``custom`` field codec and the target description both sides share.

The server signs manifests into a target's ``custom`` field; the device reads
them back after ``tuf.ngclient`` has verified the metadata. The codec lives
with the device, which is the party that verifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FLOAT_TAG = "__float__"


@dataclass(frozen=True)
class TargetInfo:
    """What signed metadata says about one target (the server uses it too)."""

    path: str
    length: int
    sha256: str
    custom: dict[str, Any] = field(default_factory=dict)


def encode_custom(value: Any) -> Any:
    """Make a JSON value signable: TUF's canonical JSON has no floats.

    Each float becomes ``{"__float__": repr(value)}``, which round-trips
    exactly; ``decode_custom`` undoes it. The server encodes, the device decodes,
    so manifests keep real floats (quantization scales) on both sides.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"custom metadata cannot carry {value}")
        return {FLOAT_TAG: repr(value)}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("custom metadata object keys must be strings")
        return {k: encode_custom(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_custom(v) for v in value]
    raise TypeError(f"custom metadata cannot carry a {type(value).__name__}")


def decode_custom(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {FLOAT_TAG}:
            text = value[FLOAT_TAG]
            number = float(text) if isinstance(text, str) else math.nan
            if not math.isfinite(number):
                raise ValueError(f"bad encoded float {text!r}")
            return number
        return {k: decode_custom(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_custom(v) for v in value]
    return value

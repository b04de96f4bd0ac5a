"""EdgeFleet model deltas: make on the server, apply (streaming) on the device.

The format is specified in docs/delta-format.md. The device side needs only
numpy and zstandard; making a model-aware delta also needs ai_edge_litert's
flatbuffer schema, and the bsdiff method needs bsdiff4 (server side only).
Patches whose residuals are ANS-coded (format version 2) need constriction to
apply; it has no aarch64 wheel yet, so make patches for such devices with
``DeltaConfig(ans=False)`` (``ans_available()`` tells what this install can do).
"""

from __future__ import annotations

from agent.delta.ans import available as ans_available
from agent.delta.decoder import ApplyInfo, apply_bytes, apply_delta, read_header
from agent.delta.encoder import DeltaInfo, make_delta, make_patch_bytes
from agent.delta.errors import (
    CorruptPatchError,
    DeltaError,
    DeltaInputError,
    TruncatedPatchError,
    UnsupportedPatchError,
    WrongBaseError,
)
from agent.delta.format import DeltaHeader
from agent.delta.limits import DEFAULT_CONFIG, DeltaConfig

__all__ = [
    "DEFAULT_CONFIG",
    "ApplyInfo",
    "CorruptPatchError",
    "DeltaConfig",
    "DeltaError",
    "DeltaHeader",
    "DeltaInfo",
    "DeltaInputError",
    "TruncatedPatchError",
    "UnsupportedPatchError",
    "WrongBaseError",
    "ans_available",
    "apply_bytes",
    "apply_delta",
    "make_delta",
    "make_patch_bytes",
    "read_header",
]

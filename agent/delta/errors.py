"""Delta-specific errors, all under the agent's ``DeltaError``.

Messages are one line and name what is wrong, because the CLI prints them as is.
"""

from __future__ import annotations

from agent.common.errors import DeltaError

__all__ = [
    "CorruptPatchError",
    "DeltaError",
    "DeltaInputError",
    "TruncatedPatchError",
    "UnsupportedPatchError",
    "WrongBaseError",
]


class WrongBaseError(DeltaError):
    """The file given as the base is not the one the patch was made from."""

    def __init__(self, expected_sha256: str, actual_sha256: str) -> None:
        super().__init__(
            f"wrong base: patch needs base sha256 {expected_sha256[:16]}..., "
            f"got {actual_sha256[:16]}..."
        )
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256


class CorruptPatchError(DeltaError):
    """The patch is damaged, malformed or not an EdgeFleet delta at all."""


class DeltaInputError(DeltaError):
    """The base, target or patch file cannot be read."""


class UnsupportedPatchError(DeltaError):
    """A valid patch this install cannot apply (an optional decoder is missing).

    The caller should fetch the full file instead; the server should make deltas
    without the feature for this device.
    """

    def __init__(self, version: int, needs: str) -> None:
        super().__init__(f"delta format version {version} needs {needs}, which is not installed")
        self.version = version
        self.needs = needs


class TruncatedPatchError(CorruptPatchError):
    """The patch ends before its last section: an interrupted download or copy."""

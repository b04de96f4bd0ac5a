"""The agent's single exception tree.

Every error the agent raises on purpose derives from ``AgentError`` and carries
the data an operator needs; wrappers re-raise ``from err`` to keep the cause.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The agent configuration file is missing, malformed or inconsistent."""


class ProfileError(AgentError):
    """A firmware profile is malformed or none matches this board."""


class RuntimeUnavailableError(AgentError):
    """The configured inference runtime or delegate cannot be loaded."""


class ModelError(AgentError):
    """A model file cannot be loaded or does not match its declared signature."""


class FrameSourceError(AgentError):
    """A frame source specification is invalid or yields unusable frames."""


class SourceOpenError(FrameSourceError):
    """A frame source cannot be opened: no such file or device, not a video, no decoder."""


class CameraStalledError(FrameSourceError):
    """A live source delivered no frame within its read timeout (the camera is down)."""


class ProtocolError(AgentError):
    """A wire message (manifest, check-in, telemetry) is malformed."""


class ServerRequestError(AgentError):
    """The fleet server refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpdateError(AgentError):
    """An update step failed; ``step`` names the state-machine step."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class VerificationError(UpdateError):
    """TUF metadata or a downloaded target failed verification."""

    def __init__(self, reason: str) -> None:
        super().__init__("verify", reason)


class SmokeTestError(UpdateError):
    """The installed model did not reproduce its golden output."""

    def __init__(self, reason: str) -> None:
        super().__init__("smoke_test", reason)


class DeltaError(AgentError):
    """A delta patch is corrupt, truncated, or made for another base."""


class TelemetryError(AgentError):
    """A telemetry source (power, thermal) cannot be read."""


class SensorError(TelemetryError):
    """A power or thermal sensor is missing or returned garbage."""

"""The server's single exception tree; API handlers map these to 4xx answers."""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server raises on purpose."""

    status = 500


class ConfigError(ServerError):
    """Server configuration is invalid."""

    status = 500


class NotFoundError(ServerError):
    """A requested device, model or rollout does not exist."""

    status = 404


class ConflictError(ServerError):
    """The request conflicts with stored state (duplicate release, overlap)."""

    status = 409


class InvalidInputError(ServerError):
    """The request is well-formed but its content is unacceptable."""

    status = 422


class AuthError(ServerError):
    """Missing or wrong credentials."""

    status = 401


class ForbiddenError(ServerError):
    """Valid credentials that do not grant this action."""

    status = 403


class RateLimitedError(ServerError):
    """Too many requests for one key (enrollment token, device); retry after the wait."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyStoreError(ServerError):
    """Signing keys are missing, unreadable or have unsafe permissions."""


class ModelValidationError(InvalidInputError):
    """A model file offered for publishing is not a usable .tflite model."""


class DeltaBuildError(ServerError):
    """A delta could not be built between two releases."""

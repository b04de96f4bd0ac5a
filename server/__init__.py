"""EdgeFleet fleet server: model registry, TUF signing, rollouts and telemetry."""

__version__ = "0.1.0"

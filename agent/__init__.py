"""EdgeFleet camera agent: verified model updates and local INT8 inference."""

__version__ = "0.1.0"

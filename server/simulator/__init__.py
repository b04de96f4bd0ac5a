"""Fleet simulator: many devices in one asyncio process, speaking the agent's protocol.

``Fleet`` (asyncio) or ``FleetThread`` (for synchronous callers) runs the
devices of a ``SimConfig`` with a ``Behaviour``; ``build_behaviour`` parses
the per-profile and per-release knobs from operator text.
"""

from __future__ import annotations

from server.simulator.artifacts import ArtifactLimits, SharedArtifacts
from server.simulator.behaviour import (
    DEFAULT_PROFILES,
    Behaviour,
    ProfileBehaviour,
    ReleaseEffect,
    Traits,
    build_behaviour,
    parse_effect,
    parse_profile,
)
from server.simulator.fleet import Credentials, Fleet, FleetThread, SimulatorError
from server.simulator.payloads import WindowSpec
from server.simulator.plan import PlannedDevice, SimConfig, plan_fleet
from server.simulator.stats import Report

__all__ = [
    "DEFAULT_PROFILES",
    "ArtifactLimits",
    "Behaviour",
    "Credentials",
    "Fleet",
    "FleetThread",
    "PlannedDevice",
    "ProfileBehaviour",
    "ReleaseEffect",
    "Report",
    "SharedArtifacts",
    "SimConfig",
    "SimulatorError",
    "Traits",
    "WindowSpec",
    "build_behaviour",
    "parse_effect",
    "parse_profile",
    "plan_fleet",
]

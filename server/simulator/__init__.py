"""Fleet simulator: many devices in one asyncio process, speaking the agent's protocol.

``Fleet`` (asyncio) or ``FleetThread`` (for synchronous callers) runs the
devices of a ``SimConfig`` with a ``Behaviour``; ``build_behaviour`` parses
the per-profile and per-release knobs from operator text.

Devices behave as the agent does on the wire: they check in when a ``checkin``
command arrives on their ``cmd`` topic (their own MQTT session, or the shared
``cmd_relay`` subscription for the rest of a large fleet), conditionally with
If-None-Match, and otherwise poll at the advertised interval with jitter; each
refreshes its own TUF metadata and downloads its own delta or full file
(``device_fetch``), while signature checks run once per target (``artifacts``).
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

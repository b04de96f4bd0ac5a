"""The rollout service: the IO around the pure rollout core in ``server.rollout.core``.

Tables (``rollouts``, ``rollout_devices``, ``rollout_history``), operator
actions (``create_rollout``, ``perform``), the engine tick (``tick``,
``tick_all``) run by ``server.rollout.scheduler``, and JSON views for the REST
API (``server.api.rollouts``) and the CLI (``server.cli.rollout``).
"""

from __future__ import annotations

from server.rollout.service.actions import (
    ActionResult,
    RevertRefusedError,
    TargetSource,
    create_rollout,
    perform,
)
from server.rollout.service.engine import TickResult, tick, tick_all
from server.rollout.service.records import HOLDING, TICKED, get_rollout, history
from server.rollout.service.settings import DEFAULT_CONFIG, ServiceConfig
from server.rollout.service.tables import Rollout, RolloutDevice, RolloutHistory

__all__ = [
    "DEFAULT_CONFIG",
    "HOLDING",
    "TICKED",
    "ActionResult",
    "RevertRefusedError",
    "Rollout",
    "RolloutDevice",
    "RolloutHistory",
    "ServiceConfig",
    "TargetSource",
    "TickResult",
    "create_rollout",
    "get_rollout",
    "history",
    "perform",
    "tick",
    "tick_all",
]

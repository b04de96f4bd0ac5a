"""The rollout service: the IO around the pure rollout core in ``server.rollout``.

Tables (``rollouts``, ``rollout_devices``, ``rollout_history``), operator
actions (``create_rollout``, ``perform``), the engine tick (``tick``,
``tick_all``) run by ``server.rollout_scheduler``, and JSON views for the REST
API (``server.api.rollouts``) and the CLI (``server.cli_rollout``).
"""

from __future__ import annotations

from server.rollout_service.actions import (
    ActionResult,
    RevertRefusedError,
    TargetSource,
    create_rollout,
    perform,
)
from server.rollout_service.config import DEFAULT_CONFIG, ServiceConfig
from server.rollout_service.engine import TickResult, tick, tick_all
from server.rollout_service.records import HOLDING, TICKED, get_rollout, history
from server.rollout_service.tables import Rollout, RolloutDevice, RolloutHistory

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

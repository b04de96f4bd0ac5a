"""Staged rollouts: the pure core (spec, states, cohorts, gates, policy).

Nothing here does IO. The scheduler loop loads stored facts, calls ``decide``
and stores the ``Decision``; REST handlers parse operator input with
``build_spec``/``RolloutSpec.from_json`` and change state with ``apply_action``.
"""

from __future__ import annotations

from server.rollout.core.cohorts import (
    CohortConfig,
    CohortSlot,
    assign_cohorts,
    assign_stages,
    cohort_order,
    stage_sizes,
)
from server.rollout.core.cron import CronExpr, MaintenanceWindow, parse_cron, parse_window
from server.rollout.core.decision import Decision, DecisionKind, StageProgress
from server.rollout.core.gates import GateLimits, GateResult
from server.rollout.core.options import build_spec
from server.rollout.core.policy import FactsError, PolicyConfig, RolloutFacts, decide
from server.rollout.core.spec import (
    ReleaseRef,
    RolloutSpec,
    Selector,
    SpecLimits,
    StageSpec,
    parse_release,
    parse_selector,
    parse_stage_sizes,
)
from server.rollout.core.states import (
    TRANSITIONS,
    Action,
    DeviceFacts,
    EngineEvent,
    InstallStatus,
    RolloutState,
    RolloutStatus,
    TransitionError,
    apply_action,
    apply_event,
    next_state,
)
from server.rollout.core.units import Amount, parse_amount, parse_duration

__all__ = [
    "TRANSITIONS",
    "Action",
    "Amount",
    "CohortConfig",
    "CohortSlot",
    "CronExpr",
    "Decision",
    "DecisionKind",
    "DeviceFacts",
    "EngineEvent",
    "FactsError",
    "GateLimits",
    "GateResult",
    "InstallStatus",
    "MaintenanceWindow",
    "PolicyConfig",
    "ReleaseRef",
    "RolloutFacts",
    "RolloutSpec",
    "RolloutState",
    "RolloutStatus",
    "Selector",
    "SpecLimits",
    "StageProgress",
    "StageSpec",
    "TransitionError",
    "apply_action",
    "apply_event",
    "assign_cohorts",
    "assign_stages",
    "build_spec",
    "cohort_order",
    "decide",
    "next_state",
    "parse_amount",
    "parse_cron",
    "parse_duration",
    "parse_release",
    "parse_selector",
    "parse_stage_sizes",
    "parse_window",
    "stage_sizes",
]

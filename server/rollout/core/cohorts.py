"""Cohorts: which stage each device of a rollout belongs to, and in what order.

Pure: no IO. Devices are ordered by sha256(rollout id, device id), spread so
that any prefix of the order touches as many stores and regions as it can:

- within each store, devices are ranked by their hash;
- within each region, stores are ranked by the hash of (rollout, region, store);
- regions are ranked by the hash of (rollout, region);
- the order is by (rank in store, rank of store in region, rank of region).

So round 0 takes one device from every store before any store gives a second,
and consecutive devices alternate between regions. The result does not depend
on the input order. Adding a device to an existing store moves only that
store's later devices back by at most one round; the relative order of every
other device is unchanged. The tag keys used for spreading are configurable
(outermost first); a device without the innermost tag counts as a store of its
own, and one without an outer tag joins an unnamed group.

Stage sizes are cumulative: a percentage of the N selected devices rounded up
(at least one device when N > 0) or a count, never beyond N. The scheduler
should assign stages once, when the rollout starts, and store them.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from server.rollout.core.spec import StageSpec
from server.rollout.core.states import DeviceFacts
from server.rollout.core.units import Amount


@dataclass(frozen=True)
class CohortConfig:
    spread_keys: tuple[str, ...] = ("region", "store")  # outermost first


@dataclass(frozen=True)
class CohortSlot:
    stage: int
    rank: int  # position in the rollout's device order, 0 first


def _hash(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()


def stage_sizes(total: int, stages: Sequence[StageSpec | Amount]) -> list[int]:
    """Cumulative device counts per stage for ``total`` selected devices."""
    sizes: list[int] = []
    previous = 0
    for stage in stages:
        size = stage.size if isinstance(stage, StageSpec) else stage
        # Sizes are above zero, so rounding up gives a non-empty fleet at least one device.
        previous = min(total, max(previous, size.at_least(total)))
        sizes.append(previous)
    return sizes


def cohort_order(
    rollout_id: str, devices: Sequence[DeviceFacts], config: CohortConfig = CohortConfig()
) -> list[str]:
    """Device ids in the rollout's spread order (see the module docstring)."""
    keys = config.spread_keys
    # The path of groups a device sits in, outermost first; the last is its store.
    paths: dict[str, tuple[str, ...]] = {}
    for device in devices:
        if device.device_id in paths:
            raise ValueError(f"device {device.device_id!r} is listed twice")
        tags = device.tags
        outer = tuple(tags.get(key, "") for key in keys[:-1])
        leaf = tags.get(keys[-1]) if keys else None
        store = "=" + leaf if leaf is not None else "#" + device.device_id
        paths[device.device_id] = (*outer, store)

    # Rank of each group among its siblings, by hash, level by level.
    group_rank: dict[tuple[str, ...], int] = {}
    for depth in range(1, max(1, len(keys)) + 1):
        children: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
        for path in paths.values():
            children[path[: depth - 1]].add(path[:depth])
        for kids in children.values():
            ordered = sorted(kids, key=lambda p: (_hash(rollout_id, str(len(p)), *p), p))
            group_rank.update((kid, i) for i, kid in enumerate(ordered))

    members: dict[tuple[str, ...], list[tuple[bytes, str]]] = defaultdict(list)
    for device_id, path in paths.items():
        members[path].append((_hash(rollout_id, device_id), device_id))

    keyed: list[tuple[tuple[int, ...], str]] = []
    for path, entries in members.items():
        entries.sort()
        # Innermost group first: round, then store within region, then region.
        groups = tuple(group_rank[path[:depth]] for depth in range(len(path), 0, -1))
        keyed.extend(((turn, *groups), device_id) for turn, (_, device_id) in enumerate(entries))
    keyed.sort()
    return [device_id for _, device_id in keyed]


def assign_cohorts(
    rollout_id: str,
    devices: Sequence[DeviceFacts],
    stages: Sequence[StageSpec | Amount],
    config: CohortConfig = CohortConfig(),
) -> dict[str, CohortSlot]:
    """Stage and rank of every device; store both (``DeviceFacts.stage``/``rank``)."""
    order = cohort_order(rollout_id, devices, config)
    bounds = stage_sizes(len(order), stages)
    slots: dict[str, CohortSlot] = {}
    stage = 0
    for rank, device_id in enumerate(order):
        while rank >= bounds[stage]:
            stage += 1
        slots[device_id] = CohortSlot(stage, rank)
    return slots


def assign_stages(
    rollout_id: str,
    devices: Sequence[DeviceFacts],
    stages: Sequence[StageSpec | Amount],
    config: CohortConfig = CohortConfig(),
) -> dict[str, int]:
    """``{device_id: stage_index}`` for every device."""
    return {
        device_id: slot.stage
        for device_id, slot in assign_cohorts(rollout_id, devices, stages, config).items()
    }

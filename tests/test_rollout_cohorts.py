"""Cohorts: stable hash order, spread across stores and regions, cumulative stage sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from server.rollout.core.cohorts import (
    CohortConfig,
    assign_cohorts,
    assign_stages,
    cohort_order,
    stage_sizes,
)
from server.rollout.core.options import build_spec
from server.rollout.core.spec import parse_stage_sizes
from server.rollout.core.states import DeviceFacts


def fleet(n: int = 200, stores: int = 20, regions: int = 4) -> list[DeviceFacts]:
    """n devices, store i%stores, each store in one region."""
    return [
        DeviceFacts(
            f"cam-{i:04d}",
            profile="rpi4",
            tags={"store": f"s{i % stores:02d}", "region": f"r{(i % stores) % regions}"},
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("total", "stages", "sizes"),
    [
        (200, "1%,10%,50%,100%", [2, 20, 100, 200]),
        (3, "1%,10%,50%,100%", [1, 1, 2, 3]),
        (1, "1%,10%,50%,100%", [1, 1, 1, 1]),
        (0, "1%,10%,50%,100%", [0, 0, 0, 0]),
        (1000, "5,50,25%,100%", [5, 50, 250, 1000]),
        (100, "5,50,25%,100%", [5, 50, 50, 100]),
        (20, "5,50,25%,100%", [5, 20, 20, 20]),
        (1000, "0.1%,100%", [1, 1000]),
        (1001, "0.1%,100%", [2, 1001]),
        (65000, "1%,10%,50%,100%", [650, 6500, 32500, 65000]),
    ],
)
def test_stage_sizes_are_cumulative_rounded_up(total: int, stages: str, sizes: list[int]) -> None:
    assert stage_sizes(total, parse_stage_sizes(stages)) == sizes


def test_assignment_matches_sizes_and_follows_the_order() -> None:
    devices = fleet()
    spec = build_spec(release="digits@2", all_devices=True, stages="1%,10%,50%,100%")
    slots = assign_cohorts("rollout-1", devices, spec.stages)
    assert set(slots) == {d.device_id for d in devices}
    counts = Counter(slot.stage for slot in slots.values())
    assert [counts[i] for i in range(4)] == [2, 18, 80, 100]
    by_rank = sorted(slots.values(), key=lambda slot: slot.rank)
    assert [slot.rank for slot in by_rank] == list(range(200))
    assert [slot.stage for slot in by_rank] == sorted(slot.stage for slot in by_rank)
    assert assign_stages("rollout-1", devices, spec.stages) == {
        k: v.stage for k, v in slots.items()}


def test_same_input_same_assignment_whatever_the_input_order() -> None:
    devices = fleet()
    stages = parse_stage_sizes("1%,10%,50%,100%")
    first = assign_cohorts("rollout-1", devices, stages)
    shuffled = [devices[i] for i in np.random.default_rng(7).permutation(len(devices))]
    assert assign_cohorts("rollout-1", shuffled, stages) == first
    assert cohort_order("rollout-1", shuffled) == cohort_order("rollout-1", devices)


def test_each_rollout_draws_a_different_order() -> None:
    devices = fleet()
    orders = {tuple(cohort_order(f"rollout-{i}", devices)[:10]) for i in range(5)}
    assert len(orders) == 5


def test_stage_one_spreads_over_stores_and_regions() -> None:
    devices = fleet(200, stores=20, regions=4)
    where = {d.device_id: (d.tags["region"], d.tags["store"]) for d in devices}
    stages = assign_stages("rollout-1", devices, parse_stage_sizes("1%,10%,50%,100%"))
    stage1 = [d for d, s in stages.items() if s == 0]
    assert len(stage1) == 2
    assert len({where[d][1] for d in stage1}) == 2  # two stores
    assert len({where[d][0] for d in stage1}) == 2  # in two regions
    order = cohort_order("rollout-1", devices)
    assert len({where[d][0] for d in order[:4]}) == 4  # the first four: every region
    assert len({where[d][1] for d in order[:20]}) == 20  # the first 20: every store
    stage2 = [d for d, s in stages.items() if s <= 1]
    assert len({where[d][1] for d in stage2}) == 20


def test_spread_holds_for_many_rollout_ids() -> None:
    devices = fleet(200, stores=20, regions=4)
    store = {d.device_id: d.tags["store"] for d in devices}
    for i in range(50):
        first = cohort_order(f"r{i}", devices)[:20]
        assert len({store[d] for d in first}) == 20


def test_adding_a_device_keeps_everyone_elses_relative_order() -> None:
    devices = fleet(200, stores=20, regions=4)
    before = cohort_order("rollout-1", devices)
    newcomer = DeviceFacts("cam-new", tags={"store": "s03", "region": "r3"})
    after = [d for d in cohort_order("rollout-1", [*devices, newcomer]) if d != "cam-new"]
    store = {d.device_id: d.tags["store"] for d in devices}
    outside = [d for d in before if store[d] != "s03"]
    assert [d for d in after if store[d] != "s03"] == outside
    assert [d for d in after if store[d] == "s03"] == [d for d in before if store[d] == "s03"]
    # A store-mate may move back by one round at most: 20 stores, so < 21 places.
    assert all(abs(after.index(d) - before.index(d)) <= 20 for d in before)


def test_a_new_region_keeps_the_order_inside_every_old_store() -> None:
    devices = fleet(200, stores=20, regions=4)
    before = cohort_order("rollout-1", devices)
    extra = [DeviceFacts(f"x{i}", tags={"store": "new", "region": "r9"}) for i in range(5)]
    after = [d for d in cohort_order("rollout-1", [*devices, *extra]) if not d.startswith("x")]
    store = {d.device_id: d.tags["store"] for d in devices}
    for name in {d.tags["store"] for d in devices}:
        assert [d for d in after if store[d] == name] == [d for d in before if store[d] == name]


def test_untagged_devices_each_count_as_their_own_store() -> None:
    devices = [DeviceFacts(f"cam-{i}") for i in range(50)]
    devices += [DeviceFacts(f"big-{i}", tags={"store": "mall"}) for i in range(50)]
    order = cohort_order("rollout-1", devices)
    # One device from "mall" per round; the 50 untagged devices all come in round 0.
    assert sum(d.startswith("big-") for d in order[:51]) == 1
    assert order == cohort_order("rollout-1", list(reversed(devices)))


def test_spread_keys_are_configurable() -> None:
    devices = [DeviceFacts(f"cam-{i}", tags={"site": f"{i % 5}"}) for i in range(50)]
    order = cohort_order("rollout-1", devices, CohortConfig(spread_keys=("site",)))
    assert {devices[int(d.split("-")[1])].tags["site"] for d in order[:5]} == {
        "0", "1", "2", "3", "4"}
    flat = cohort_order("rollout-1", devices, CohortConfig(spread_keys=()))
    assert sorted(flat) == sorted(order)


def test_empty_fleet_and_duplicates() -> None:
    assert assign_stages("rollout-1", [], parse_stage_sizes("10%,100%")) == {}
    with pytest.raises(ValueError, match="listed twice"):
        cohort_order("rollout-1", [DeviceFacts("a"), DeviceFacts("a")])

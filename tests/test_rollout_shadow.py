"""The shadow phase of a rollout stage, as the pure policy decides it: the stage's
devices shadow and none installs; the phase passes on agreement, pauses naming a
class that disagrees, waits for its sample and its frames, and a resume accepts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from fractions import Fraction
from typing import Any

import pytest
from policy_facts import NOW, PEND, K, dev, facts, make_spec

from server.errors import InvalidInputError
from server.rollout.core.policy import RolloutFacts, decide
from server.rollout.core.shadow import (
    SHADOW_AGREEMENT,
    SHADOW_CLASS_AGREEMENT,
    SHADOW_ERROR,
    ShadowLimits,
    ShadowReport,
    parse_window,
)
from server.rollout.core.shadow_judge import agreement_upper_bound, fold
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import Action, RolloutState, apply_action

LABELS = tuple(f"c{i}" for i in range(4))


def report(per_class: int = 100, wrong: dict[int, int] | None = None, **kw: Any) -> ShadowReport:
    """A device's report: ``per_class`` frames called each class by the serving model;
    ``wrong[c]`` of class c's frames the candidate called c+1."""
    pairs: dict[tuple[int, int], int] = {}
    for c in range(len(LABELS)):
        bad = (wrong or {}).get(c, 0)
        pairs[(c, c)] = per_class - bad
        if bad:
            pairs[(c, (c + 1) % len(LABELS))] = bad
    pairs = {k: v for k, v in pairs.items() if v}
    agreed = sum(v for (i, j), v in pairs.items() if i == j)
    return ShadowReport(shadowed=sum(pairs.values()), agreed=agreed, pairs=pairs, labels=LABELS,
                        candidate_p95_ms=4.0, serving_p95_ms=3.5, **kw)


def shadow_spec(**kw: Any) -> RolloutSpec:
    options: dict[str, Any] = {"shadow_every": 5, "min_shadow_agreement": "95%",
                               "shadow_min_frames": 30, "min_sample": 3, **kw}
    return make_spec(**options)


def stage_devices(n: int = 4) -> list[Any]:
    return [dev(i, PEND, started=None) for i in range(n)] + [
        dev("later-0", PEND, stage=1, started=None)]


def run(spec: RolloutSpec, reports: dict[str, ShadowReport], **status: Any) -> Any:
    base = facts(spec, stage_devices(), **status)
    return decide(RolloutFacts(base.rollout_id, spec, base.status, base.devices, reports), NOW)


def test_shadow_phase_holds_installs_and_names_the_devices_to_shadow() -> None:
    d = run(shadow_spec(), {}, stage_started=NOW - timedelta(minutes=10))
    assert d.kind is K.WAIT
    assert d.start == ()
    assert sorted(d.shadow) == [f"rpi4-{i:03d}" for i in range(4)]
    expected = "shadow_agreement on profile rpi4: waiting for shadow results from 3 more"
    assert any(expected in w for w in d.waiting)


def test_agreeing_candidate_passes_the_phase_then_installs_start() -> None:
    spec = shadow_spec()
    d = run(spec, {f"rpi4-{i:03d}": report() for i in range(3)})
    assert d.kind is K.SHADOW_PASSED
    assert d.status.shadow_done == 0 and d.status.state is RolloutState.RUNNING
    assert "shadow passed" in d.reason and "1200 of 1200 frames agree on 3 devices" in d.reason
    after = run(spec, {}, shadow_done=0)
    assert after.kind is K.WAIT and len(after.start) == 4 and after.shadow == ()


def test_one_class_disagreeing_pauses_and_names_the_class() -> None:
    reports = {f"rpi4-{i:03d}": report(wrong={2: 60}) for i in range(3)}
    d = run(shadow_spec(), reports)
    assert d.kind is K.PAUSE and d.status.shadow_tripped
    names = {(g.name, g.subject) for g in d.tripped}
    assert (SHADOW_CLASS_AGREEMENT, "class 'c2'") in names
    assert "for class 'c2': 40.0% < minimum 95.0%" in d.reason
    assert "the candidate said 'c3' on 180" in d.reason
    # Overall 85% trips too; classes that agree are not listed as tripped.
    assert {g.subject for g in d.tripped if g.name == SHADOW_CLASS_AGREEMENT} == {"class 'c2'"}
    resumed = apply_action(d.status, Action.RESUME, NOW, 2)
    assert resumed.shadow_done == 0 and not resumed.shadow_tripped
    assert "shadow result accepted" in resumed.reason


def with_rare(agreed: int, frames: int) -> ShadowReport:
    """A healthy report plus ``frames`` frames of c3, ``agreed`` of which agree."""
    base = report(per_class=100)
    pairs = dict(base.pairs)
    del pairs[(3, 3)]
    if agreed:
        pairs[(3, 3)] = agreed
    if frames - agreed:
        pairs[(3, 0)] = frames - agreed
    shadowed = sum(pairs.values())
    return replace(base, pairs=pairs, shadowed=shadowed,
                   agreed=sum(v for (i, j), v in pairs.items() if i == j))


def test_a_rare_class_needs_the_floor_or_overwhelming_evidence() -> None:
    # 12 of 15 frames over three devices (80%): under the 30-frame floor, not judged.
    d = run(shadow_spec(), {f"rpi4-{i:03d}": with_rare(4, 5) for i in range(3)})
    assert d.kind is K.SHADOW_PASSED
    assert "1 classes under 30 frames not judged" in " ".join(g.detail for g in d.gates)
    # At 30 frames it is judged on its value, and 80% < 95% trips.
    d = run(shadow_spec(), {f"rpi4-{i:03d}": with_rare(8, 10) for i in range(3)})
    assert d.kind is K.PAUSE and "for class 'c3': 80.0%" in d.reason
    # A collapse cannot hide under the floor: 0 of 6 frames is overwhelming evidence.
    d = run(shadow_spec(), {f"rpi4-{i:03d}": with_rare(0, 2) for i in range(3)})
    assert d.kind is K.PAUSE and "for class 'c3': 0.0%" in d.reason
    assert "under 30 frames, but at most" in d.reason


def test_the_evidence_bound() -> None:
    assert agreement_upper_bound(0, 6) < 0.7
    assert agreement_upper_bound(12, 15) > 0.95  # 80% of 15 could still be a 95% class
    assert agreement_upper_bound(4, 4) > 0.999 and agreement_upper_bound(0, 0) == 1.0


def test_after_the_stage_timeout_a_profile_is_judged_on_the_devices_that_reported() -> None:
    early = NOW - timedelta(minutes=10)
    one = {"rpi4-000": report(wrong={2: 60})}
    assert run(shadow_spec(), one, stage_started=early).kind is K.WAIT  # wants 3 devices
    assert run(shadow_spec(), one).kind is K.PAUSE  # the 1h timeout is over: judged on one
    d = run(shadow_spec(), {})  # nobody could shadow (old agents): said, not held for ever
    assert d.kind is K.SHADOW_PASSED
    assert "not judged: none of 4 devices reported shadow results" in d.reason


def test_too_few_frames_waits() -> None:
    tiny = ShadowReport(shadowed=5, agreed=5, pairs={(0, 0): 5}, labels=LABELS)
    d = run(shadow_spec(), {f"rpi4-{i:03d}": tiny for i in range(3)})
    assert d.kind is K.WAIT
    assert any("waiting for 15 more shadow frames" in w for w in d.waiting)


def test_a_candidate_that_cannot_run_pauses_naming_the_device() -> None:
    reports = {f"rpi4-{i:03d}": report() for i in range(3)}
    reports["rpi4-003"] = ShadowReport(error="candidate has 5 classes, serving model 4")
    d = run(shadow_spec(), reports)
    assert d.kind is K.PAUSE
    error = next(g for g in d.tripped if g.name == SHADOW_ERROR)
    assert error.devices == ("rpi4-003",) and "5 classes" in error.detail


def test_without_shadow_nothing_changes() -> None:
    d = run(make_spec(min_sample=3), {})
    assert d.shadow == () and len(d.start) == 4


def test_paused_rollout_shadows_nobody() -> None:
    d = run(shadow_spec(), {}, state=RolloutState.PAUSED)
    assert d.kind is K.NONE and d.shadow == ()


def test_overall_gate_value_and_limit() -> None:
    folded = fold({"a": report(wrong={0: 10}), "b": report()})
    assert folded.shadowed == 800 and folded.agreed == 790
    assert folded.classes[0].agreed == 190 and folded.classes[0].confused_with == "c1"
    d = run(shadow_spec(min_shadow_agreement="99%"),
            {f"rpi4-{i:03d}": report(wrong={0: 4}) for i in range(3)})
    overall = next(g for g in d.gates if g.name == SHADOW_AGREEMENT)
    assert overall.value == pytest.approx(99.0) and overall.limit == 99.0
    assert not overall.tripped  # 99.0% is at the limit


def test_spec_round_trip_and_bad_input() -> None:
    spec = shadow_spec(shadow_cpu_budget="10%")
    again = RolloutSpec.from_json(spec.to_json())
    assert again.shadow == ShadowLimits(5, Fraction(95, 100), 30, Fraction(1, 10))
    for bad in ({"every_n": 0}, {"every_n": 10**6}, {"min_agreement": "120%"},
                {"cpu_budget": "0%"}, {"min_class_frames": "x"}):
        with pytest.raises(InvalidInputError):
            ShadowLimits.from_json(bad)


GOOD_WINDOW = {"rollout_id": "r1", "frames": 50, "shadowed": 10, "skipped": 2, "agreed": 9,
               "pairs": [[0, 0, 9], [1, 0, 1]], "labels": ["a", "b"],
               "candidate_latency_ms": {"p50": 1.0, "p95": 2.0, "max": 3.0},
               "serving_latency_ms": {"p50": 1.0, "p95": 1.5}, "candidate_mj": 0.4,
               "error": None}


def test_window_parses_and_sums() -> None:
    w = parse_window(GOOD_WINDOW)
    assert w.pairs == {(0, 0): 9, (1, 0): 1} and w.candidate_p95_ms == 2.0
    total = ShadowReport().add(w).add(w)
    assert total.shadowed == 20 and total.pairs[(1, 0)] == 2 and total.skipped == 4


@pytest.mark.parametrize("change", [
    {"pairs": [[0, 0, 9]]},  # does not add up to shadowed
    {"agreed": 10},
    {"pairs": [[0, 5, 9], [1, 0, 1]]},  # index beyond the labels
    {"pairs": [[0, 0, -1]]},
    {"shadowed": True},
    {"rollout_id": ""},
    {"labels": "ab"},
    {"pairs": [[0, 0]]},
])
def test_malformed_windows_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        parse_window({**GOOD_WINDOW, **change})


def test_the_phase_lasts_its_duration_before_passing_but_trips_at_once() -> None:
    good = {f"rpi4-{i:03d}": report() for i in range(3)}
    spec = shadow_spec(shadow_duration="1h")
    d = run(spec, good, stage_started=NOW - timedelta(minutes=20))
    assert d.kind is K.WAIT and "shadow phase: 40m left" in d.waiting
    assert len(d.shadow) == 4 and d.start == ()
    bad = {f"rpi4-{i:03d}": report(wrong={1: 50}) for i in range(3)}
    assert run(spec, bad, stage_started=NOW - timedelta(minutes=20)).kind is K.PAUSE

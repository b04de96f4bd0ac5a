"""The field-accuracy math, table-tested: results parsing, PSI with smoothing, verdicts."""

from __future__ import annotations

import math
from typing import Any

import pytest

from server.telemetry import accuracy
from server.telemetry.accuracy import ResultsError, hist_psi, parse_results, psi, status

UNIFORM = {str(i): 0.1 for i in range(10)}
GOOD = {"model": "digits", "release": 1, "slot": "a",
        "class_counts": {"3": 5, "7": 2}, "confidence_hist": [0] * 8 + [1, 6]}  # fmt: skip


def counts(**by_label: int) -> dict[str, int]:
    return {label.lstrip("c"): n for label, n in by_label.items()}


@pytest.mark.parametrize(
    ("observed", "reference", "low", "high", "worst"),
    [
        ({str(i): 100 for i in range(10)}, UNIFORM, 0.0, 1e-9, None),  # identical
        ({str(i): 105 if i < 5 else 95 for i in range(10)}, UNIFORM, 0.0, 0.01, None),  # noise
        ({**{str(i): 100 for i in range(10)}, "3": 250}, UNIFORM, 0.1, 0.25, "3"),  # watch
        ({**{str(i): 100 for i in range(10)}, "3": 1000}, UNIFORM, 0.25, 5.0, "3"),  # drift
        ({**{str(i): 100 for i in range(10)}, "4": 0}, UNIFORM, 0.25, 5.0, "4"),  # class gone
        ({"0": 500, "1": 500}, {"0": 0.5, "1": 0.5, "2": 0.0}, 0.0, 0.01, None),  # empty bin
        ({"0": 500, "1": 300, "2": 200}, {"0": 0.5, "1": 0.5}, 0.25, 5.0, "2"),  # new class
    ],
)
def test_psi_table(observed: dict[str, int], reference: dict[str, float], low: float,
                   high: float, worst: str | None) -> None:  # fmt: skip
    result = psi(observed, reference)
    assert low <= result.value < high
    assert math.isfinite(result.value)
    assert all(v >= 0 for v in result.contributions.values())
    assert result.value == pytest.approx(sum(result.contributions.values()), abs=1e-5)
    if worst is not None:
        assert result.worst == worst


def test_psi_matches_the_textbook_formula_on_unsmoothed_bins() -> None:
    observed, reference = {"a": 6000, "b": 4000}, {"a": 0.5, "b": 0.5}
    expected = (0.6 - 0.5) * math.log(0.6 / 0.5) + (0.4 - 0.5) * math.log(0.4 / 0.5)
    assert psi(observed, reference).value == pytest.approx(expected, rel=1e-3)


def test_psi_of_nothing_is_zero() -> None:
    assert psi({}, UNIFORM).value == 0.0
    assert psi({"1": 5}, {}).value == 0.0


@pytest.mark.parametrize(
    ("value", "n", "verdict"),
    [(0.0, 1000, "stable"), (0.099, 1000, "stable"), (0.1, 1000, "watch"),
     (0.249, 1000, "watch"), (0.25, 1000, "drift"), (3.0, 1000, "drift"),
     (3.0, 199, "insufficient"), (None, 1000, "insufficient")],
)  # fmt: skip
def test_thresholds(value: float | None, n: int, verdict: str) -> None:
    assert status(value, n) == verdict


def test_confidence_histogram_psi_names_the_bin() -> None:
    reference = [0.0] * 8 + [0.1, 0.9]
    fogged = [0, 0, 50, 300, 300, 200, 100, 50, 0, 0]
    result = hist_psi(fogged, reference)
    assert result.value > accuracy.PSI_DRIFT
    assert result.worst == "0.9"  # the confident bin the fog emptied
    assert hist_psi([0] * 8 + [100, 900], reference).value < accuracy.PSI_WATCH


def test_drift_report_and_no_reference() -> None:
    shifted = {**{str(i): 100 for i in range(10)}, "8": 2000}
    report, reason = accuracy.drift(shifted, [0] * 9 + [2900], {
        "class_freq": UNIFORM, "confidence_hist": [0.0] * 9 + [1.0],
    })  # fmt: skip
    assert reason is None and report is not None
    assert report["status"] == "drift" and report["worst_class"] == "8"
    assert report["confidence_status"] == "stable"
    assert report["inferences"] == 2900
    assert accuracy.drift(shifted, [0] * 10, None)[0] is None
    none, why = accuracy.drift(shifted, [0] * 10, {"class_freq": "x"})
    assert none is None and why is not None and "--validation" in why
    few, _ = accuracy.drift({"1": 10}, [0] * 9 + [10], {"class_freq": UNIFORM,
                                                        "confidence_hist": [0.1] * 10})  # fmt: skip
    assert few is not None and few["status"] == "insufficient" and few["worst_class"] is None


def test_mean_confidence_from_bin_midpoints() -> None:
    assert accuracy.mean_confidence([0] * 10) is None
    assert accuracy.mean_confidence([0] * 9 + [4]) == pytest.approx(0.95)
    assert accuracy.mean_confidence([1] + [0] * 8 + [1]) == pytest.approx(0.5)


def test_a_good_window_parses_and_drops_zero_counts() -> None:
    window = parse_results({**GOOD, "class_counts": {"3": 5, "7": 2, "9": 0}})
    assert window.class_counts == {"3": 5, "7": 2}
    assert window.inferences == 7 and window.release == 1 and window.model == "digits"


@pytest.mark.parametrize(
    "change",
    [
        {"release": "1"}, {"release": 0}, {"release": True}, {"model": ""}, {"model": 5},
        {"model": "m" * 65}, {"class_counts": [1, 2]}, {"class_counts": {"3": -1}},
        {"class_counts": {"3": 1.5}}, {"class_counts": {"3": True}},
        {"class_counts": {"3": 10**10}}, {"class_counts": {"": 1}},
        {"class_counts": {"x" * 65: 1}}, {"class_counts": {"a\nb": 1}},
        {"class_counts": {str(i): 1 for i in range(4097)}},
        {"confidence_hist": [0] * 9}, {"confidence_hist": "0" * 10},
        {"confidence_hist": [0] * 9 + [-1]}, {"confidence_hist": [0] * 9 + [100]},
        {"confidence_hist": None},
    ],
)  # fmt: skip
def test_garbage_windows_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ResultsError):
        parse_results({**GOOD, **change})


@pytest.mark.parametrize("payload", [None, [], "results", {"top1": "3", "count": 7}])
def test_not_a_window_at_all(payload: Any) -> None:
    with pytest.raises(ResultsError):
        parse_results(payload)


def test_merged_counts_stay_bounded() -> None:
    full = {str(i): 1 for i in range(accuracy.MAX_LABELS)}
    merged = accuracy.merge_counts(full, {"0": 2, "new": 5})
    assert len(merged) == accuracy.MAX_LABELS and merged["0"] == 3 and "new" not in merged
    assert accuracy.merge_counts({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}

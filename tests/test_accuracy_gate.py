"""The pure accuracy gate and the confusion-matrix helpers, table-driven, no IO."""

from __future__ import annotations

import numpy as np
import pytest

from agent.inference.confusion import (
    class_totals,
    confusion_changes,
    confusion_matrix,
    overall_accuracy,
    per_class_accuracy,
)
from server.publish.accuracy_gate import (
    KEEP_FLOAT,
    MIXED_OR_QAT,
    SHIP,
    GateConfig,
    judge_counts,
    judge_matrices,
)

LABELS = ("cat", "dog", "fox", "owl")

# (case, samples per class, reference correct, candidate correct, decision, failed classes)
CASES = [
    ("identical", [100, 100, 100, 100], [95, 90, 98, 99], [95, 90, 98, 99], SHIP, []),
    ("better", [100, 100, 100, 100], [95, 90, 98, 99], [96, 91, 98, 99], SHIP, []),
    ("exactly 1 point", [100, 100, 100, 100], [95, 90, 98, 99], [94, 89, 97, 98], SHIP, []),
    ("1.75 points", [100, 100, 100, 100], [95, 90, 98, 99], [93, 89, 96, 97], MIXED_OR_QAT, []),
    ("exactly 3 points", [100, 100, 100, 100], [95, 90, 98, 99], [92, 87, 95, 96], MIXED_OR_QAT,
     []),
    ("4 points", [100, 100, 100, 100], [95, 90, 98, 99], [91, 86, 94, 95], KEEP_FLOAT,
     list(LABELS)),
    # One tolerated flip per small class still adds up overall.
    ("10 points in one flip each", [10] * 4, [10] * 4, [9] * 4, KEEP_FLOAT, []),
    # A rare class that collapses: 0.74 points overall, but every owl lost.
    ("rare collapse", [133, 133, 134, 3], [130, 130, 130, 3], [130, 130, 130, 0], MIXED_OR_QAT,
     ["owl"]),
    # One flip in a class of three is 33 points but only one sample: tolerated.
    ("rare class loses one", [133, 133, 134, 3], [130, 130, 130, 3], [130, 130, 130, 2], SHIP, []),
    ("rare class loses two", [133, 133, 134, 3], [130, 130, 130, 3], [130, 130, 130, 1],
     MIXED_OR_QAT, ["owl"]),
    # 3 points of 100 samples is 3 samples; a fourth is too many.
    ("big class loses 3", [100, 300, 300, 300], [99, 290, 290, 290], [96, 290, 290, 290], SHIP,
     []),
    ("big class loses 4", [100, 300, 300, 300], [99, 290, 290, 290], [95, 290, 290, 290],
     MIXED_OR_QAT, ["cat"]),
    # Nothing right in FP32 either: nothing to collapse.
    ("hopeless class", [100, 100, 100, 2], [95, 95, 95, 0], [95, 95, 95, 0], SHIP, []),
    # A single-sample class the candidate now gets wrong has lost all it had.
    ("single sample lost", [100, 100, 100, 1], [95, 95, 95, 1], [95, 95, 95, 0], MIXED_OR_QAT,
     ["owl"]),
    ("two classes fail and overall", [50, 50, 50, 50], [50, 50, 50, 50], [40, 50, 45, 50],
     KEEP_FLOAT, ["cat", "fox"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("n", "ref", "cand", "decision", "failed"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decision_table(
    n: list[int], ref: list[int], cand: list[int], decision: str, failed: list[str]
) -> None:
    verdict = judge_counts(LABELS, n, ref, cand)
    assert verdict.decision == decision
    assert list(verdict.failed_classes) == failed
    assert verdict.passed == (decision == SHIP)
    assert [c.label for c in verdict.per_class] == [LABELS[i] for i in range(4) if n[i]]
    data = verdict.to_json()
    assert data["decision"] == decision and data["failed_classes"] == failed
    assert {"reference", "candidate", "drop"} <= set(data["overall"])
    if failed:
        assert any(label in reason for reason in data["reasons"] for label in failed)


def test_every_class_in_the_set_is_reported_and_absent_ones_listed() -> None:
    verdict = judge_counts(LABELS, [10, 0, 5, 1], [10, 0, 5, 1], [10, 0, 5, 1])
    assert [c.label for c in verdict.per_class] == ["cat", "fox", "owl"]
    assert verdict.untested == ("dog",)
    assert verdict.to_json()["untested_classes"] == ["dog"]


def test_class_numbers_in_points_and_samples() -> None:
    verdict = judge_counts(LABELS, [133, 133, 134, 3], [130, 130, 130, 3], [130, 130, 130, 0])
    owl = verdict.per_class[3].to_json()
    assert owl == {
        "label": "owl", "n": 3, "reference": 100.0, "candidate": 0.0, "drop": 100.0,
        "lost": 3, "allowed_loss": 1, "failed": True, "reason": owl["reason"],
    }  # fmt: skip
    assert "collapsed" in owl["reason"]
    assert round(verdict.drop, 2) == 0.74


def test_limits_are_configurable() -> None:
    strict = GateConfig(max_drop=0.0, max_class_drop=0.0, class_tolerance=0)
    verdict = judge_counts(LABELS, [100] * 4, [90] * 4, [90, 90, 90, 89], strict)
    assert verdict.decision == MIXED_OR_QAT and verdict.failed_classes == ("owl",)
    loose = GateConfig(max_drop=5.0, max_class_drop=50.0, keep_float_drop=10.0)
    assert judge_counts(LABELS, [10] * 4, [10] * 4, [8, 10, 10, 10], loose).decision == SHIP


@pytest.mark.parametrize(
    "kwargs",
    [{"max_drop": -1.0}, {"max_class_drop": float("nan")}, {"max_drop": 4.0},
     {"class_tolerance": -1}, {"class_tolerance": 1.5}, {"max_drop": True}],
)  # fmt: skip
def test_bad_limits_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GateConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "ref", "cand"),
    [([1, 2], [1, 2], [1, 2]), ([0, 0, 0, 0], [0] * 4, [0] * 4), ([2] * 4, [3, 0, 0, 0], [0] * 4)],
)
def test_inconsistent_counts_are_refused(n: list[int], ref: list[int], cand: list[int]) -> None:
    with pytest.raises(ValueError):
        judge_counts(LABELS, n, ref, cand)


def test_rank_key_orders_candidates_best_first() -> None:
    n, ref = [100] * 4, [95] * 4
    ship = judge_counts(LABELS, n, ref, [95, 95, 95, 94])
    ship_worse = judge_counts(LABELS, n, ref, [95, 95, 94, 93])
    one_class = judge_counts(LABELS, n, ref, [95, 95, 95, 85])
    two_classes = judge_counts(LABELS, n, ref, [85, 95, 95, 85])
    ranked = sorted([two_classes, one_class, ship_worse, ship], key=lambda v: v.rank_key())
    assert ranked == [ship, ship_worse, one_class, two_classes]


def test_judge_matrices_from_predictions() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3])
    reference = confusion_matrix(truth, truth, 4)
    candidate = confusion_matrix(truth, np.array([0, 0, 1, 1, 2, 2, 0, 0, 0]), 4)
    verdict = judge_matrices(LABELS, reference, candidate)
    assert verdict.failed_classes == ("owl",)
    with pytest.raises(ValueError, match="different samples"):
        judge_matrices(LABELS, reference, confusion_matrix(truth[:-1], truth[:-1], 4))


def test_confusion_matrix_and_accuracies() -> None:
    m = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    n, correct = class_totals(m)
    assert n.tolist() == [2, 1, 3, 0] and correct.tolist() == [1, 1, 2, 0]
    acc = per_class_accuracy(m)
    assert acc[:3].tolist() == [0.5, 1.0, 2 / 3] and np.isnan(acc[3])
    assert overall_accuracy(m) == pytest.approx(4 / 6)
    assert np.isnan(overall_accuracy(np.zeros((2, 2), np.int64)))


def test_confusion_changes_put_new_confusions_first() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    before = confusion_matrix(truth, np.array([0, 0, 0, 1, 1, 2]), 3)
    after = confusion_matrix(truth, np.array([2, 2, 0, 1, 0, 2]), 3)
    changes = confusion_changes(before, after)
    assert [(c.true_index, c.predicted_index, c.delta) for c in changes] == [
        (0, 2, 2), (1, 0, 1), (1, 1, -1), (0, 0, -2),
    ]  # fmt: skip
    assert changes[0].to_json(("a", "b", "c")) == {
        "true": "a", "predicted": "c", "before": 0, "after": 2, "delta": 2,
    }  # fmt: skip
    assert confusion_changes(before, after, limit=1) == changes[:1]
    assert confusion_changes(before, before) == []


@pytest.mark.parametrize(
    ("truth", "predicted", "classes"),
    [([0, 1], [0], 2), ([0, 2], [0, 1], 2), ([0, -1], [0, 1], 2), ([0.0, 1.0], [0, 1], 2),
     ([0], [0], 0)],
)  # fmt: skip
def test_confusion_matrix_refuses_bad_input(
    truth: list[float], predicted: list[int], classes: int
) -> None:
    with pytest.raises(ValueError):
        confusion_matrix(truth, predicted, classes)

"""The accuracy gate at publish: a release against its FP32 original, on a validation set.

It is ``edgefleet model validate`` (``server.publish.quantize_eval``) run on the
uploaded files, with two differences that make it the release's own verdict:

- both models are fed through the contract the release is signed with, pinned
  as explicit options, so neither model's TFLite Metadata can change it;
- the labels are the release's labels.

A refusal is a ``GateRefusedError`` naming the decision and the failed classes,
unless the operator gives an override reason, which is then recorded. Beside the
verdict, the report carries the release's reference distributions on the
validation set: how often the candidate predicts each class, and its top-1
confidence histogram overall and per predicted class, in the same bins as the
agent's telemetry windows, so drift on a device can be measured against them
without labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.inference.classifier import Ranking
from agent.inference.runtime import Model
from agent.protocol.input_contract import InputContract
from agent.protocol.input_options import ContractOptions
from server.db.tables import utcnow
from server.errors import InvalidInputError, ModelValidationError
from server.publish.accuracy_gate import GateConfig
from server.publish.quantize_data import ModelInput, load_set, model_pixels
from server.publish.quantize_eval import (
    ValidateRequest,
    ValidateResult,
    classes_of,
    open_model,
    validate_candidate,
)
from server.publish.registry import INTEGER_VARIANTS
from server.publish.reports import OVERRIDE_BY, GateSummary, Override

log = logging.getLogger(__name__)

MAX_VALIDATION_BYTES = 256 * 1024 * 1024  # arrays as stored: the set is decoded in memory
CONFIDENCE_BINS = 10  # as the agent bins top-1 scores: 0.1 wide, 1.0 in the last bin
GATE_THREADS = 2
MAX_OVERRIDE_CHARS = 500


@dataclass(frozen=True)
class GateRequest:
    """The FP32 original and the validation set (local files), the limits and any override."""

    fp32: Path
    validation: Path
    config: GateConfig = field(default_factory=GateConfig)
    override: str | None = None


@dataclass(frozen=True)
class GateOutcome:
    report: dict[str, Any]
    summary: GateSummary


class GateRefusedError(InvalidInputError):
    """The gate refused the release and no override was given."""

    def __init__(self, message: str, decision: str, failed_classes: Sequence[str]) -> None:
        super().__init__(message)
        self.decision = decision
        self.failed_classes = tuple(failed_classes)


def check_override(reason: str | None) -> str | None:
    """The override reason, stripped; InvalidInputError when it says nothing."""
    if reason is None:
        return None
    text = reason.strip()
    if not text or len(text) > MAX_OVERRIDE_CHARS or not text.isprintable():
        raise InvalidInputError(
            f"an override reason must be printable text of 1 to {MAX_OVERRIDE_CHARS} characters"
        )
    return text


def gate_config_from(max_drop: float | None, max_class_drop: float | None) -> GateConfig:
    """The limits an operator gave (None: the rule's 1 and 3 points), or InvalidInputError."""
    drop = 1.0 if max_drop is None else max_drop
    try:  # keep-float stays at the rule's 3 points unless max_drop is above it
        return GateConfig(
            max_drop=drop,
            keep_float_drop=max(3.0, drop),
            max_class_drop=3.0 if max_class_drop is None else max_class_drop,
        )
    except ValueError as err:
        raise InvalidInputError(str(err)) from err


def pinned_options(contract: InputContract) -> ContractOptions:
    """Options that resolve to exactly ``contract`` whatever a model's metadata says."""
    return ContractOptions(
        value_range=contract.value_range, mean=contract.mean, std=contract.std,
        resize=contract.resize, pad=contract.pad if contract.resize == "letterbox" else None,
        crop=contract.crop, color=contract.color,
    )  # fmt: skip


def _check_size(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            size = sum(info.file_size for info in zf.infolist())
    except (OSError, zipfile.BadZipFile):
        return  # load_set says what is wrong with it
    if size > MAX_VALIDATION_BYTES:
        raise InvalidInputError(
            f"validation set {path} holds {size} bytes of arrays; the limit is "
            f"{MAX_VALIDATION_BYTES}"
        )


def _digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "length": path.stat().st_size}


def candidate_outputs(model: Model, contract: InputContract, validation: Path) -> (
    tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]
):  # fmt: skip
    """Top-1 class and its dequantized score for every image, as the device computes them."""
    data = load_set(validation, "validation", classes_of(model))
    pixels = model_pixels(contract, model.input, data.x)
    mapping = ModelInput(contract, model.input)
    out = model.output
    ranking = Ranking((), 1, out.zero_point, out.scale if out.is_quantized else 0.0)
    predicted = np.empty(len(pixels), np.int64)
    scores = np.empty(len(pixels), np.float64)
    for i, image in enumerate(pixels):
        raw = model.invoke_raw(mapping.tensor(image)).reshape(-1)
        best = int(raw.argmax())  # the first maximum, as InferenceEngine picks it
        predicted[i], scores[i] = best, ranking.score(raw.item(best))
    return predicted, scores


def _histogram(bins: npt.NDArray[np.int64]) -> list[float]:
    if not len(bins):
        return [0.0] * CONFIDENCE_BINS
    counts = np.bincount(bins, minlength=CONFIDENCE_BINS)
    return [round(float(c) / len(bins), 6) for c in counts]


def reference_distributions(
    predicted: npt.NDArray[np.int64], scores: npt.NDArray[np.float64], labels: Sequence[str]
) -> dict[str, Any]:
    """Predicted-class frequencies and top-1 confidence histograms (fractions, summing to 1).

    A class never predicted has frequency 0 and an all-zero histogram.
    """
    bins = np.clip(np.trunc(scores * CONFIDENCE_BINS), 0, CONFIDENCE_BINS - 1).astype(np.int64)
    counts = np.bincount(predicted, minlength=len(labels))
    n = max(len(predicted), 1)
    return {
        "samples": len(predicted),
        "bin_edges": [round(i / CONFIDENCE_BINS, 2) for i in range(CONFIDENCE_BINS + 1)],
        "class_counts": {label: int(counts[i]) for i, label in enumerate(labels)},
        "class_freq": {label: round(float(counts[i]) / n, 6) for i, label in enumerate(labels)},
        "confidence_hist": _histogram(bins),
        "per_class_confidence_hist": {
            label: _histogram(bins[predicted == i]) for i, label in enumerate(labels)
        },
    }


def _refusal(what: str, result: ValidateResult) -> GateRefusedError:
    failed = list(result.verdict.failed_classes) if result.verdict is not None else []
    message = (
        f"accuracy gate refused {what}: {result.decision}, failed classes: "
        f"{', '.join(failed) or 'none'} (give an override reason to publish it anyway); "
        f"{result.summary()}"
    )
    return GateRefusedError(" ".join(message.split()), result.decision, failed)


def run_gate(
    model: Path, req: GateRequest, *, contract: InputContract | None, labels: Sequence[str],
    variant: str, what: str,
) -> GateOutcome:  # fmt: skip
    """Judge ``model`` (the release file) against ``req.fp32``; raise GateRefusedError on a
    refusal without an override."""
    if contract is None:
        raise InvalidInputError(
            "the accuracy gate needs an image classifier with an input contract"
        )
    _check_size(req.validation)
    override_reason = check_override(req.override)
    # fp32 takes float tensors: score it as a mixed int8-cpu model and drop the variant check.
    check, allow_float = INTEGER_VARIANTS.get(variant, ("int8-cpu", True))
    candidate = open_model(model, GATE_THREADS)
    try:
        classes = classes_of(candidate)
        names = tuple(labels) or tuple(str(i) for i in range(classes))
        if len(names) != classes:
            raise ModelValidationError(
                f"{len(names)} labels given but output 0 has {classes} classes"
            )
        with tempfile.TemporaryDirectory(prefix="edgefleet-gate-") as tmp:
            labels_file = Path(tmp) / "labels.txt"
            labels_file.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
            result = validate_candidate(ValidateRequest(
                candidate=model, reference=req.fp32, validation=req.validation,
                labels=labels_file, options=pinned_options(contract), variant=check,
                gate=req.config, allow_float_ops=allow_float, threads=GATE_THREADS,
            ))  # fmt: skip
        problems = result.variant_problems if variant in INTEGER_VARIANTS else ()
        result = dataclasses.replace(result, variant=variant, variant_problems=problems)
        override = None
        if not result.passed:
            if override_reason is None:
                raise _refusal(what, result)
            override = Override(override_reason, OVERRIDE_BY, utcnow())
            log.warning("accuracy gate overridden for %s: %s", what, result.summary())
        predicted, scores = candidate_outputs(candidate, contract, req.validation)
    finally:
        candidate.close()
    report = result.to_json()
    report.update(
        summary=result.summary(),
        override=None if override is None else override.to_json(),
        reference=reference_distributions(predicted, scores, names),
        fp32=_digest(req.fp32),
        validation={**_digest(req.validation), "samples": len(predicted)},
    )
    log.info("accuracy gate for %s: %s", what, result.summary())
    return GateOutcome(report, GateSummary.from_report(report, result.summary(), override))

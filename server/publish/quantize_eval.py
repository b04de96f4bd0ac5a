"""Models scored on a validation set with the device's runtime, and the gate run on files.

Every model is loaded with ``agent.inference.runtime`` (LiteRT) and fed through
its own value table from the contract (``agent.inference.preprocess``), so an
INT8 candidate is judged on the int8 tensors a camera would give it. The top-1
class is the first of the highest raw outputs, as ``InferenceEngine`` picks it.
``validate_candidate`` is ``edgefleet model validate``: a candidate against its
FP32 reference, with the pure gate of ``server.publish.accuracy_gate``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import AgentError, ModelError
from agent.inference.confusion import confusion_changes, confusion_matrix
from agent.inference.runtime import Model, load_model
from agent.protocol.input_contract import InputContract
from agent.protocol.input_options import ContractOptions
from server.errors import ModelValidationError, ServerError
from server.publish.accuracy_gate import WRONG_VARIANT, GateConfig, GateVerdict, judge_matrices
from server.publish.quantize_data import ModelInput, load_set, model_pixels, read_labels, resolve
from server.publish.quantize_graph import Graph

log = logging.getLogger(__name__)

CONFUSION_CHANGES = 20  # cells listed in reports
Progress = Callable[[int], None]


def open_model(path: Path, threads: int = 1) -> Model:
    """LiteRT, as the device loads it; a file that is not a model is bad input."""
    if not path.is_file():
        raise ModelValidationError(f"model {path} does not exist")
    try:
        return load_model(path, runtime="litert", num_threads=threads)
    except AgentError as err:
        raise ModelValidationError(str(err)) from err


def open_model_bytes(data: bytes, threads: int = 1) -> Model:
    """A candidate the quantizer made, read by LiteRT from a temporary file.

    It failing to load is the quantizer's fault, not the operator's input: a
    plain ServerError (exit 1), not a ModelValidationError (exit 2).
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-q-") as tmp:
        path = Path(tmp) / "candidate.tflite"
        path.write_bytes(data)
        try:
            return open_model(path, threads)
        except ModelValidationError as err:
            raise ServerError(f"the quantized candidate does not load in LiteRT: {err}") from err


def classes_of(model: Model) -> int:
    return int(np.prod(model.output.shape))


def predict(model: Model, contract: InputContract, pixels: npt.NDArray[np.uint8],
            progress: Progress | None = None) -> npt.NDArray[np.int64]:  # fmt: skip
    """Top-1 class of every image (``pixels`` already at the model's size)."""
    mapping = ModelInput(contract, model.input)
    out = np.empty(len(pixels), dtype=np.int64)
    for i, image in enumerate(pixels):
        out[i] = int(np.argmax(model.invoke_raw(mapping.tensor(image)).reshape(-1)))
        if progress is not None:
            progress(1)
    return out


def latency_ms(model: Model, contract: InputContract, pixels: npt.NDArray[np.uint8],
               runs: int) -> float:  # fmt: skip
    """Median wall time of ``runs`` invokes (after a short warm-up), in milliseconds."""
    tensor = ModelInput(contract, model.input).tensor(pixels[0])
    for _ in range(min(5, runs)):
        model.invoke_raw(tensor)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter_ns()
        model.invoke_raw(tensor)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


@dataclass(frozen=True)
class ValidateRequest:
    candidate: Path
    reference: Path
    validation: Path
    labels: Path
    options: ContractOptions = field(default_factory=ContractOptions)
    variant: str = "int8-cpu"
    gate: GateConfig = field(default_factory=GateConfig)
    allow_float_ops: bool = False
    threads: int = 1


@dataclass(frozen=True)
class ValidateResult:
    """The gate's verdict, or None when a wrong-variant candidate cannot even be fed frames."""

    verdict: GateVerdict | None
    variant: str
    variant_problems: tuple[str, ...]
    labels: tuple[str, ...]
    contract: InputContract
    changes: tuple[dict[str, Any], ...]

    @property
    def decision(self) -> str:
        if self.variant_problems or self.verdict is None:
            return WRONG_VARIANT
        return self.verdict.decision

    @property
    def passed(self) -> bool:
        return self.verdict is not None and self.verdict.passed and not self.variant_problems

    def to_json(self) -> dict[str, Any]:
        if self.verdict is not None:
            out = self.verdict.to_json()
        else:
            out = {
                "overall": None,
                "per_class": [],
                "failed_classes": [],
                "reasons": ["the candidate was not scored: its input cannot take camera frames"],
            }
        out["decision"] = self.decision
        out["passed"] = self.passed
        if self.variant_problems:
            out["reasons"] = [self.variant_message(), *out["reasons"]]
        out["variant"] = {"name": self.variant, "not_integer": list(self.variant_problems)}
        out["confusion_changes"] = list(self.changes)
        out["input_contract"] = self.contract.to_dict()
        return out

    def variant_message(self) -> str:
        shown = "; ".join(self.variant_problems[:6])
        more = len(self.variant_problems) - 6
        return f"not integer where {self.variant} needs it: {shown}" + (
            f" (and {more} more)" if more > 0 else ""
        )

    def summary(self) -> str:
        if self.variant_problems or self.verdict is None:
            return f"{WRONG_VARIANT}: {self.variant_message()}"
        return self.verdict.summary()


def validate_candidate(req: ValidateRequest, progress: Progress | None = None) -> ValidateResult:
    """Score both models on the validation set and apply the gate and the variant check."""
    graph = Graph.read(req.candidate)
    problems = tuple(graph.integer_problems(req.variant, req.allow_float_ops))
    candidate = open_model(req.candidate, req.threads)
    reference = open_model(req.reference, req.threads)
    if candidate.input.shape != reference.input.shape:
        raise ModelValidationError(
            f"candidate input {list(candidate.input.shape)} differs from the reference's "
            f"{list(reference.input.shape)}"
        )
    classes = classes_of(reference)
    if classes_of(candidate) != classes:
        raise ModelValidationError(
            f"candidate has {classes_of(candidate)} output classes, the reference {classes}"
        )
    labels = read_labels(req.labels, classes)
    data = load_set(req.validation, "validation", classes)
    # The reference's input spec: a candidate whose input takes no camera frames (int16, say)
    # is a wrong variant to refuse, not unreadable input.
    contract = resolve([req.candidate, req.reference], reference.input.to_spec(), req.options)
    pixels = model_pixels(contract, reference.input, data.x)
    assert data.y is not None
    ref_m = confusion_matrix(data.y, predict(reference, contract, pixels, progress), classes)
    try:
        cand_m = confusion_matrix(data.y, predict(candidate, contract, pixels, progress), classes)
    except ModelError:
        if not problems:
            raise
        return ValidateResult(None, req.variant, problems, labels, contract, ())
    verdict = judge_matrices(labels, ref_m, cand_m, req.gate)
    changes = tuple(c.to_json(labels) for c in confusion_changes(ref_m, cand_m, CONFUSION_CHANGES))
    log.info("validate %s: %s", req.candidate.name, verdict.summary())
    return ValidateResult(verdict, req.variant, problems, labels, contract, changes)

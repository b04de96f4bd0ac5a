"""``edgefleet model quantize``: FP32 .tflite in, gated INT8 .tflite and a report out.

Every input is checked before any work (``InvalidInputError``, one line, exit 2
in the CLI). Then: the FP32 reference is scored on the validation set through
the input contract; the FP32 model is run over the calibration set once for
activation statistics; the search (``quantize_search``) tries calibration
choices and, if needed, raises the precision of the worst ops; the chosen
model is written only when the gate passes. The report is written either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.atomic import atomic_write
from agent.inference.confusion import confusion_changes, confusion_matrix, per_class_accuracy
from agent.inference.value_tables import pixel_values
from agent.protocol.input_options import ContractOptions
from server.errors import InvalidInputError, ModelValidationError
from server.publish.accuracy_gate import GateConfig
from server.publish.quantize_data import ModelInput, load_set, model_pixels, read_labels, resolve
from server.publish.quantize_eval import (
    CONFUSION_CHANGES,
    classes_of,
    latency_ms,
    open_model,
    open_model_bytes,
    predict,
)
from server.publish.quantize_graph import VARIANTS, Graph
from server.publish.quantize_recipes import ActivationStats, FloatArray, fp32_activations
from server.publish.quantize_report import (
    FORMAT,
    REFUSE,
    decide,
    not_int8_ops,
    render_html,
    versions,
)
from server.publish.quantize_search import SearchBudget, SearchContext, SearchResult, search

log = logging.getLogger(__name__)

RANKING_SAMPLES = 32  # calibration images used to rank ops by int8 noise
Tick = Callable[[int], None]
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Tick]]


@contextlib.contextmanager
def no_progress(_desc: str, _total: int | None) -> Iterator[Tick]:
    yield lambda _n: None


@dataclass(frozen=True)
class QuantizeRequest:
    model: Path
    calibration: Path
    validation: Path
    labels: Path
    output: Path
    report: Path
    html: Path | None = None
    options: ContractOptions = field(default_factory=ContractOptions)
    target: str = "int8-cpu"
    gate: GateConfig = field(default_factory=GateConfig)
    budget: SearchBudget = field(default_factory=SearchBudget)
    threads: int = 1
    latency_runs: int = 50
    max_calibration: int = 500


@dataclass(frozen=True)
class QuantizeOutcome:
    decision: str  # ship, mixed or refuse
    reason: str
    report: dict[str, Any]
    wrote_model: bool

    @property
    def exit_code(self) -> int:
        return 3 if self.decision == REFUSE else 0


def _check_request(req: QuantizeRequest, *, graph: Graph) -> None:
    if req.target not in VARIANTS:
        raise InvalidInputError(f"--target {req.target!r} is not one of {', '.join(VARIANTS)}")
    for what, path in (("-o", req.output), ("--report", req.report), ("--html", req.html)):
        if path is not None and not path.parent.is_dir():
            raise InvalidInputError(f"{what} {path}: directory {path.parent} does not exist")
    quantized = graph.quantized_tensors()
    floats = [graph.tensors[i] for i in graph.inputs if graph.tensors[i].dtype != "float32"]
    if quantized or floats:
        t = (quantized or floats)[0]
        raise ModelValidationError(
            f"{req.model} is not an FP32 model: tensor {t.name!r} is {t.dtype}; quantize starts "
            "from the float model"
        )


def quantize_model(req: QuantizeRequest, progress: ProgressFactory = no_progress) -> (
    QuantizeOutcome
):  # fmt: skip
    """Check every input, search, write the model when the gate passes and the report always."""
    job = _Job(req)
    job.score_reference(progress)
    job.collect_statistics(progress)
    with progress("candidates", None) as tick:
        t = time.perf_counter()
        result = search(job.search_context(tick))
        job.timing["search"] = time.perf_counter() - t
    return job.finish(result)


class _Job:
    """One quantization run: its checked inputs, and what each step learned."""

    def __init__(self, req: QuantizeRequest) -> None:
        self.start = time.perf_counter()
        self.req = req
        self.graph = Graph.read(req.model)
        _check_request(req, graph=self.graph)
        self.fp32 = open_model(req.model, req.threads)
        classes = classes_of(self.fp32)
        self.labels = read_labels(req.labels, classes)
        self.cal = load_set(req.calibration, "calibration", classes, need_labels=False)
        val = load_set(req.validation, "validation", classes)
        self.contract = resolve([req.model], self.fp32.input.to_spec(), req.options)
        assert val.y is not None
        self.val, self.y = val, val.y
        self.fp32_bytes = req.model.read_bytes()
        self.timing: dict[str, float] = {"checks": time.perf_counter() - self.start}
        picks = np.linspace(0, len(self.cal) - 1, min(len(self.cal), req.max_calibration))
        chosen = np.unique(picks.round().astype(int))
        self.cal_pixels = model_pixels(self.contract, self.fp32.input, self.cal.x[chosen])
        self.val_pixels = model_pixels(self.contract, self.fp32.input, val.x)
        self.mapping = ModelInput(self.contract, self.fp32.input)
        values = pixel_values(self.contract)
        self.stats = ActivationStats(self.graph, (float(values.min()), float(values.max())))
        self.reference = np.zeros((classes, classes), np.int64)
        self.fp32_ms = 0.0

    def float_inputs(self, count: int) -> Iterator[FloatArray]:
        """Calibration images as the FP32 model's float input tensors, by the contract."""
        for image in self.cal_pixels[:count]:
            yield self.mapping.tensor(image)

    def score_reference(self, progress: ProgressFactory) -> None:
        t = time.perf_counter()
        with progress("FP32 reference", len(self.val_pixels)) as tick:
            predicted = predict(self.fp32, self.contract, self.val_pixels, tick)
        self.reference = confusion_matrix(self.y, predicted, len(self.labels))
        self.fp32_ms = latency_ms(self.fp32, self.contract, self.val_pixels, self.req.latency_runs)
        self.timing["reference"] = time.perf_counter() - t

    def collect_statistics(self, progress: ProgressFactory) -> None:
        t = time.perf_counter()
        inputs = self.float_inputs(len(self.cal_pixels))
        with progress("calibration", len(self.cal_pixels)) as tick:
            for tensors in fp32_activations(self.fp32_bytes, self.graph, inputs, self.req.threads):
                self.stats.add(tensors)
                tick(1)
        self.timing["calibration"] = time.perf_counter() - t

    def search_context(self, tick: Tick) -> SearchContext:
        req = self.req
        return SearchContext(
            self.fp32_bytes, self.graph, self.stats, self.contract, self.val_pixels, self.y,
            self.labels, self.reference, list(self.float_inputs(RANKING_SAMPLES)), self.fp32_ms,
            req.gate, req.budget, req.target, req.threads, tick,
        )  # fmt: skip

    def finish(self, result: SearchResult) -> QuantizeOutcome:
        req, chosen = self.req, result.chosen
        problems = chosen.graph.integer_problems(req.target, req.target == "int8-cpu")
        not_int8 = not_int8_ops(self.graph, chosen)
        decision, reason = decide(result, problems, not_int8)
        runtime = open_model_bytes(chosen.model, req.threads)
        int8_ms = latency_ms(runtime, self.contract, self.val_pixels, req.latency_runs)
        runtime.close()
        if decision != REFUSE:
            atomic_write(req.output, chosen.model)
        self.timing["total"] = time.perf_counter() - self.start
        report = {
            "format": FORMAT,
            "model": {"fp32": str(req.model), "labels": str(req.labels),
                      "output": str(req.output) if decision != REFUSE else None},
            "target": req.target,
            "decision": decision,
            "decision_reason": reason,
            "not_integer": problems,
            **self.accuracy_sections(chosen.verdict.to_json(), chosen.matrix),
            "size": {"fp32_bytes": len(self.fp32_bytes), "int8_bytes": len(chosen.model),
                     "ratio": round(len(chosen.model) / len(self.fp32_bytes), 4)},
            "latency_ms": {"fp32": round(self.fp32_ms, 4), "int8": round(int8_ms, 4),
                           "speedup": round(self.fp32_ms / int8_ms, 3) if int8_ms > 0 else None,
                           "runs": req.latency_runs, "threads": req.threads, "runtime": "litert"},
            "not_int8_ops": not_int8,
            "recipe": {**chosen.plan.to_json(self.graph),
                       "quantizer_recipe": json.loads(json.dumps(chosen.recipe, default=str))},
            "candidates": [c.to_json() for c in result.tried],
            "ranking": result.ranking,
            "search": {"stop_reason": result.stop_reason, "budget": req.budget.to_json()},
            "input_contract": self.contract.to_dict(),
            "calibration": {"file": str(req.calibration), "samples": len(self.cal),
                            "used": len(self.cal_pixels)},
            "validation": {"file": str(req.validation), "samples": len(self.val)},
            "timing": {f"seconds_{k}": round(v, 3) for k, v in self.timing.items()},
            "versions": versions(),
        }  # fmt: skip
        write_report(req, report)
        log.info("quantize %s: %s (%s)", req.model.name, decision, reason)
        return QuantizeOutcome(decision, reason, report, decision != REFUSE)

    def accuracy_sections(self, gate: dict[str, Any], matrix: Any) -> dict[str, Any]:
        def accuracy(m: Any) -> dict[str, Any]:
            per = per_class_accuracy(m)
            return {
                "overall": round(100.0 * float(np.trace(m)) / int(m.sum()), 3),
                "per_class": {self.labels[i]: round(100.0 * float(a), 3)
                              for i, a in enumerate(per) if not np.isnan(a)},
            }  # fmt: skip

        changes = confusion_changes(self.reference, matrix, CONFUSION_CHANGES)
        return {
            "gate": gate,
            "accuracy": {"fp32": accuracy(self.reference), "int8": accuracy(matrix)},
            "confusion_changes": [c.to_json(self.labels) for c in changes],
        }


def write_report(req: QuantizeRequest, report: dict[str, Any]) -> None:
    atomic_write(req.report, (json.dumps(report, indent=2) + "\n").encode())
    if req.html is not None:
        atomic_write(req.html, render_html(report).encode())

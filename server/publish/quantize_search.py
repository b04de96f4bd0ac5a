"""The accuracy-aware search: NNCF's loop, judged by the per-class gate.

1. Each calibration choice (a ``Plan`` with no raised op) is quantized and
   scored on the validation set; the best by the gate's ranking is kept (the
   loop stops early on one that loses nothing).
2. If it still fails the gate, the scale groups (``quantize_graph``) are ranked
   by the error int8 adds to their tensors: each FP32 activation of a few
   samples is rounded with the candidate's own scale and zero point, and the
   per-channel noise-to-signal ratio averaged (per channel, so one outlier
   channel that crushes the rest stands out).
3. The worst group is raised, int16 activations first, then float; a raise that
   improves the gate's ranking is kept, one that does not is undone; then the
   next group, until the gate passes or a budget (ops raised, size or latency
   against FP32) is spent. The Edge TPU runs int8 only, so for it the search
   ends after step 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.inference.confusion import confusion_matrix
from agent.protocol.input_contract import InputContract
from server.publish.accuracy_gate import GateConfig, GateVerdict, judge_matrices
from server.publish.quantize_eval import latency_ms, open_model_bytes, predict
from server.publish.quantize_graph import Graph, ScaleGroup
from server.publish.quantize_recipes import (
    LEVELS,
    ActivationStats,
    FloatArray,
    Plan,
    fp32_activations,
    quantizable_kinds,
    quantize,
)

log = logging.getLogger(__name__)

CALIBRATION_PLANS = (
    Plan("minmax"), Plan("ema"), Plan("percentile"), Plan("mse"), Plan("minmax", "mse"),
)  # fmt: skip
BUDGET_LATENCY_RUNS = 20
# Groups adding less than this share of the worst group's int8 noise are left alone: raising
# them costs size or speed and moves the score only by chance flips of single samples.
NOISE_FLOOR = 0.01
RANKING_SHOWN = 10
Tick = Callable[[int], None]


@dataclass(frozen=True)
class SearchBudget:
    max_raised_ops: int = 8
    max_size_ratio: float = 0.35  # of the FP32 file
    max_latency_ratio: float = 1.0  # of the FP32 model's median invoke, on this machine

    def to_json(self) -> dict[str, Any]:
        return {"max_raised_ops": self.max_raised_ops, "max_size_ratio": self.max_size_ratio,
                "max_latency_ratio": self.max_latency_ratio}  # fmt: skip


@dataclass
class Candidate:
    plan: Plan
    stage: str  # "calibration" or "precision"
    model: bytes
    recipe: Any  # the quantizer's own recipe
    graph: Graph
    verdict: GateVerdict
    matrix: npt.NDArray[np.int64]
    seconds: float
    note: str = ""
    latency_ms: float | None = None

    @property
    def lossless(self) -> bool:
        return (
            self.verdict.passed
            and self.verdict.drop <= 0
            and all(c.lost <= 0 for c in self.verdict.per_class)
        )

    def to_json(self) -> dict[str, Any]:
        worst = self.verdict.worst_class
        return {
            "recipe": self.plan.name,
            "stage": self.stage,
            "decision": self.verdict.decision,
            "accuracy": round(self.verdict.candidate, 3),
            "drop": round(self.verdict.drop, 3),
            "failed_classes": list(self.verdict.failed_classes),
            "worst_class": None if worst is None else {"label": worst.label,
                                                       "drop": round(worst.drop, 3)},
            "size_bytes": len(self.model),
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
            "seconds": round(self.seconds, 3),
            "note": self.note,
        }  # fmt: skip


@dataclass
class SearchContext:
    """What every candidate is judged against; built once by ``quantize``."""

    fp32: bytes
    graph: Graph
    stats: ActivationStats
    contract: InputContract
    pixels: npt.NDArray[np.uint8]  # validation images at the model's size
    y: npt.NDArray[np.int64]
    labels: tuple[str, ...]
    reference: npt.NDArray[np.int64]  # FP32 confusion matrix
    ranking_inputs: list[FloatArray]
    fp32_latency_ms: float
    gate: GateConfig = field(default_factory=GateConfig)
    budget: SearchBudget = field(default_factory=SearchBudget)
    target: str = "int8-cpu"
    threads: int = 1
    tick: Tick | None = None


@dataclass
class SearchResult:
    chosen: Candidate
    tried: list[Candidate]
    ranking: list[dict[str, Any]]
    stop_reason: str

    @property
    def passed(self) -> bool:
        return self.chosen.verdict.passed


def evaluate(ctx: SearchContext, plan: Plan, stage: str, note: str = "") -> Candidate:
    start = time.perf_counter()
    model, recipe = quantize(ctx.fp32, ctx.graph, plan, ctx.stats.qsvs(plan.calibration))
    runtime = open_model_bytes(model, ctx.threads)
    try:
        predicted = predict(runtime, ctx.contract, ctx.pixels)
    finally:
        runtime.close()
    matrix = confusion_matrix(ctx.y, predicted, len(ctx.labels))
    verdict = judge_matrices(ctx.labels, ctx.reference, matrix, ctx.gate)
    cand = Candidate(plan, stage, model, recipe, Graph.parse(model), verdict, matrix,
                     time.perf_counter() - start, note)  # fmt: skip
    log.info("candidate %s: %s", plan.name, verdict.summary())
    if ctx.tick is not None:
        ctx.tick(1)
    return cand


def over_budget(ctx: SearchContext, cand: Candidate) -> str | None:
    """Why a candidate with raised ops is too large or too slow, or None."""
    ratio = len(cand.model) / len(ctx.fp32)
    if ratio > ctx.budget.max_size_ratio:
        return f"size {ratio:.0%} of FP32 is over the {ctx.budget.max_size_ratio:.0%} budget"
    runtime = open_model_bytes(cand.model, ctx.threads)
    try:
        cand.latency_ms = latency_ms(runtime, ctx.contract, ctx.pixels, BUDGET_LATENCY_RUNS)
    finally:
        runtime.close()
    slow = cand.latency_ms / ctx.fp32_latency_ms
    if slow > ctx.budget.max_latency_ratio:
        return f"latency {slow:.2f}x FP32 is over the {ctx.budget.max_latency_ratio:g}x budget"
    return None


def tensor_noise(ctx: SearchContext, cand: Candidate) -> dict[int, float]:
    """Per int8 activation: mean per-channel noise-to-signal of rounding it with cand's params."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - heavy import

    details = Interpreter(model_content=cand.model).get_tensor_details()
    params = {}
    for d in details:
        q = d["quantization_parameters"]
        if np.dtype(d["dtype"]) == np.int8 and len(q["scales"]) == 1:
            params[d["name"]] = (float(q["scales"][0]), int(q["zero_points"][0]))
    err: dict[int, FloatArray] = {}
    energy: dict[int, FloatArray] = {}
    for tensors in fp32_activations(ctx.fp32, ctx.graph, ctx.ranking_inputs, ctx.threads):
        for index, x in tensors.items():
            p = params.get(ctx.graph.tensors[index].name)
            if p is None or index in ctx.graph.inputs:
                continue
            scale, zero = p
            q = np.clip(np.rint(x / scale) + zero, -128, 127)
            e = ((q - zero) * scale - x) ** 2
            axes = tuple(range(x.ndim - 1))
            err[index] = err.get(index, 0) + e.sum(axis=axes)
            energy[index] = energy.get(index, 0) + (x.astype(np.float64) ** 2).sum(axis=axes)
    noise = {}
    for index, e in err.items():
        live = energy[index] > 1e-6 * max(float(energy[index].max()), 1e-30)
        noise[index] = float(np.mean(e[live] / energy[index][live])) if live.any() else 0.0
    return noise


def rank_groups(ctx: SearchContext, cand: Candidate) -> list[tuple[ScaleGroup, float]]:
    noise = tensor_noise(ctx, cand)
    raised = {i for i, _ in cand.plan.raised}
    ranked = []
    for group in ctx.graph.scale_groups(quantizable_kinds()):
        scores = [noise[t] for t in group.tensors if t in noise]
        if scores and not set(group.ops) <= raised:
            ranked.append((group, max(scores)))
    ranked.sort(key=lambda gs: -gs[1])
    top = ranked[0][1] if ranked else 0.0
    return [(g, n) for g, n in ranked if n > 0.0 and n >= NOISE_FLOOR * top]


def _group_json(ctx: SearchContext, group: ScaleGroup, noise: float) -> dict[str, Any]:
    return {
        "ops": [ctx.graph.describe_op(i) for i in group.ops],
        "tensors": [ctx.graph.tensors[t].name for t in group.tensors],
        "noise_to_signal": round(noise, 6),
    }


def search(ctx: SearchContext) -> SearchResult:
    """Calibration choices first; then, if the best fails the gate, raise op groups."""
    tried: list[Candidate] = []
    for plan in CALIBRATION_PLANS:
        tried.append(evaluate(ctx, plan, "calibration"))
        if tried[-1].lossless:
            break
    best = min(tried, key=lambda c: c.verdict.rank_key())
    if best.verdict.passed:
        return SearchResult(best, tried, [], f"calibration {best.plan.name} passes the gate")
    if ctx.target == "int8-edgetpu":
        reason = ("the Edge TPU runs int8 ops only, so no op may be raised to int16 or float; "
                  "no calibration choice passes the gate")  # fmt: skip
        return SearchResult(best, tried, [], reason)
    return _raise_precision(ctx, best, tried)


def _raise_precision(ctx: SearchContext, best: Candidate, tried: list[Candidate]) -> SearchResult:
    ranking = rank_groups(ctx, best)
    shown = [_group_json(ctx, g, n) for g, n in ranking[:RANKING_SHOWN]]
    current, reason = best, "every op group adding int8 noise was tried"
    if not ranking:
        reason = "no op group adds measurable int8 noise, so raising precision cannot help"
    blocked: list[Candidate] = []  # passed the gate, but over budget
    for group, noise in ranking:
        if len({i for i, _ in current.plan.raised} | set(group.ops)) > ctx.budget.max_raised_ops:
            reason = f"the budget of {ctx.budget.max_raised_ops} raised ops is spent"
            break
        ops = ",".join(f"{ctx.graph.ops[i].kind}#{i}" for i in group.ops)
        for level in LEVELS:
            cand = evaluate(ctx, current.plan.with_raised(group.ops, level), "precision",
                            f"{level} for {ops} (int8 noise-to-signal {noise:.4f})")  # fmt: skip
            tried.append(cand)
            problem = over_budget(ctx, cand)
            if problem is not None:
                cand.note += f"; {problem}"
                if cand.verdict.passed:
                    blocked.append(cand)
                continue
            if cand.verdict.passed:
                return SearchResult(cand, tried, shown, f"passes the gate with {cand.plan.name}")
            if cand.verdict.rank_key() < current.verdict.rank_key():
                cand.note += "; kept: it improved the gate's ranking"
                current = cand
                break
            cand.note += "; undone: no improvement"
    if blocked:
        reason += (f"; {len(blocked)} raised recipe(s) pass the gate but exceed the budget, e.g. "
                   f"{blocked[0].plan.name}: {blocked[0].note.rsplit('; ', 1)[-1]} (see "
                   "--max-size-ratio, --max-latency-ratio)")  # fmt: skip
    return SearchResult(current, tried, shown, reason)

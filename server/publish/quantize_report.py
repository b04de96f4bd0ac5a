"""The quantization report: JSON for machines and the release, HTML for people.

One dict holds everything ``edgefleet model quantize`` decided and why:
sizes, LiteRT latency on this machine, accuracy overall and per class for FP32
and INT8, the confusion cells that changed, the ops that are not full INT8 and
why, the decision, the recipe chosen, every candidate tried with its score,
and the time taken. The HTML page is rendered from that dict alone, so the two
never disagree.
"""

from __future__ import annotations

import html
from importlib import metadata
from typing import Any

from server.publish.quantize_graph import Graph
from server.publish.quantize_search import Candidate, SearchResult

FORMAT = 1
SHIP, MIXED, REFUSE = "ship", "mixed", "refuse"
CLASS_COLUMNS = ["label", "n", "reference", "candidate", "drop", "lost", "allowed_loss", "reason"]
CANDIDATE_COLUMNS = ["recipe", "stage", "decision", "accuracy", "drop", "failed_classes",
                     "size_bytes", "seconds", "note"]  # fmt: skip


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("ai-edge-quantizer", "ai-edge-litert", "edgefleet"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def not_int8_ops(fp32: Graph, chosen: Candidate) -> list[dict[str, Any]]:
    """Ops of the output computing in int16 or float, each with the reason."""
    raised = dict(chosen.plan.raised)
    # Op outputs keep their FP32 names through quantization, so ops are matched by them.
    by_output = {fp32.describe_op(i)["output"]: i for i in range(len(fp32.ops))}
    out = []
    for op, precision in chosen.graph.op_precisions():
        if precision == "int8":
            continue
        name = chosen.graph.describe_op(op.index)["output"]
        source = by_output.get(name)
        if source is not None and source in raised:
            why = f"raised to {raised[source]} by the search to pass the per-class gate"
        else:
            why = f"ai-edge-quantizer leaves {op.kind} in {precision} (no int8 kernel here)"
        out.append({"op": op.kind, "output": name, "precision": precision, "why": why,
                    "fp32_op_index": source})  # fmt: skip
    return out


def decide(result: SearchResult, variant_problems: list[str],
           not_int8: list[dict[str, Any]]) -> tuple[str, str]:  # fmt: skip
    """ship, mixed or refuse, and why in one line."""
    if variant_problems:
        return REFUSE, "the output is not integer where the target needs it: " + "; ".join(
            variant_problems[:6]
        )
    if not result.passed:
        return REFUSE, f"no recipe passes the accuracy gate: {result.stop_reason}"
    if not_int8:
        ops = ", ".join(f"{o['op']} {o['output']!r} ({o['precision']})" for o in not_int8)
        return MIXED, f"passes the gate with mixed precision: {ops}"
    return SHIP, "passes the gate as full INT8"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page of the report's main tables."""
    e = html.escape

    def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
        head = "".join(f"<th>{e(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
            for r in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    gate = report["gate"]
    size, latency = report["size"], report["latency_ms"]
    sizes = [
        {"": "FP32", "bytes": size["fp32_bytes"], "median ms": latency["fp32"]},
        {"": "INT8", "bytes": size["int8_bytes"], "median ms": latency["int8"]},
    ]
    parts = [
        f"<h1>Quantization report: {e(str(report['model']['fp32']))}</h1>",
        f"<p class='decision {e(report['decision'])}'><b>{e(report['decision'].upper())}</b>: "
        f"{e(report['decision_reason'])}</p>",
        "<h2>Accuracy</h2>",
        table([{"": "overall", **gate["overall"]}], ["", "n", "reference", "candidate", "drop"]),
        "<h3>Per class</h3>",
        table(gate["per_class"], CLASS_COLUMNS),
        "<h3>Confusion changes (true, predicted: FP32 count to INT8 count)</h3>",
        table(report["confusion_changes"], ["true", "predicted", "before", "after", "delta"]),
        "<h2>Size and latency</h2>",
        table(sizes, ["", "bytes", "median ms"]),
        f"<p>{latency['runs']} invokes, {latency['threads']} thread(s), LiteRT on this machine</p>",
        "<h2>Ops not in full INT8</h2>",
        table(report["not_int8_ops"], ["op", "output", "precision", "why"])
        if report["not_int8_ops"]
        else "<p>none</p>",
        f"<h2>Recipe chosen: {e(report['recipe']['name'])}</h2>",
        "<h3>Candidates tried</h3>",
        table(report["candidates"], CANDIDATE_COLUMNS),
        f"<p>Search: {e(report['search']['stop_reason'])}. Total "
        f"{report['timing']['seconds_total']:.1f} s.</p>",
    ]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        ".ship{color:#060}.mixed{color:#850}.refuse{color:#a00}"
    )
    head = f"<meta charset='utf-8'><title>EdgeFleet quantization</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)

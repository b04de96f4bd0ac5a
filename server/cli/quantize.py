"""``edgefleet model quantize`` and ``edgefleet model validate``: local, no server needed.

Exit status: 0 when the gate passes (quantize wrote the model), 3 when it
refuses (the report is still written), 2 on bad input with one line naming
what is wrong, 1 on any other failure. ``server.cli.main`` maps every
ServerError to 1 and ignores a handler's return value, so these handlers
print their own error line and leave through ``SystemExit`` with the code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from agent.common.errors import AgentError, ConfigError, FrameSourceError, ModelError, ProtocolError
from agent.protocol.input_contract import COLOR_ORDERS, RESIZE_METHODS
from agent.protocol.input_options import ContractOptions
from server.cli.common import command_parser, emit, group
from server.cli.progress import add_progress_flag, progress_wanted
from server.errors import InvalidInputError

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
_BAD_INPUT = (InvalidInputError, ProtocolError, ModelError, ConfigError, FrameSourceError)
Tick = Any  # Callable[[int], None]


def _fail(err: Exception, code: int) -> NoReturn:
    print(f"edgefleet: error: {err}", file=sys.stderr)
    raise SystemExit(code)


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Bad input -> one line and exit 2; any other AgentError -> one line and exit 1."""
    try:
        yield
    except _BAD_INPUT as err:
        _fail(err, EXIT_BAD_INPUT)
    except AgentError as err:
        _fail(err, 1)


def _progress_factory(quiet: bool) -> Any:
    @contextlib.contextmanager
    def progress(desc: str, total: int | None) -> Iterator[Tick]:
        if quiet:
            yield lambda _n: None
            return
        try:
            tqdm = importlib.import_module("tqdm").tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            unit = "recipe" if desc == "candidates" else "img"
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
            try:
                yield bar.update
            finally:
                bar.close()
            return
        yield from _stderr_line(desc, total)

    return progress


def _show_progress(args: argparse.Namespace) -> bool:
    """On stderr, when it is a terminal or with --progress; --quiet wins over both."""
    return not args.quiet and progress_wanted(args)


def _stderr_line(desc: str, total: int | None) -> Iterator[Tick]:
    """The fallback without tqdm: one rewritten stderr line, at most twice a second."""
    state = {"n": 0, "shown": 0.0}

    def tick(n: int) -> None:
        state["n"] += n
        now = time.monotonic()
        if now - state["shown"] >= 0.5:
            state["shown"] = now
            of = f"/{total}" if total else ""
            print(f"\r{desc}: {int(state['n'])}{of}", end="", file=sys.stderr, flush=True)

    yield tick
    print(f"\r{desc}: {int(state['n'])} done", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _options(args: argparse.Namespace) -> ContractOptions:
    return ContractOptions.parse(
        input_range=args.input_range, mean=args.mean, std=args.std, resize=args.resize,
        pad=args.pad, crop=args.crop, color=args.color,
    )  # fmt: skip


def _gate(args: argparse.Namespace) -> Any:
    from server.publish.accuracy_gate import GateConfig  # noqa: PLC0415 - keeps --help light

    try:
        return GateConfig(max_drop=args.max_drop, max_class_drop=args.max_class_drop,
                          keep_float_drop=max(3.0, args.max_drop))  # fmt: skip
    except ValueError as err:
        raise InvalidInputError(str(err)) from err


def _quantize(args: argparse.Namespace) -> None:
    from server.publish.quantize import QuantizeRequest, quantize_model  # noqa: PLC0415
    from server.publish.quantize_search import SearchBudget  # noqa: PLC0415

    with _guard():
        request = QuantizeRequest(
            model=args.model, calibration=args.calibration, validation=args.validation,
            labels=args.labels, output=args.output, report=args.report, html=args.html,
            options=_options(args), target=args.target, gate=_gate(args),
            budget=SearchBudget(args.max_raised_ops, args.max_size_ratio, args.max_latency_ratio),
            threads=args.threads, latency_runs=args.latency_runs,
            max_calibration=args.max_calibration_samples,
        )  # fmt: skip
        outcome = quantize_model(request, _progress_factory(not _show_progress(args)))
    report = outcome.report

    def text() -> str:
        gate, size = report["gate"], report["size"]
        overall = gate["overall"]
        worst = max(gate["per_class"], key=lambda c: (c["drop"], -c["candidate"]))
        lines = [
            f"{outcome.decision}: {outcome.reason}",
            f"  INT8 {overall['candidate']:.2f}% vs FP32 {overall['reference']:.2f}% "
            f"(drop {overall['drop']:.2f} points); worst class {worst['label']!r} "
            f"{worst['reference']:.1f}% -> {worst['candidate']:.1f}%",
            f"  recipe {report['recipe']['name']}; {size['int8_bytes']} bytes "
            f"({size['ratio']:.0%} of FP32); latency {report['latency_ms']['int8']:.3f} ms vs "
            f"{report['latency_ms']['fp32']:.3f} ms FP32",
            f"  wrote {args.output}" if outcome.wrote_model else "  no model written",
            f"  report {args.report}" + (f" and {args.html}" if args.html else ""),
        ]
        lines += [f"  {reason}" for reason in gate["reasons"]]
        return "\n".join(lines)

    emit(args, report, text)
    if outcome.exit_code:
        print(f"edgefleet: refused: {outcome.reason}", file=sys.stderr)
        raise SystemExit(outcome.exit_code)


def _validate(args: argparse.Namespace) -> None:
    from server.publish.quantize_eval import ValidateRequest, validate_candidate  # noqa: PLC0415

    with _guard():
        request = ValidateRequest(
            candidate=args.candidate, reference=args.reference, validation=args.validation,
            labels=args.labels, options=_options(args), variant=args.variant, gate=_gate(args),
            allow_float_ops=args.allow_float_ops, threads=args.threads,
        )  # fmt: skip
        with _progress_factory(not _show_progress(args))("validate", None) as tick:
            result = validate_candidate(request, tick)
    data = result.to_json()

    def text() -> str:
        rows = [result.summary(), f"  {'class':<12} {'n':>5} {'FP32':>8} {'cand':>8} {'drop':>7}"]
        for c in data["per_class"]:
            mark = "  FAILED" if c["failed"] else ""
            rows.append(f"  {c['label']:<12} {c['n']:>5} {c['reference']:>7.1f}% "
                        f"{c['candidate']:>7.1f}% {c['drop']:>7.1f}{mark}")  # fmt: skip
        if data["failed_classes"]:
            rows.append(f"  failed classes: {', '.join(data['failed_classes'])}")
        return "\n".join(rows)

    emit(args, data, text)
    if not result.passed:
        raise SystemExit(EXIT_REFUSED)


def _add_contract_flags(p: argparse.ArgumentParser) -> None:
    contract = p.add_argument_group(
        "input contract",
        "how camera pixels (uint8 RGB) become input values, as for publish; flags win over the "
        "model's TFLite Metadata, and an image model needs one or the other",
    )
    contract.add_argument(
        "--input-range",
        metavar="LO,HI",
        help="value = LO + (HI-LO)*p/255; write --input-range=-1,1",
    )
    contract.add_argument("--mean", metavar="M[,M,M]", help="value = (p - mean) / std")
    contract.add_argument("--std", metavar="S[,S,S]", help="with --mean, in pixel units")
    contract.add_argument("--resize", choices=RESIZE_METHODS, help="default bilinear")
    contract.add_argument("--pad", type=int, metavar="N", help="letterbox fill pixel 0..255")
    contract.add_argument("--crop", type=float, metavar="F", help="central crop fraction (0, 1]")
    contract.add_argument("--color", choices=COLOR_ORDERS, help="channel order the model wants")


def _add_gate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", type=Path, required=True, help="labels file, one per line")
    p.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="overall top-1 drop allowed (default 1)",
    )
    p.add_argument(
        "--max-class-drop",
        type=float,
        default=3.0,
        metavar="POINTS",
        help="per-class drop allowed, counted in samples, at least one (default 3)",
    )
    p.add_argument("--threads", type=_positive_int, default=1, help="LiteRT threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_progress_flag(p)


def add_commands(sub: Any) -> None:
    model = group(sub, "model", "model releases")
    p = command_parser(model, "quantize", "FP32 .tflite to a gated INT8 .tflite (local)",
                       _quantize)  # fmt: skip
    p.add_argument("model", type=Path, help="the FP32 .tflite")
    p.add_argument("--calibration", type=Path, required=True, help="camera-space .npz (x)")
    p.add_argument("--validation", type=Path, required=True, help="camera-space .npz (x, y)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the INT8 .tflite to write")
    p.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    p.add_argument("--html", type=Path, help="also write the report as HTML")
    p.add_argument(
        "--target",
        choices=("int8-cpu", "int8-edgetpu"),
        default="int8-cpu",
        help="int8-edgetpu allows no op above int8 (default int8-cpu)",
    )
    _add_gate_flags(p)
    budget = p.add_argument_group("search budget", "how far the search may raise precision")
    budget.add_argument(
        "--max-raised-ops",
        type=int,
        default=8,
        metavar="N",
        help="ops the search may move off int8 (default 8; 0: none)",
    )
    budget.add_argument(
        "--max-size-ratio",
        type=_positive_float,
        default=0.35,
        metavar="R",
        help="of the FP32 file (default 0.35)",
    )
    budget.add_argument(
        "--max-latency-ratio",
        type=_positive_float,
        default=1.0,
        metavar="R",
        help="of FP32's median latency here (default 1.0)",
    )
    budget.add_argument("--max-calibration-samples", type=_positive_int, default=500, metavar="N")
    budget.add_argument(
        "--latency-runs",
        type=_positive_int,
        default=50,
        metavar="N",
        help="invokes per latency median (default 50)",
    )
    _add_contract_flags(p)

    p = command_parser(model, "validate", "the accuracy gate: candidate against FP32 (local)",
                       _validate)  # fmt: skip
    p.add_argument("candidate", type=Path, help="the quantized .tflite")
    p.add_argument("--reference", type=Path, required=True, help="the FP32 .tflite")
    p.add_argument("--validation", type=Path, required=True, help="camera-space .npz (x, y)")
    p.add_argument("--variant", choices=("int8-cpu", "int8-edgetpu"), default="int8-cpu")
    p.add_argument(
        "--allow-float-ops",
        action="store_true",
        help="int8-cpu: accept float ops inside (a mixed result of quantize)",
    )
    _add_gate_flags(p)
    _add_contract_flags(p)

"""ai-edge-quantizer, driven: activation statistics, calibration choices and per-op precision.

The quantizer's own calibration keeps one moving average of per-sample
minima and maxima (smoothing 0.95), which clips whatever the last samples did
not reach; on a held-out digits CNN that cost 2.3 points and one class 20.
So the FP32 model is run here once over the calibration set, keeping per
tensor the per-sample extremes and a random sample of values, and each
calibration choice becomes a set of ranges (QSVs) handed to the quantizer:

- ``minmax``: global extremes (the TFLite converter's choice);
- ``ema``: the quantizer's default moving average, for comparison;
- ``percentile``: the 0.01 and 99.99 percentiles of the values (clips outliers);
- ``mse``: the clip of the global range that minimises int8 rounding plus
  clipping error on the sampled values.

The input tensor's range always comes from the contract: 256 pixel values map
onto 256 int8 steps exactly, so the input costs nothing. Weights are int8 per
channel, min-max or MSE-clipped; an op the search raises gets int16
activations (int8 weights) or stays float.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from server.errors import ServerError
from server.publish.quantize_graph import Graph

CALIBRATIONS = ("minmax", "ema", "percentile", "mse")
WEIGHTS = ("minmax", "mse")
LEVELS = ("int16", "float")
EMA_SMOOTHING = 0.95  # ai_edge_quantizer.utils.qsv_utils.moving_average_update
PERCENTILE = 99.99
MSE_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
VALUES_PER_SAMPLE = 64  # sampled values per tensor per image, for percentile and MSE
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")  # MSE weight clipping applies
FloatArray = npt.NDArray[np.float32]


class QuantizerUnavailableError(ServerError):
    """ai-edge-quantizer is not installed (the ``quantize`` extra)."""


def quantizer_modules() -> dict[str, ModuleType]:
    names = ("quantizer", "recipe", "qtyping", "algorithm_manager")
    try:
        return {n: importlib.import_module(f"ai_edge_quantizer.{n}") for n in names}
    except ImportError as err:
        raise QuantizerUnavailableError(
            f"ai-edge-quantizer is not installed ({err}); pip install 'edgefleet[quantize]'"
        ) from err


def quantizable_kinds() -> frozenset[str]:
    """Op kinds the quantizer's min-max algorithm can quantize (INPUT/OUTPUT are pseudo-ops)."""
    table = quantizer_modules()["algorithm_manager"].MIN_MAX_OP_NAME_MATERIALIZE_FUNC_DICT
    return frozenset(str(k.value) for k in table) - {"INPUT", "OUTPUT"}


def fp32_activations(model: bytes, graph: Graph, samples: Iterable[FloatArray],
                     threads: int) -> Iterator[dict[int, FloatArray]]:  # fmt: skip
    """Every activation tensor of the FP32 model, per sample (an interpreter keeping them all)."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - heavy import

    with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": it is, here
        warnings.simplefilter("ignore")
        interp = Interpreter(model_content=model, num_threads=threads,
                             experimental_preserve_all_tensors=True)  # fmt: skip
    interp.allocate_tensors()
    wanted = [t.index for t in graph.tensors if not t.constant and t.name and t.dtype == "float32"]
    for sample in samples:
        interp.set_tensor(graph.inputs[0], sample)
        interp.invoke()
        yield {i: np.asarray(interp.get_tensor(i)) for i in wanted}


@dataclass
class _Track:
    name: str
    ndim: int
    mins: list[float]
    maxs: list[float]
    values: list[FloatArray]


class ActivationStats:
    """Per-sample extremes and sampled values of each FP32 activation tensor."""

    def __init__(self, graph: Graph, input_range: tuple[float, float], seed: int = 0) -> None:
        self.graph = graph
        self.input_range = input_range
        self.samples = 0
        self._rng = np.random.default_rng(seed)
        self._tracks: dict[int, _Track] = {}

    def add(self, tensors: dict[int, FloatArray]) -> None:
        self.samples += 1
        for index, value in tensors.items():
            track = self._tracks.get(index)
            if track is None:
                name = self.graph.tensors[index].name
                track = self._tracks[index] = _Track(name, value.ndim, [], [], [])
            flat = value.reshape(-1)
            track.mins.append(float(flat.min()))
            track.maxs.append(float(flat.max()))
            if flat.size > VALUES_PER_SAMPLE:
                flat = flat[self._rng.integers(0, flat.size, VALUES_PER_SAMPLE)]
            track.values.append(flat.astype(np.float32))

    def qsvs(self, calibration: str) -> dict[str, dict[str, FloatArray]]:
        """Ranges for every activation, in the quantizer's QSV form, by ``calibration``."""
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration {calibration!r} is not one of {', '.join(CALIBRATIONS)}")
        out = {}
        inputs = set(self.graph.inputs)
        for index, track in self._tracks.items():
            if index in inputs:
                low, high = self.input_range
            else:
                low, high = _range(track, calibration)
            shape = (1,) * track.ndim
            out[track.name] = {"min": np.full(shape, low, np.float32),
                               "max": np.full(shape, high, np.float32)}  # fmt: skip
        return out


def _range(track: _Track, calibration: str) -> tuple[float, float]:
    low, high = min(track.mins), max(track.maxs)
    if calibration == "ema":
        low, high = track.mins[0], track.maxs[0]
        for lo, hi in zip(track.mins[1:], track.maxs[1:], strict=True):
            low = EMA_SMOOTHING * low + (1 - EMA_SMOOTHING) * lo
            high = EMA_SMOOTHING * high + (1 - EMA_SMOOTHING) * hi
        return low, high
    if calibration == "minmax" or high <= low:
        return low, high
    values = np.concatenate(track.values)
    if calibration == "percentile":
        lo, hi = np.percentile(values, [100 - PERCENTILE, PERCENTILE])
        return min(float(lo), 0.0) if low < 0 else low, max(float(hi), 0.0)
    return _mse_range(values, low, high)


def _mse_range(values: FloatArray, low: float, high: float) -> tuple[float, float]:
    """The scaled-down global range with the least int8 error on ``values``."""
    best, best_err = (low, high), np.inf
    for fraction in MSE_FRACTIONS:
        lo, hi = min(low * fraction, 0.0), max(high * fraction, 0.0)
        scale = (hi - lo) / 255.0
        if scale <= 0.0:
            continue
        q = np.clip(np.rint((values - lo) / scale), 0, 255) * scale + lo
        err = float(np.mean((q - values) ** 2))
        if err < best_err - 1e-12:
            best, best_err = (lo, hi), err
    return best


@dataclass(frozen=True)
class Plan:
    """One quantization recipe: a calibration choice, weight clipping and raised ops."""

    calibration: str = "minmax"
    weights: str = "minmax"
    raised: tuple[tuple[int, str], ...] = ()  # (op index, "int16" | "float"), in raise order

    @property
    def name(self) -> str:
        weights = "" if self.weights == "minmax" else f"+{self.weights}-weights"
        parts = [self.calibration + weights]
        for level in LEVELS:
            ops = [str(i) for i, lv in self.raised if lv == level]
            if ops:
                parts.append(f"{level}[ops {','.join(ops)}]")
        return " ".join(parts)

    def with_raised(self, ops: Iterable[int], level: str) -> Plan:
        keep = [(i, lv) for i, lv in self.raised if i not in set(ops)]
        return replace(self, raised=(*keep, *((i, level) for i in ops)))

    def to_json(self, graph: Graph) -> dict[str, Any]:
        return {
            "name": self.name,
            "calibration": self.calibration,
            "weights": f"int8 per channel, {self.weights}",
            "activations": "int8 per tensor",
            "raised_ops": [{**graph.describe_op(i), "precision": lv} for i, lv in self.raised],
        }


def quantize(model: bytes, graph: Graph, plan: Plan, qsvs: dict[str, dict[str, FloatArray]]) -> (
    tuple[bytes, Any]
):  # fmt: skip
    """The quantized model and the quantizer's own recipe (JSON-able) for ``plan``."""
    aeq = quantizer_modules()
    op_name, algorithms = aeq["qtyping"].TFLOperationName, aeq["algorithm_manager"].AlgorithmName
    q = aeq["quantizer"].Quantizer(bytearray(model), aeq["recipe"].static_wi8_ai8())
    if plan.weights == "mse":
        for kind in WEIGHT_OPS:
            q.add_static_config(".*", op_name(kind), 8, 8, algorithm_key=algorithms.MSE)
    for index, level in plan.raised:
        op = graph.ops[index]
        regex = "^" + re.escape(op.scope(graph)) + "$"
        if level == "int16":
            q.add_static_config(regex, op_name(op.kind), 16, 8)
        else:
            q.update_quantization_recipe(regex, op_name(op.kind),
                                         algorithm_key=algorithms.NO_QUANTIZE)  # fmt: skip
    try:
        # It checks the ranges with a debugging interpreter (a warning) and draws its own
        # progress bar for models of 100+ tensors whatever it is told: keep both off stderr.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            result = q.quantize(qsvs, enable_progress_bar=False, enable_progress_report=False)
    except Exception as err:  # the library raises anything; name the recipe that failed
        raise ServerError(f"ai-edge-quantizer failed on recipe {plan.name}: {err}") from err
    return bytes(result.quantized_model), q.get_quantization_recipe()

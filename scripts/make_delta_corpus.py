#!/usr/bin/env python3
"""Build the delta benchmark corpus: (old, new) pairs derived from the INT8 fixtures.

No TensorFlow: the pairs rewrite an existing INT8 .tflite with numpy, either in
place (same graph, so the converter's layout is kept) or through the flatbuffers
object API (an added layer, so the whole file is re-serialized).

    .venv/bin/python scripts/make_delta_corpus.py [--out DIR] [--seed N]

Pairs (base model: tests/fixtures/mobilenetv2_int8.tflite):
  head_only      only the classifier is retrained (new weights and scales)
  finetune_all   every weight moves ~1% of its value, scales kept
  shift_minmax   every float weight moves ~1% (of its value), every tensor is
                 re-quantized with min-max per-channel scales (which move ~1% too);
                 activation and bias scales follow
  shift_requant  the same, but the quantizer also recalibrates: each channel's
                 range is clipped to U(0.9, 1.0) of its max |w|, so every scale
                 moves by up to 10% and nearly every int8 value changes
  from_scratch   every weight tensor is new (same architecture, new scales)
  added_layer    an extra fully-connected layer before the softmax
  non_model      a 2 MiB firmware-like binary with scattered edits and insertions
  digits_r1_r2   the real fine-tuned fixture release (digits_int8_r1 -> r2)

Large pairs (``--large``; synthetic ResNet-50 graphs from synth_tflite.py):
  resnet50_requant  ~26 MB INT8 ResNet-50, the shift_requant edit
  wide_150mb        ~150 MB INT8 ResNet-50 at 2.45x width, the finetune_all edit
                    (the streaming paths: apply memory, encoder scale)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt
from ai_edge_litert import schema_py_generated as schema
from synth_tflite import resnet50

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FULLY_CONNECTED = 9
Rng = np.random.Generator
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 20261126
    finetune_rel: float = 0.01  # relative move of every weight in finetune/shift
    act_scale_rel: float = 0.005  # relative move of activation scales on re-quantize
    recalibrate: float = 0.1  # shift_requant: channel ranges clipped to U(1 - x, 1) of max
    scratch_scale_spread: float = 0.3  # from-scratch scales vary by +-30%
    blob_bytes: int = 2 * 1024 * 1024
    blob_edits: int = 400
    blob_inserts: int = 6
    wide_width: float = 2.45  # wide_150mb: channel multiplier (~150 MB)


@dataclass(frozen=True)
class Pair:
    name: str
    old: Path
    new: Path
    note: str


@dataclass
class Tensor:
    """One tensor's byte ranges in the file (-1 when absent)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: int
    length: int
    scale: int
    n_scales: int
    zp: list[int]
    axis: int


class Model:
    """In-place editable view of a .tflite: tensors by range, ops by input lists."""

    def __init__(self, raw: bytes) -> None:
        self.raw = bytearray(raw)
        model = schema.Model.GetRootAs(bytes(raw), 0)
        sg = model.Subgraphs(0)
        self.tensors = [self._tensor(model, sg.Tensors(i)) for i in range(sg.TensorsLength())]
        self.io = {int(i) for i in sg.InputsAsNumpy()} | {int(i) for i in sg.OutputsAsNumpy()}
        self.ops = []
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex()).BuiltinCode()
            self.ops.append((int(code), [int(x) for x in op.InputsAsNumpy()]))

    @staticmethod
    def _tensor(model: Any, t: Any) -> Tensor:
        buf = model.Buffers(t.Buffer())
        field = buf._tab.Offset(4)
        data, length = (buf._tab.Vector(field), buf._tab.VectorLen(field)) if field else (-1, 0)
        q = t.Quantization()
        scale, n_scales, zp, axis = -1, 0, [0], 0
        if q is not None and q.ScaleLength():
            f = q._tab.Offset(8)
            scale, n_scales = q._tab.Vector(f), q._tab.VectorLen(f)
            zp = [int(z) for z in q.ZeroPointAsNumpy()] if q.ZeroPointLength() else [0]
            axis = int(q.QuantizedDimension())
        dtype = {9: "i1", 2: "<i4", 0: "<f4", 3: "u1"}.get(int(t.Type()), "u1")
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        return Tensor(t.Name().decode(), dtype, shape, data, length, scale, n_scales, zp, axis)

    def values(self, t: Tensor) -> npt.NDArray[Any]:
        count = t.length // np.dtype(t.dtype).itemsize
        return np.frombuffer(self.raw, t.dtype, count, t.data).reshape(t.shape).copy()

    def set_values(self, t: Tensor, v: npt.NDArray[Any]) -> None:
        self.raw[t.data : t.data + t.length] = np.ascontiguousarray(v, t.dtype).tobytes()

    def scales(self, t: Tensor) -> F64:
        return np.frombuffer(self.raw, "<f4", t.n_scales, t.scale).astype(np.float64)

    def set_scales(self, t: Tensor, s: npt.NDArray[np.floating[Any]]) -> None:
        self.raw[t.scale : t.scale + 4 * t.n_scales] = np.asarray(s, "<f4").tobytes()

    def weights(self) -> list[Tensor]:
        return [t for t in self.tensors if t.dtype == "i1" and t.length > 0 and t.n_scales]

    def bias_links(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(input, filter, bias) triples whose bias is a constant int32 tensor."""
        out = []
        for _code, ins in self.ops:
            if len(ins) >= 3 and min(ins[:3]) >= 0:
                x, w, b = (self.tensors[i] for i in ins[:3])
                if b.dtype == "<i4" and b.length > 0 and b.n_scales and w.length > 0:
                    out.append((x, w, b))
        return out


def _channel_view(t: Tensor, v: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Values with the quantized axis first, flattened per channel."""
    return np.moveaxis(v, t.axis, 0).reshape(t.n_scales, -1) if t.n_scales > 1 else v.reshape(1, -1)


def _from_channel_view(t: Tensor, c: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if t.n_scales == 1:
        return c.reshape(t.shape)
    moved = list(t.shape)
    moved.insert(0, moved.pop(t.axis))
    return np.moveaxis(c.reshape(moved), 0, t.axis)


def _requantize(m: Model, t: Tensor, w: F64, clip: F64 | float = 1.0) -> F64:
    """Symmetric per-channel INT8 of float weights ``w``; returns the new scales.

    ``clip`` < 1 clips each channel's range below its max |w| (MSE-style
    calibration), so scales change beyond what the weights alone imply.
    """
    c = _channel_view(t, w)
    scales = (np.abs(c).max(axis=1) * clip / 127.0).astype(np.float32).astype(np.float64)
    scales = np.where(scales > 0, scales, 1e-8)
    q = np.clip(np.rint(c / scales[:, None]), -127, 127)
    m.set_values(t, _from_channel_view(t, q).astype(np.int8))
    m.set_scales(t, scales)
    return scales


def _float_weights(m: Model, t: Tensor) -> F64:
    c = _channel_view(t, m.values(t).astype(np.float64)) * m.scales(t)[:, None]
    return np.asarray(_from_channel_view(t, c), dtype=np.float64)


def _rebias(m: Model, moves: Callable[[F64], F64], old_scales: dict[int, F64]) -> None:
    """Move every bias in float, then quantize with f32(input scale x filter scale)."""
    for x, w, b in m.bias_links():
        real = m.values(b).astype(np.float64) * old_scales[b.scale]
        new_scale = (np.float32(m.scales(x)[0]) * m.scales(w).astype(np.float32)).astype(np.float32)
        new_scale = np.broadcast_to(new_scale, (b.n_scales,)).astype(np.float64)
        m.set_scales(b, new_scale)
        m.set_values(b, np.rint(moves(real) / new_scale).astype(np.int32))


def _snapshot_bias_scales(m: Model) -> dict[int, F64]:
    return {b.scale: m.scales(b) for _, _, b in m.bias_links()}


def finetune_all(m: Model, rng: Rng, cfg: CorpusConfig) -> None:
    for t in m.weights():
        q = m.values(t).astype(np.float64)
        moved = q * (1 + cfg.finetune_rel * rng.standard_normal(q.shape))
        m.set_values(t, np.clip(np.rint(moved), -127, 127).astype(np.int8))
    for _, _, b in m.bias_links():
        v = m.values(b).astype(np.float64)
        moved = v * (1 + cfg.finetune_rel * rng.standard_normal(v.shape))
        m.set_values(b, np.rint(moved).astype(np.int32))


def shift_minmax(m: Model, rng: Rng, cfg: CorpusConfig) -> None:
    """Weights move ~1%; re-quantized with plain min-max scales (they move ~1% too)."""
    shift_requant(m, rng, replace(cfg, recalibrate=0.0))


def shift_requant(m: Model, rng: Rng, cfg: CorpusConfig) -> None:
    """Weights move ~1%; re-quantized with recalibrated (clipped) per-channel scales."""
    bias_scales = _snapshot_bias_scales(m)
    fixed = {id(t) for t in m.tensors if t.length > 0} | {id(m.tensors[i]) for i in m.io}
    for t in m.tensors:  # activations (not the model's inputs/outputs): calibration moves
        if id(t) not in fixed and t.n_scales == 1:
            m.set_scales(t, m.scales(t) * (1 + cfg.act_scale_rel * rng.standard_normal(1)))
    for t in m.weights():
        w = _float_weights(m, t)
        clip = 1.0 - cfg.recalibrate * rng.random(max(t.n_scales, 1))
        _requantize(m, t, w * (1 + cfg.finetune_rel * rng.standard_normal(w.shape)), clip)
    _rebias(m, lambda r: r * (1 + cfg.finetune_rel * rng.standard_normal(r.shape)), bias_scales)


def head_only(m: Model, rng: Rng, cfg: CorpusConfig) -> None:
    fcs = [ins for code, ins in m.ops if code == FULLY_CONNECTED]
    head = m.tensors[fcs[-1][1]]
    w = _float_weights(m, head)
    _requantize(m, head, rng.permutation(w.ravel()).reshape(w.shape) * rng.uniform(0.8, 1.2))
    if len(fcs[-1]) > 2 and fcs[-1][2] >= 0:
        b = m.tensors[fcs[-1][2]]
        if b.length:
            m.set_values(b, rng.permutation(m.values(b).ravel()).reshape(b.shape))


def from_scratch(m: Model, rng: Rng, cfg: CorpusConfig) -> None:
    bias_scales = _snapshot_bias_scales(m)
    spread = cfg.scratch_scale_spread
    for t in m.weights():
        w = _float_weights(m, t)
        fresh = rng.permutation(w.ravel()).reshape(w.shape)
        _requantize(m, t, fresh * rng.uniform(1 - spread, 1 + spread))
    _rebias(m, lambda r: rng.permutation(r.ravel()).reshape(r.shape), bias_scales)


def added_layer(raw: bytes, rng: Rng) -> tuple[bytes, bytes]:
    """(re-serialized base, base + one FC layer before the softmax)."""
    base = schema.ModelT.InitFromPackedBuf(raw, 0)
    old = _pack(base)
    model = schema.ModelT.InitFromPackedBuf(raw, 0)
    sg = model.subgraphs[0]
    softmax = sg.operators[-1]
    logits = sg.tensors[softmax.inputs[0]]
    width = int(logits.shape[-1])
    fc_code = next(i for i, c in enumerate(model.operatorCodes) if c.builtinCode == FULLY_CONNECTED)
    w_scales = rng.uniform(0.002, 0.01, width).astype(np.float32)
    weights = rng.integers(-127, 128, (width, width), dtype=np.int8)
    in_scale = float(logits.quantization.scale[0])
    b_scales = (np.float32(in_scale) * w_scales).astype(np.float32)
    bias = rng.integers(-2000, 2000, width).astype(np.int32)
    w_idx = _add_tensor(model, "extra_fc/MatMul", [width, width], 9,
                        data=weights.view(np.uint8), scales=w_scales)
    b_idx = _add_tensor(model, "extra_fc/BiasAdd", [width], 2,
                        data=bias.view(np.uint8), scales=b_scales)
    out_idx = _add_tensor(model, "extra_fc/out", list(logits.shape), 9, data=None,
                          scales=np.array([in_scale], np.float32),
                          zero_point=logits.quantization.zeroPoint)
    op = schema.OperatorT()
    op.opcodeIndex = fc_code
    op.inputs = [softmax.inputs[0], w_idx, b_idx]
    op.outputs = [out_idx]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    softmax.inputs = [out_idx]
    sg.operators.insert(len(sg.operators) - 1, op)
    return old, _pack(model)


def _add_tensor(model: Any, name: str, shape: list[int], ttype: int, *,
                data: npt.NDArray[np.uint8] | None, scales: npt.NDArray[np.float32],
                zero_point: Any = None) -> int:
    sg = model.subgraphs[0]
    buf = schema.BufferT()
    if data is not None:
        buf.data = data.ravel()
    model.buffers.append(buf)
    t = schema.TensorT()
    t.name, t.shape, t.type, t.buffer = name.encode(), shape, ttype, len(model.buffers) - 1
    t.quantization = schema.QuantizationParametersT()
    t.quantization.scale = scales
    t.quantization.zeroPoint = (np.zeros(len(scales), np.int64) if zero_point is None
                                else zero_point)
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _pack(model: Any) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def firmware_blob(rng: Rng, cfg: CorpusConfig) -> tuple[bytes, bytes]:
    """A binary with code-like, table and random regions; v2 edits and inserts."""
    n = cfg.blob_bytes
    words = [bytes(rng.integers(97, 123, rng.integers(2, 9))) for _ in range(400)]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), n // 12))[: n // 4]
    table = np.arange(n // 16, dtype="<u4").reshape(-1, 4)
    table[:, 1] = rng.integers(0, 1 << 16, len(table))
    opcodes = rng.choice(np.array([0x48, 0x89, 0x8B, 0xE8, 0xC3, 0x0F, 0x85, 0x00], np.uint8),
                         n // 4, p=[0.2, 0.2, 0.15, 0.1, 0.05, 0.1, 0.1, 0.1])
    noise = rng.integers(0, 256, n - len(text) - table.nbytes - opcodes.size, dtype=np.uint8)
    old = text + table.tobytes() + opcodes.tobytes() + noise.tobytes()
    new = bytearray(old)
    for pos in rng.integers(0, len(new) - 16, cfg.blob_edits):
        k = int(rng.integers(1, 9))
        new[pos : pos + k] = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
    for pos in sorted(rng.integers(0, len(new), cfg.blob_inserts), reverse=True):
        new[pos:pos] = rng.integers(0, 256, int(rng.integers(256, 4096)), dtype=np.uint8).tobytes()
    return old, bytes(new)


LARGE = ("resnet50_requant", "wide_150mb")


def build(
    out: Path,
    cfg: CorpusConfig = CorpusConfig(),
    fixtures: Path = FIXTURES,
    large: tuple[str, ...] = (),
) -> list[Pair]:
    """Write every pair (and the ``large`` ones asked for) under ``out``; deterministic."""
    out.mkdir(parents=True, exist_ok=True)
    mobilenet = (fixtures / "mobilenetv2_int8.tflite").read_bytes()
    pairs: list[Pair] = []

    def emit(name: str, old: bytes, new: bytes, note: str) -> None:
        (out / f"{name}.old").write_bytes(old)
        (out / f"{name}.new").write_bytes(new)
        pairs.append(Pair(name, out / f"{name}.old", out / f"{name}.new", note))

    edits: list[tuple[str, Callable[[Model, Rng, CorpusConfig], None], str]] = [
        ("head_only", head_only, "classifier retrained"),
        ("finetune_all", finetune_all, "every weight moves ~1%, scales kept"),
        ("shift_minmax", shift_minmax, "weights move ~1%, re-quantized, min-max scales"),
        ("shift_requant", shift_requant, "weights move ~1%, re-quantized, recalibrated scales"),
        ("from_scratch", from_scratch, "all weights new"),
    ]
    for i, (name, edit, note) in enumerate(edits):
        model = Model(mobilenet)
        edit(model, np.random.default_rng(cfg.seed + i), cfg)
        emit(name, mobilenet, bytes(model.raw), note)
    old, new = added_layer(mobilenet, np.random.default_rng(cfg.seed + 10))
    emit("added_layer", old, new, "extra FC layer before softmax (re-serialized)")
    old, new = firmware_blob(np.random.default_rng(cfg.seed + 11), cfg)
    emit("non_model", old, new, "firmware-like blob, scattered edits + inserts")
    emit("digits_r1_r2", (fixtures / "digits_int8_r1.tflite").read_bytes(),
         (fixtures / "digits_int8_r2.tflite").read_bytes(),
         "fixture release r1 -> r2 (real fine-tune)")
    large_edits = {
        "resnet50_requant": (1.0, shift_requant, "synthetic ResNet-50, shift_requant edit"),
        "wide_150mb": (cfg.wide_width, finetune_all, "2.45x-wide ResNet-50, finetune_all"),
    }
    for i, name in enumerate(large):
        width, edit, note = large_edits[name]
        base = resnet50(np.random.default_rng(cfg.seed + 20 + i), width)
        model = Model(base)
        edit(model, np.random.default_rng(cfg.seed + 30 + i), cfg)
        emit(name, base, bytes(model.raw), note)
        del base, model
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(tempfile.gettempdir()) / "edgefleet-delta-corpus"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--seed", type=int, default=CorpusConfig.seed)
    parser.add_argument("--large", nargs="*", choices=LARGE, default=(),
                        help="also build these large pairs (none given: all of them)")
    args = parser.parse_args(argv)
    large = tuple(LARGE if args.large == [] else args.large)
    for pair in build(args.out, CorpusConfig(seed=args.seed), large=large):
        old, new = pair.old.stat().st_size, pair.new.stat().st_size
        print(f"{pair.name:14} {old:>10,} -> {new:>10,}  {pair.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthesize ResNet-50-shaped INT8 .tflite files without TensorFlow or a network.

The graph is ResNet-50's (7x7 stem, bottleneck stages of 3/4/6/3 blocks with
projection shortcuts, global mean, 1000-way FC), built with the flatbuffers object
API of ai_edge_litert's schema. Weights follow the statistics of trained
convolutions: per output channel, a heavy-tailed (Student-t, 5 dof) draw with a
He-initialised spread that varies ~30% across channels (log-normal), quantized
symmetrically per channel to INT8 with max-|w| scales, as the TFLite converter
does. Biases are INT32 with scale f32(input scale x filter scale); activation
scales are per-tensor. ``width`` multiplies every channel count (~width**2 in
size: 1.0 gives ~25 MB, 2.45 ~150 MB).
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt
from ai_edge_litert import schema_py_generated as schema

Rng = np.random.Generator
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (mid width, blocks, stride)
EXPANSION = 4
CLASSES = 1000
OPS = {"conv": 3, "add": 0, "fc": 9, "mean": 40, "pool": 17, "softmax": 25}


class _Graph:
    """Accumulates tensors, buffers and operators of one subgraph."""

    def __init__(self, rng: Rng) -> None:
        self.rng = rng
        self.model = schema.ModelT()
        self.model.version = 3
        self.model.description = b"synthetic ResNet-50 (EdgeFleet delta corpus)"
        self.model.buffers = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.model.operatorCodes = []
        self.codes: dict[int, int] = {}
        self.sg = schema.SubGraphT()
        self.sg.tensors, self.sg.operators = [], []
        self.sg.name = b"main"

    def tensor(
        self,
        name: str,
        shape: list[int],
        ttype: int,
        scales: npt.NDArray[Any],
        *,
        data: npt.NDArray[Any] | None = None,
        axis: int = 0,
    ) -> int:
        buf = schema.BufferT()
        if data is not None:
            buf.data = np.ascontiguousarray(data).view(np.uint8).ravel()
        self.model.buffers.append(buf)
        t = schema.TensorT()
        t.name, t.shape, t.type = name.encode(), shape, ttype
        t.buffer = len(self.model.buffers) - 1
        q = schema.QuantizationParametersT()
        q.scale = np.asarray(scales, np.float32)
        q.zeroPoint = np.zeros(len(q.scale), np.int64)
        q.quantizedDimension = axis
        t.quantization = q
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def activation(self, name: str, shape: list[int]) -> int:
        return self.tensor(name, shape, 9, np.array([self.rng.uniform(0.02, 0.2)]))

    def op(
        self,
        kind: str,
        inputs: list[int],
        outputs: list[int],
        options: Any = None,
        options_type: int = 0,
    ) -> None:
        code = OPS[kind]
        if code not in self.codes:
            oc = schema.OperatorCodeT()
            oc.builtinCode = oc.deprecatedBuiltinCode = code
            oc.version = 1
            self.codes[code] = len(self.model.operatorCodes)
            self.model.operatorCodes.append(oc)
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.codes[code], inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.sg.operators.append(o)

    def weights(self, name: str, shape: list[int], fan_in: int) -> tuple[int, npt.NDArray[Any]]:
        out = shape[0]
        spread = np.sqrt(2.0 / fan_in) * self.rng.lognormal(0.0, 0.3, out)
        w = self.rng.standard_t(5, (out, int(np.prod(shape[1:])))) * spread[:, None] / 1.29
        scales = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
        q = np.clip(np.rint(w / scales[:, None].astype(np.float64)), -127, 127).astype(np.int8)
        return self.tensor(f"{name}/weights", shape, 9, scales, data=q.reshape(shape)), scales

    def conv(
        self,
        name: str,
        x: int,
        hw: int,
        *,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        relu: bool = True,
    ) -> tuple[int, int]:
        w, w_scales = self.weights(name, [cout, k, k, cin], k * k * cin)
        x_scale = np.float32(self.sg.tensors[x].quantization.scale[0])
        b_scales = (x_scale * w_scales).astype(np.float32)
        bias = np.rint(self.rng.normal(0, 0.05, cout) / b_scales).astype(np.int32)
        b = self.tensor(f"{name}/bias", [cout], 2, b_scales, data=bias)
        out_hw = -(-hw // stride)
        y = self.activation(f"{name}/out", [1, out_hw, out_hw, cout])
        opts = schema.Conv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = schema.Padding.SAME, stride, stride
        opts.fusedActivationFunction = 1 if relu else 0
        self.op("conv", [x, w, b], [y], opts, schema.BuiltinOptions.Conv2DOptions)
        return y, out_hw

    def pack(self) -> bytes:
        self.model.subgraphs = [self.sg]
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(self.model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def resnet50(rng: Rng, width: float = 1.0) -> bytes:
    """A ResNet-50-shaped INT8 model (~25 MB at width 1) as .tflite bytes."""
    g = _Graph(rng)

    def ch(c: int) -> int:
        return max(8, round(c * width / 8) * 8)

    x = g.activation("input", [1, 224, 224, 3])
    g.sg.inputs = [x]
    y, hw = g.conv("stem", x, 224, cin=3, cout=ch(64), k=7, stride=2)
    cin = ch(64)
    for s, (mid, blocks, stride) in enumerate(STAGES):
        for b in range(blocks):
            name = f"stage{s + 1}/block{b + 1}"
            st = stride if b == 0 else 1
            h1, hw1 = g.conv(f"{name}/conv1", y, hw, cin=cin, cout=ch(mid), k=1, stride=1)
            h2, hw2 = g.conv(f"{name}/conv2", h1, hw1, cin=ch(mid), cout=ch(mid), k=3, stride=st)
            h3, _ = g.conv(
                f"{name}/conv3",
                h2,
                hw2,
                cin=ch(mid),
                cout=ch(mid) * EXPANSION,
                k=1,
                stride=1,
                relu=False,
            )
            short = y
            if b == 0:
                short, _ = g.conv(
                    f"{name}/shortcut",
                    y,
                    hw,
                    cin=cin,
                    cout=ch(mid) * EXPANSION,
                    k=1,
                    stride=st,
                    relu=False,
                )
            out = g.activation(f"{name}/add", [1, hw2, hw2, ch(mid) * EXPANSION])
            g.op("add", [h3, short], [out])
            y, hw, cin = out, hw2, ch(mid) * EXPANSION
    pooled = g.activation("pool", [1, cin])
    axes = g.tensor("pool/axes", [2], 2, np.array([1.0]), data=np.array([1, 2], np.int32))
    g.op("mean", [y, axes], [pooled])
    w, w_scales = g.weights("logits", [CLASSES, cin], cin)
    p_scale = np.float32(g.sg.tensors[pooled].quantization.scale[0])
    b_scales = (p_scale * w_scales).astype(np.float32)
    bias = np.rint(rng.normal(0, 0.05, CLASSES) / b_scales).astype(np.int32)
    b = g.tensor("logits/bias", [CLASSES], 2, b_scales, data=bias)
    logits = g.activation("logits", [1, CLASSES])
    opts = schema.FullyConnectedOptionsT()
    g.op("fc", [pooled, w, b], [logits], opts, schema.BuiltinOptions.FullyConnectedOptions)
    probs = g.tensor("probs", [1, CLASSES], 9, np.array([1 / 256]))
    g.op(
        "softmax", [logits], [probs], schema.SoftmaxOptionsT(), schema.BuiltinOptions.SoftmaxOptions
    )
    g.sg.outputs = [probs]
    return g.pack()

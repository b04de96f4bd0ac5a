"""The op graph of a .tflite file: what each op computes in, and which ops share a scale.

Read with the flatbuffer classes that ai-edge-litert ships, so validating a
candidate needs no quantizer. Three uses:

- ``integer_problems``: the tensors that break an INT8 variant's promise
  (float input/output tensors, float activations; for the Edge TPU also int16,
  which it cannot run);
- ``op_precisions``: per op, int8, int16 or float, for the report's list of ops
  that are not full INT8;
- ``scale_groups``: the unit the quantization search raises. An activation
  tensor's int8 range is shared by its producer, its consumers and any
  pass-through op after it (pooling, reshapes keep their input's scale), so
  raising one op alone only requantizes the same range one op later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ModelValidationError

# TFLite TensorType -> name (schema.fbs order).
TENSOR_TYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool",
    7: "int16", 8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64",
    13: "resource", 14: "variant", 15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16",
}  # fmt: skip
FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
INT8_TYPES = frozenset({"int8", "uint8"})
INDEX_TYPES = frozenset({"int32", "int64", "bool"})  # shapes, indices, argmax: never quantized
# Ops whose int8 output must keep the input's scale (TFLite's quantization spec).
PASS_THROUGH = frozenset({
    "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE",
    "STRIDED_SLICE", "SLICE", "PAD", "PADV2", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "GATHER",
    "RESIZE_NEAREST_NEIGHBOR", "SPLIT", "SPLIT_V",
})  # fmt: skip
CONVERSIONS = frozenset({"QUANTIZE", "DEQUANTIZE"})  # inserted at precision boundaries
VARIANTS = ("int8-cpu", "int8-edgetpu")


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    constant: bool
    quantized: bool  # has a scale


@dataclass(frozen=True)
class Op:
    index: int
    kind: str  # builtin name, e.g. CONV_2D
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def scope(self, graph: Graph) -> str:
        """ai-edge-quantizer's name for the op: its output tensor names, ';'-joined."""
        names = [graph.tensors[i].name for i in self.outputs if i >= 0 and graph.tensors[i].name]
        return "".join(f"{name};" for name in names)


@dataclass(frozen=True)
class ScaleGroup:
    """Ops that share one activation range; ``tensors`` are the range's tensors."""

    root: int  # the op producing the range
    ops: tuple[int, ...]
    tensors: tuple[int, ...]


class Graph:
    """Subgraph 0 of a .tflite file (the serving signature of a classifier)."""

    def __init__(self, tensors: tuple[Tensor, ...], ops: tuple[Op, ...], inputs: tuple[int, ...],
                 outputs: tuple[int, ...]) -> None:  # fmt: skip
        self.tensors, self.ops, self.inputs, self.outputs = tensors, ops, inputs, outputs
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        for op in ops:
            for t in op.outputs:
                self.producer[t] = op.index
            for t in op.inputs:
                if t >= 0:
                    self.consumers.setdefault(t, []).append(op.index)

    @classmethod
    def read(cls, path: Path) -> Graph:
        if not path.is_file():
            raise ModelValidationError(f"model {path} does not exist")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ModelValidationError(f"cannot read model {path}: {err.strerror}") from err
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: bytes, what: str = "model") -> Graph:
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ModelValidationError(f"{what} is not a TFLite flatbuffer (no TFL3 identifier)")
        try:
            return cls._parse(data)
        except ModelValidationError:
            raise
        except Exception as err:  # flatbuffers raises anything on malformed input
            raise ModelValidationError(f"{what} is not a readable .tflite: {err}") from err

    @classmethod
    def _parse(cls, data: bytes) -> Graph:
        from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415 - heavy

        model = schema.Model.GetRootAs(data, 0)
        if model.SubgraphsLength() < 1:
            raise ModelValidationError("model has no subgraph")
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
        codes = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
            codes.append(names.get(builtin, f"BUILTIN_{builtin}"))
        sg = model.Subgraphs(0)
        tensors = []
        for i in range(sg.TensorsLength()):
            t = sg.Tensors(i)
            buf = model.Buffers(int(t.Buffer())) if 0 < t.Buffer() < model.BuffersLength() else None
            constant = buf is not None and (buf.DataLength() > 0 or buf.Offset() > 1)
            quant = t.Quantization()
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            tensors.append(Tensor(
                i, (t.Name() or b"").decode("utf-8", "replace"),
                TENSOR_TYPES.get(int(t.Type()), f"type{t.Type()}"), shape, constant,
                quant is not None and quant.ScaleLength() > 0,
            ))  # fmt: skip
        ops = []
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            ins = tuple(int(x) for x in op.InputsAsNumpy()) if op.InputsLength() else ()
            outs = tuple(int(x) for x in op.OutputsAsNumpy()) if op.OutputsLength() else ()
            ops.append(Op(i, codes[op.OpcodeIndex()], ins, outs))
        ins = tuple(int(x) for x in sg.InputsAsNumpy()) if sg.InputsLength() else ()
        outs = tuple(int(x) for x in sg.OutputsAsNumpy()) if sg.OutputsLength() else ()
        return cls(tuple(tensors), tuple(ops), ins, outs)

    # -- precision ------------------------------------------------------------------------
    def activations(self, op: Op) -> list[Tensor]:
        return [self.tensors[t] for t in (*op.inputs, *op.outputs)
                if t >= 0 and not self.tensors[t].constant]  # fmt: skip

    def op_precision(self, op: Op) -> str:
        """float, int16 or int8: the widest type among the op's activations."""
        types = {t.dtype for t in self.activations(op)}
        if types & FLOAT_TYPES:
            return "float"
        if "int16" in types:
            return "int16"
        return "int8"

    def op_precisions(self) -> list[tuple[Op, str]]:
        """Compute ops and their precision; QUANTIZE/DEQUANTIZE are bookkeeping, left out."""
        return [(op, self.op_precision(op)) for op in self.ops if op.kind not in CONVERSIONS]

    def quantized_tensors(self) -> list[Tensor]:
        """Quantized tensors make a file not an FP32 model; returns them (empty when FP32)."""
        return [t for t in self.tensors if t.quantized and t.dtype not in FLOAT_TYPES]

    def integer_problems(self, variant: str, allow_float_ops: bool = False) -> list[str]:
        """Tensors that are not integer where ``variant`` needs them, one phrase each."""
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
        problems: list[str] = []
        for role, indices in (("input", self.inputs), ("output", self.outputs)):
            for t in (self.tensors[i] for i in indices):
                if t.dtype not in INT8_TYPES:
                    problems.append(f"{role} {t.name!r} is {t.dtype}")
        allowed = INT8_TYPES | INDEX_TYPES
        if variant == "int8-cpu":
            allowed |= {"int16"}
            if allow_float_ops:
                allowed |= FLOAT_TYPES
        seen = set(self.inputs) | set(self.outputs)
        for op in self.ops:
            for t in self.activations(op):
                if t.index not in seen and t.dtype not in allowed:
                    seen.add(t.index)
                    problems.append(f"{op.kind} activation {t.name!r} is {t.dtype}")
        return problems

    # -- search units ---------------------------------------------------------------------
    def scale_groups(self, quantizable: Iterable[str]) -> list[ScaleGroup]:
        """One group per op output range that quantizable ops compute on."""
        kinds = frozenset(quantizable)
        groups = []
        for op in self.ops:
            if op.kind in PASS_THROUGH or op.kind not in kinds:
                continue
            members, tensors = [op.index], []
            frontier = [t for t in op.outputs if t >= 0 and not self.tensors[t].constant]
            while frontier:
                t = frontier.pop(0)
                tensors.append(t)
                for c in self.consumers.get(t, []):
                    consumer = self.ops[c]
                    if c not in members and consumer.kind in kinds:
                        members.append(c)
                        if consumer.kind in PASS_THROUGH:
                            frontier.extend(consumer.outputs)
            groups.append(ScaleGroup(op.index, tuple(sorted(members)), tuple(tensors)))
        return groups

    def describe_op(self, index: int) -> dict[str, Any]:
        op = self.ops[index]
        out = self.tensors[op.outputs[0]].name if op.outputs else ""
        return {"index": index, "op": op.kind, "output": out}

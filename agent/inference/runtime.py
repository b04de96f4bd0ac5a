"""Inference runtimes as plugins chosen by a ``type`` key, and the Model wrapper.

``litert`` (ai-edge-litert) is preferred; ``tflite-runtime`` is the fallback for
boards stuck on older Pythons or Edge TPU builds; ``auto`` tries them in that
order. A configured runtime or delegate that cannot be loaded fails loudly with
RuntimeUnavailableError instead of silently running something else.

The runtime packages are imported lazily so that an agent without a model
does not pay for them in start-up time or RSS.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ModelError, RuntimeUnavailableError
from agent.protocol.manifest import TensorSpec

log = logging.getLogger(__name__)

# Runtime type key -> module that provides Interpreter and load_delegate.
RUNTIMES: dict[str, str] = {
    "litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}
AUTO_ORDER = ("litert", "tflite-runtime")
RUNTIME_TYPES = ("auto", *RUNTIMES)

# Delegate type key -> shared library passed to load_delegate().
DELEGATES: dict[str, str] = {"edgetpu": "libedgetpu.so.1"}
# libedgetpu device option: "usb", "pci", "usb:0", "pci:1", ":0" or "" (any).
_EDGETPU_DEVICE = re.compile(r"^(usb|pci)?(:\d+)?$")
_TFLITE_IDENTIFIER = b"TFL3"

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Backend:
    """A loaded runtime plugin: its key and the module holding Interpreter."""

    name: str
    module: ModuleType

    @property
    def interpreter_class(self) -> Callable[..., Any]:
        cls: Callable[..., Any] = self.module.Interpreter
        return cls

    def load_delegate(self, library: str, options: dict[str, str]) -> Any:
        return self.module.load_delegate(library, options)


def _import_backend(name: str) -> Backend:
    try:
        return Backend(name, importlib.import_module(RUNTIMES[name]))
    except ImportError as err:
        raise RuntimeUnavailableError(
            f"runtime {name!r} is not available: cannot import {RUNTIMES[name]} ({err})"
        ) from err


def resolve_runtime(runtime: str) -> Backend:
    """Import the runtime named by ``runtime``; ``auto`` tries litert, then tflite-runtime."""
    if runtime == "auto":
        failures: list[str] = []
        for name in AUTO_ORDER:
            try:
                return _import_backend(name)
            except RuntimeUnavailableError as err:
                failures.append(str(err))
        raise RuntimeUnavailableError("no inference runtime is installed: " + "; ".join(failures))
    if runtime not in RUNTIMES:
        raise RuntimeUnavailableError(
            f"unknown runtime type {runtime!r}; expected one of {', '.join(RUNTIME_TYPES)}"
        )
    return _import_backend(runtime)


@dataclass(frozen=True)
class TensorDetails:
    """One input or output tensor; per-channel parameters kept alongside per-tensor ones."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def is_quantized(self) -> bool:
        return self.dtype in ("int8", "uint8", "int16") and self.scale > 0.0

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    def to_spec(self) -> TensorSpec:
        """The wire form a manifest carries, for signature comparison."""
        return TensorSpec(self.name, self.shape, self.dtype, self.scale, self.zero_point)

    @classmethod
    def from_litert(cls, raw: dict[str, Any]) -> TensorDetails:
        scale, zero_point = raw.get("quantization", (0.0, 0))
        params = raw.get("quantization_parameters", {})
        scales = tuple(float(s) for s in params.get("scales", ()))
        zero_points = tuple(int(z) for z in params.get("zero_points", ()))
        return cls(
            name=str(raw["name"]),
            index=int(raw["index"]),
            shape=tuple(int(d) for d in raw["shape"]),
            dtype=np.dtype(raw["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
            scales=scales,
            zero_points=zero_points,
            quantized_dimension=int(params.get("quantized_dimension", 0)),
        )


def quantize(
    x: npt.ArrayLike,
    scale: float,
    zero_point: int,
    dtype: npt.DTypeLike,
) -> npt.NDArray[Any]:
    """Affine-quantize ``x`` as LiteRT's own QUANTIZE kernel does, bit for bit.

    ``rint(x * (1 / scale)) + zero_point`` in float32, clamped to the type's
    range. The kernel multiplies by the float32 reciprocal and rounds exact
    halves to even, unlike the reference ``std::round(x / scale)``; the tests
    check both details against the kernel itself.
    """
    if not scale > 0.0:
        raise ValueError(f"quantization scale must be positive, got {scale}")
    info = np.iinfo(np.dtype(dtype))
    inverse = np.float32(1.0) / np.float32(scale)
    v = np.multiply(np.asarray(x, dtype=np.float32), inverse)
    np.rint(v, out=v)
    v += np.float32(zero_point)
    np.clip(v, info.min, info.max, out=v)
    return v.astype(dtype)


def dequantize(q: npt.ArrayLike, scale: float, zero_point: int) -> FloatArray:
    """Inverse of :func:`quantize`: ``(q - zero_point) * scale`` as float32."""
    if not scale > 0.0:
        raise ValueError(f"quantization scale must be positive, got {scale}")
    out = np.asarray(q).astype(np.float32)
    out -= np.float32(zero_point)
    out *= np.float32(scale)
    return out


def _check_model_file(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            header = fh.read(8)
    except OSError as err:
        raise ModelError(f"model file {path} cannot be read: {err.strerror or err}") from err
    if len(header) < 8 or header[4:8] != _TFLITE_IDENTIFIER:
        raise ModelError(f"model file {path} is not a TFLite flatbuffer (no TFL3 identifier)")


class Model:
    """A loaded .tflite model: one interpreter, created once and reused.

    Not thread-safe: the interpreter must be driven from one thread.
    """

    def __init__(
        self,
        path: Path,
        backend: Backend,
        num_threads: int,
        delegate: str | None,
        delegate_device: str,
    ) -> None:
        self.path = path
        self.num_threads = num_threads
        self.delegate_name = delegate
        self._backend = backend
        # The delegate must outlive the interpreter, so the Model owns a reference.
        self._delegate: Any = None
        delegates: list[Any] = []
        if delegate is not None:
            self._delegate = _load_delegate(backend, delegate, delegate_device)
            delegates.append(self._delegate)
        try:
            self._interp: Any = backend.interpreter_class(
                model_path=str(path),
                num_threads=num_threads,
                experimental_delegates=delegates or None,
            )
            self._interp.allocate_tensors()
            inputs = tuple(TensorDetails.from_litert(d) for d in self._interp.get_input_details())
            outputs = tuple(TensorDetails.from_litert(d) for d in self._interp.get_output_details())
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"{backend.name} could not load model {path}: {err}") from err
        if not inputs or not outputs:
            raise ModelError(f"model {path} has no inputs or no outputs")
        self._inputs = inputs
        self._outputs = outputs
        # A function returning a fresh numpy view of input 0's buffer (LiteRT's tensor()):
        # safe to keep, while each view must be dropped before the next invoke.
        self._input_buffer = self._interp.tensor(inputs[0].index)
        log.info(
            "loaded model %s with %s (threads=%s, delegate=%s)",
            path, backend.name, num_threads, delegate or "none",
        )

    @property
    def runtime_name(self) -> str:
        return self._backend.name

    @property
    def input_details(self) -> tuple[TensorDetails, ...]:
        return self._inputs

    @property
    def output_details(self) -> tuple[TensorDetails, ...]:
        return self._outputs

    @property
    def input(self) -> TensorDetails:
        return self._inputs[0]

    @property
    def output(self) -> TensorDetails:
        return self._outputs[0]

    def quantize_input(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """Turn a float frame (with or without the batch axis) into input 0's tensor."""
        spec = self._inputs[0]
        arr = np.asarray(x, dtype=np.float32)
        if arr.shape != spec.shape:
            if arr.ndim + 1 == len(spec.shape) and (1, *arr.shape) == spec.shape:
                arr = arr.reshape(spec.shape)
            else:
                raise ModelError(
                    f"input of shape {arr.shape} does not fit model input {spec.shape}"
                )
        if spec.dtype == "float32":
            return arr
        if not spec.is_quantized:
            raise ModelError(f"model input {spec.name!r} is {spec.dtype} without a scale")
        return quantize(arr, spec.scale, spec.zero_point, spec.numpy_dtype)

    def dequantize_output(self, raw: npt.ArrayLike, index: int = 0) -> FloatArray:
        """Float values of an output tensor; float outputs pass through."""
        spec = self._outputs[index]
        if not spec.is_quantized:
            return np.asarray(raw, dtype=np.float32)
        return dequantize(raw, spec.scale, spec.zero_point)

    def fill_and_invoke(self, fill: Callable[[npt.NDArray[Any]], object]) -> npt.NDArray[Any]:
        """Let ``fill`` write input 0 in place, invoke, and return a copy of output 0.

        Writing into the interpreter's own buffer saves ``set_tensor``'s copy of
        the whole input. ``fill`` gets a view that it must not keep: LiteRT
        refuses to invoke while a view of its buffers is alive.
        """
        if self._interp is None:
            raise ModelError(f"model {self.path} was closed")
        view = self._input_buffer()
        try:
            fill(view)
        finally:
            del view
        try:
            self._interp.invoke()
            out: npt.NDArray[Any] = self._interp.get_tensor(self._outputs[0].index)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"inference on {self.path} failed: {err}") from err
        return out

    def invoke_raw(self, input_array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Set input 0, invoke, and return a copy of output 0 in its raw dtype."""
        if self._interp is None:
            raise ModelError(f"model {self.path} was closed")
        try:
            self._interp.set_tensor(self._inputs[0].index, input_array)
            self._interp.invoke()
            out: npt.NDArray[Any] = self._interp.get_tensor(self._outputs[0].index)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"inference on {self.path} failed: {err}") from err
        return out

    def close(self) -> None:
        """Drop the interpreter before its delegate, the order the runtime requires."""
        self._input_buffer = _closed
        self._interp = None
        self._delegate = None


def _closed() -> npt.NDArray[Any]:
    raise ModelError("model was closed")


def _load_delegate(backend: Backend, delegate: str, device: str) -> Any:
    if delegate not in DELEGATES:
        raise RuntimeUnavailableError(
            f"unknown delegate {delegate!r}; expected one of {', '.join(DELEGATES)}"
        )
    if not _EDGETPU_DEVICE.match(device):
        raise RuntimeUnavailableError(
            f"edgetpu device {device!r} must be 'usb', 'pci', 'usb:N', 'pci:N', ':N' or ''"
        )
    library = DELEGATES[delegate]
    options = {"device": device} if device else {}
    try:
        return backend.load_delegate(library, options)
    except (ValueError, OSError, RuntimeError) as err:
        raise RuntimeUnavailableError(
            f"delegate {delegate!r} could not be loaded from {library} "
            f"(device {device or 'any'!r}) with {backend.name}: {err}"
        ) from err


def load_model(
    path: str | Path,
    runtime: str = "auto",
    num_threads: int = 1,
    delegate: str | None = None,
    delegate_device: str = "",
) -> Model:
    """Load ``path`` with the named runtime; always passes ``num_threads``."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    model_path = Path(path)
    backend = resolve_runtime(runtime)
    _check_model_file(model_path)
    return Model(model_path, backend, num_threads, delegate, delegate_device)

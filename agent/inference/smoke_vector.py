"""The golden smoke test, shared by the publisher (server) and the device.

Pure numpy: the input is regenerated from the manifest's seed, so only the
expected output travels in the signed manifest, and both sides compare with
the same function.

Tolerance semantics (``Golden.tolerance`` is an integer):

* integer outputs (int8, uint8, int16, int32): the largest element-wise
  difference, in quantization steps, must be ``<= tolerance``. Default 2: INT8
  kernels may round differently between XNNPACK, reference kernels and
  delegates by a step or two.
* float outputs (float32, float16): ``tolerance`` is in units of 1e-4 of the
  output's scale, ``max(1, max|expected|)``: the largest absolute difference
  must be ``<= tolerance * 1e-4 * scale``. Default 10, i.e. 0.1% of the
  scale, which absorbs FP32 kernel reordering but not a wrong model. NaN or
  infinity in the actual output always fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ProtocolError
from agent.protocol.manifest import golden_input_bytes

INT_DTYPES = ("int8", "uint8", "int16", "int32")
FLOAT_DTYPES = ("float32", "float16")
INT_TOLERANCE = 2
FLOAT_TOLERANCE = 10
FLOAT_TOLERANCE_UNIT = 1e-4


def _dtype(name: str) -> np.dtype[np.generic]:
    if name not in INT_DTYPES + FLOAT_DTYPES:
        raise ProtocolError(f"golden test does not support tensor dtype {name!r}")
    return np.dtype(name)


def default_tolerance(dtype: str) -> int:
    return INT_TOLERANCE if _dtype(dtype).kind in "iu" else FLOAT_TOLERANCE


def golden_input_array(seed: str, shape: Sequence[int], dtype: str) -> npt.NDArray[Any]:
    """The input tensor for ``seed``: identical on the server and every device.

    Integer inputs are the seed bytes reinterpreted (little-endian) as the
    dtype, covering its whole range; float inputs take one byte per element
    mapped to [0, 1] as value/255, the range image models are trained on.
    """
    kind = _dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if count <= 0:
        raise ProtocolError(f"golden input shape {tuple(shape)} has no elements")
    if kind.kind in "iu":
        raw = golden_input_bytes(seed, count * kind.itemsize)
        values = np.frombuffer(raw, dtype=kind.newbyteorder("<")).astype(kind)
    else:
        raw = golden_input_bytes(seed, count)
        values = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) / 255.0).astype(kind)
    return values.reshape(tuple(shape))


def _shape_problem(expected: bytes, actual: bytes, itemsize: int, tolerance: int) -> str | None:
    if tolerance < 0:
        return f"golden tolerance {tolerance} is negative"
    if len(expected) != len(actual):
        return f"output is {len(actual)} bytes, golden output is {len(expected)} bytes"
    if not expected or len(expected) % itemsize:
        return f"golden output length {len(expected)} is not a whole number of elements"
    return None


def _compare_int(want: npt.NDArray[Any], got: npt.NDArray[Any], tolerance: int) -> str | None:
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    worst = int(np.argmax(diff))
    if diff[worst] > tolerance:
        return (
            f"output[{worst}] is {got[worst]}, golden {want[worst]}: "
            f"{diff[worst]} steps > tolerance {tolerance}"
        )
    return None


def _compare_float(want: npt.NDArray[Any], got: npt.NDArray[Any], tolerance: int) -> str | None:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    if not np.all(np.isfinite(got64)):
        return "output contains NaN or infinity"
    scale = max(1.0, float(np.max(np.abs(want64))))
    limit = tolerance * FLOAT_TOLERANCE_UNIT * scale
    diff = np.abs(got64 - want64)
    worst = int(np.argmax(diff))
    if diff[worst] > limit:
        return (
            f"output[{worst}] is {got64[worst]:.6g}, golden {want64[worst]:.6g}: "
            f"difference {diff[worst]:.3g} > {limit:.3g}"
        )
    return None


def compare_golden(expected: bytes, actual: bytes, dtype: str, tolerance: int) -> str | None:
    """Return why ``actual`` does not match ``expected``, or None when it does."""
    try:
        kind = _dtype(dtype)
    except ProtocolError as err:
        return str(err)
    problem = _shape_problem(expected, actual, kind.itemsize, tolerance)
    if problem is not None:
        return problem
    want = np.frombuffer(expected, dtype=kind.newbyteorder("<"))
    got = np.frombuffer(actual, dtype=kind.newbyteorder("<"))
    if kind.kind in "iu":
        return _compare_int(want, got, tolerance)
    return _compare_float(want, got, tolerance)

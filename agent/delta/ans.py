"""Per-context entropy coding of one-byte residuals with constriction's ANS coder.

The residual layout ``Layout.ANS`` (format version 2). The decoder forms the same
context keys as context-sorted packing (packing.py: magnitude bucket of the
prediction and, for rescaled tensors, its rounding fraction; residuals negated
where the fraction is negative). Per tensor, every context gets a categorical
model: the histogram of the tensor's residuals in that context, quantized to a
precision the encoder picks (model bytes against coded bits) and sent in the
tensor table. Per chunk, residuals are grouped by key (stable sort) and every
group is coded with its context's model (a single-value model codes nothing;
narrow ones code pairs or triples per step, see ``group_size``) into one ANS
stream, stored as
``uvarint(byte length) | little-endian u32 words``.

Probabilities reach constriction as ``q / sum(q)`` in float64 (one IEEE division,
the same on every platform) with ``perfect=False``, whose fixed-point
quantization is integer and float arithmetic without platform-dependent calls,
so x86_64 encoders and aarch64 decoders agree bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.delta.errors import CorruptPatchError, DeltaError

IntArray = npt.NDArray[np.int64]
# Quantized histogram precisions the encoder tries (bits of the total).
PRECISIONS = np.array([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14], dtype=np.int64)
MAX_COUNT = 1 << 16  # largest quantized count the table may hold
# An ANS chunk stream is never longer than this many bytes per symbol (+ slack);
# the decoder refuses more, so a hostile length cannot make it allocate.
MAX_BYTES_PER_SYMBOL = 2
STREAM_SLACK = 64
# Chunks with at least this many residuals sort their keys in the worker thread;
# below it the hand-off costs more than the overlap saves.
PARALLEL_SORT_MIN = 1 << 14


def available() -> bool:
    """Whether this install can make and apply ANS-coded (version 2) patches."""
    return importlib.util.find_spec("constriction") is not None


def _constriction() -> Any:
    try:
        import constriction  # type: ignore[import-untyped]  # noqa: PLC0415 - optional
    except ImportError as err:
        raise DeltaError(
            "this patch is ANS-coded (format version 2) and needs the constriction package"
        ) from err
    return constriction


@dataclass(frozen=True)
class ContextModel:
    """A context's residual distribution: quantized counts of ``lo .. lo + len(q) - 1``."""

    lo: int
    q: tuple[int, ...]

    def __post_init__(self) -> None:
        # Models key caches once per chunk: hash the counts once, not every time.
        object.__setattr__(self, "_hash", hash((self.lo, self.q)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    def probabilities(self) -> npt.NDArray[np.float64]:
        q = np.array(self.q, dtype=np.float64)
        p: npt.NDArray[np.float64] = q / q.sum()
        return p


Models = Sequence[ContextModel | None]


class Cursor(Protocol):
    """The tensor table's bounds-checked reader (table.py)."""

    def uvarint(self) -> int: ...
    def svarint(self) -> int: ...


def encode_models(
    models: Models, uvarint: Callable[[int], bytes], svarint: Callable[[int], bytes]
) -> bytes:
    """Table bytes per context: width (0 = no model), then ``lo`` and the counts."""
    out = bytearray()
    for model in models:
        if model is None:
            out.append(0)
            continue
        out += uvarint(len(model.q)) + svarint(model.lo)
        for q in model.q:
            out += uvarint(q)
    return bytes(out)


def parse_models(cur: Cursor, contexts: int) -> tuple[ContextModel | None, ...]:
    """The models of ``encode_models``, range-checked so the decoder stays in int8."""
    models: list[ContextModel | None] = []
    for _ in range(contexts):
        width = cur.uvarint()
        if width == 0:
            models.append(None)
            continue
        lo = cur.svarint()
        if width > 256 or lo < -128 or lo + width > 128:
            raise CorruptPatchError("corrupt patch: bad ANS model range in table")
        q = tuple(cur.uvarint() for _ in range(width))
        if max(q) > MAX_COUNT or not q[0] or not q[-1]:
            raise CorruptPatchError("corrupt patch: bad ANS model counts in table")
        models.append(ContextModel(lo, q))
    return tuple(models)


def _uvarint_bytes(values: IntArray) -> IntArray:
    return 1 + (values >= 1 << 7) + (values >= 1 << 14) + (values >= 1 << 21)


def quantize(counts: IntArray, lo: int) -> tuple[float, ContextModel]:
    """(estimated bytes: coded symbols + model, the model) for one context's histogram.

    ``counts`` covers ``lo ..`` with nonzero first and last entries.
    """
    n = int(counts.sum())
    seen = counts > 0
    scaled = counts[None, :] * (2.0 ** PRECISIONS[:, None]) / n
    q = np.where(seen[None, :], np.maximum(1, np.rint(scaled)), 0).astype(np.int64)
    q = np.minimum(q, MAX_COUNT)
    total = q.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore"):
        logp = np.where(seen[None, :], np.log2(np.maximum(q, 1) / total), 0.0)
    bits = -(counts[None, :] * logp).sum(axis=1)
    model = _uvarint_bytes(q).sum(axis=1) + 3
    cost = bits / 8 + model
    best = int(np.argmin(cost))
    return float(cost[best]), ContextModel(lo, tuple(int(x) for x in q[best]))


def fit_models(hist: IntArray) -> tuple[float, list[ContextModel | None]]:
    """Models for a (contexts, 256) histogram of residuals offset by +128, and the cost."""
    models: list[ContextModel | None] = []
    cost = 0.0
    for row in hist:
        nz = np.flatnonzero(row)
        if not nz.size:
            models.append(None)
            cost += 1
            continue
        lo, hi = int(nz[0]), int(nz[-1])
        c, model = quantize(row[lo : hi + 1].astype(np.int64), lo - 128)
        cost += c
        models.append(model)
    return cost, models


def histogram(keys: npt.NDArray[np.uint8], values: npt.NDArray[Any], contexts: int) -> IntArray:
    """(contexts, 256) counts of int8 ``values`` per key."""
    flat = keys.astype(np.int64) * 256 + (values.astype(np.int64) + 128)
    return np.bincount(flat, minlength=contexts * 256).reshape(contexts, 256)


def group_size(width: int) -> int:
    """Symbols coded together in one ANS step: as many as keep the alphabet <= 256.

    Each decode step costs ~10 ns whatever the alphabet, so narrow contexts code
    pairs or triples, modelled as independent (the product of the context's model:
    no model bytes, and float64 products are exact IEEE on every platform).
    """
    return 3 if width <= 6 else 2 if width <= 16 else 1


@dataclass(frozen=True)
class _Coder:
    """A context's constriction models, made once per tensor."""

    model: ContextModel
    group: int
    single: Any
    joint: Any
    digits: npt.NDArray[Any]  # joint symbol -> its ``group`` values (lo added), one record
    last: npt.NDArray[np.int8]  # single symbol -> its value (lo added)


@functools.lru_cache(maxsize=1024)
def _digits(width: int, group: int, lo: int) -> tuple[npt.NDArray[Any], npt.NDArray[np.int8]]:
    """Joint symbol -> its ``group`` values (most significant first, ``lo`` added) as
    one void record (a 1-D take moves whole groups, about twice as fast as a take
    along axis 0 of a (symbols, group) table); and single symbol -> its value."""
    index = np.arange(width**group)
    digits = np.stack([(index // width ** (group - 1 - j)) % width for j in range(group)], 1)
    digits = (digits + lo).astype(np.int8)
    records, last = digits.view(f"V{group}").reshape(-1), np.arange(lo, lo + width, dtype=np.int8)
    records.flags.writeable = last.flags.writeable = False  # shared by every coder of the cache
    return records, last


def _coder(model: ContextModel) -> _Coder:
    p = model.probabilities()
    width, group = len(p), group_size(len(p))
    joint = p
    for _ in range(group - 1):
        joint = np.multiply.outer(joint, p).reshape(-1)
    categorical = _constriction().stream.model.Categorical
    digits, last = _digits(width, group, model.lo)
    single = categorical(p, perfect=False)
    return _Coder(
        model,
        group,
        single,
        single if group == 1 else categorical(joint, perfect=False),
        digits,
        last,
    )


@functools.lru_cache(maxsize=64)
def _coders(models: tuple[ContextModel | None, ...]) -> list[_Coder | None]:
    return [None if m is None or len(m.q) == 1 else _coder(m) for m in models]


def _encode_segment(coder: Any, seg: npt.NDArray[np.int32], c: _Coder) -> None:
    """Push one context's symbols (0-based): whole groups on top, the tail below."""
    width, group = len(c.model.q), c.group
    whole = len(seg) - len(seg) % group
    if whole < len(seg):
        coder.encode_reverse(np.ascontiguousarray(seg[whole:]), c.single)
    if whole:
        digits = seg[:whole].reshape(-1, group)
        index = digits[:, 0].copy()
        for j in range(1, group):
            index *= width
            index += digits[:, j]
        coder.encode_reverse(index, c.joint)


def _decode_segment(coder: Any, out: npt.NDArray[np.int8], c: _Coder) -> None:
    """Pop ``len(out)`` values of one context into ``out`` (int8, lo added)."""
    n = len(out)
    whole = n - n % c.group
    if whole:
        index = coder.decode(c.joint, whole // c.group)
        np.take(c.digits, index, out=out[:whole].view(c.digits.dtype))
    if whole < n:
        np.take(c.last, coder.decode(c.single, n - whole), out=out[whole:])


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def encode_chunk(keys: npt.NDArray[np.uint8], values: npt.NDArray[Any], models: Models) -> bytes:
    """One chunk's int8 residuals (already flipped) as a length-prefixed ANS stream."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=len(models))
    ordered = values[order].astype(np.int32)
    ends = np.cumsum(counts)
    coder = _constriction().stream.stack.AnsCoder()
    coders = _coders(tuple(models))
    for k in range(len(models) - 1, -1, -1):  # a stack: last group first
        n = int(counts[k])
        if not n:
            continue
        model = models[k]
        if model is None:
            raise ValueError(f"context {k} has residuals but no model")
        if len(model.q) == 1:  # a single value: nothing to code
            continue
        seg = ordered[int(ends[k]) - n : int(ends[k])] - model.lo
        c = coders[k]
        assert c is not None
        _encode_segment(coder, np.ascontiguousarray(seg, dtype=np.int32), c)
    words = bytes(coder.get_compressed().astype("<u4").tobytes())
    return _encode_varint(len(words)) + words


def _read_varint(read: Callable[[int], bytes]) -> int:
    value = 0
    for shift in range(0, 35, 7):
        byte = read(1)[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
    raise CorruptPatchError("corrupt patch: ANS stream length too long")


@functools.cache
def _sorter() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ans-argsort")


def _decode_groups(
    coder: Any, counts: list[int], models: Models, out: npt.NDArray[np.int8]
) -> None:
    """Every context's residuals, context after context, into ``out``."""
    coders = _coders(tuple(models))
    at = 0
    for k, n in enumerate(counts):
        if not n:
            continue
        model = models[k]
        if model is None:
            raise CorruptPatchError("corrupt patch: context without a model has residuals")
        seg = out[at : at + n]
        at += n
        if len(model.q) == 1:
            seg[:] = model.lo
            continue
        c = coders[k]
        assert c is not None
        _decode_segment(coder, seg, c)


def decode_chunk(
    read: Callable[[int], bytes], keys: npt.NDArray[np.uint8], models: Models
) -> npt.NDArray[np.int8]:
    """Decoder: the chunk's residuals in element order (still flipped), as int8.

    The stable sort by key (only needed to put the decoded groups back in element
    order) runs in a worker thread while constriction decodes: numpy's argsort
    releases the GIL, constriction's decoder holds it, so the two overlap on
    separate cores without changing a byte of the result.
    """
    size = _read_varint(read)
    if size % 4 or size > MAX_BYTES_PER_SYMBOL * len(keys) + STREAM_SLACK:
        raise CorruptPatchError("corrupt patch: bad ANS stream length")
    words = np.frombuffer(read(size), dtype="<u4").astype(np.uint32)
    if len(keys) and int(keys.max()) >= len(models):
        raise CorruptPatchError("corrupt patch: context key without a model")
    counts = np.bincount(keys, minlength=len(models)).tolist()
    sorting: Future[npt.NDArray[np.intp]] | None = None
    order: npt.NDArray[np.intp] | None = None
    if len(keys) - max(counts, default=0):  # two or more contexts: a permutation
        if len(keys) >= PARALLEL_SORT_MIN:
            sorting = _sorter().submit(np.argsort, keys, kind="stable")
        else:
            order = np.argsort(keys, kind="stable")
    ordered = np.empty(len(keys), np.int8)
    coder = _constriction().stream.stack.AnsCoder(words)
    try:
        _decode_groups(coder, counts, models, ordered)
    except BaseException as err:  # a Rust panic surfaces as pyo3's PanicException
        if sorting is not None:
            sorting.result()  # no work left running on a failed apply
        if isinstance(err, (CorruptPatchError, KeyboardInterrupt, SystemExit)):
            raise
        raise CorruptPatchError(f"corrupt patch: ANS stream: {err}") from err
    if sorting is not None:
        order = sorting.result()
    if not coder.is_empty():
        raise CorruptPatchError("corrupt patch: ANS stream has stray data")
    if order is None:
        return ordered
    out = np.empty(len(keys), np.int8)
    out[order] = ordered
    return out

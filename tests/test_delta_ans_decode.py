"""ANS chunk decoding on its fast paths: sort in the worker thread, one context, damage."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest

from agent.delta import CorruptPatchError
from agent.delta.ans import (
    PARALLEL_SORT_MIN,
    ContextModel,
    decode_chunk,
    encode_chunk,
    fit_models,
    histogram,
)

Chunk = tuple[np.ndarray, np.ndarray, list[ContextModel | None]]


def _chunk(n: int, contexts: int, seed: int) -> Chunk:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, contexts, n).astype(np.uint8)
    spread = np.array([0.0, 0.5, 1.5, 20.0, 3.0])[keys % 5]
    values = np.clip(np.rint(rng.normal(0, 1, n) * spread), -128, 127).astype(np.int8)
    _, models = fit_models(histogram(keys, values, contexts))
    return keys, values, models


@pytest.mark.parametrize("n", [PARALLEL_SORT_MIN - 1, 3 * PARALLEL_SORT_MIN + 7])
def test_chunk_decodes_in_element_order_on_both_sides_of_the_thread_threshold(n: int) -> None:
    keys, values, models = _chunk(n, 9, n)
    stream = BytesIO(encode_chunk(keys, values, models))
    assert np.array_equal(decode_chunk(stream.read, keys, models), values)
    assert stream.read() == b""


def test_single_context_chunk_needs_no_permutation() -> None:
    keys, values, models = _chunk(2 * PARALLEL_SORT_MIN, 9, 3)
    keys[:] = 4  # every residual in one (wide) context
    values = np.clip(values, -60, 60).astype(np.int8)
    _, models = fit_models(histogram(keys, values, 9))
    stream = BytesIO(encode_chunk(keys, values, models))
    assert np.array_equal(decode_chunk(stream.read, keys, models), values)


def test_damaged_stream_of_a_threaded_chunk_is_corrupt() -> None:
    keys, values, models = _chunk(3 * PARALLEL_SORT_MIN, 9, 11)
    blob = bytearray(encode_chunk(keys, values, models))
    blob[len(blob) // 2] ^= 0x5A  # a flipped bit mid-stream
    with pytest.raises(CorruptPatchError):
        decode_chunk(BytesIO(bytes(blob)).read, keys, models)
    # A wrong model for a context garbles the stream: refused, never a wrong answer.
    swapped = list(models)
    swapped[3], swapped[1] = models[1], models[3]
    with pytest.raises(CorruptPatchError):
        decode_chunk(BytesIO(bytes(encode_chunk(keys, values, models))).read, keys, swapped)

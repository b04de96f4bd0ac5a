"""ANS-coded residuals (format version 2): bit-exact, smaller, and refused when damaged."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from test_delta_roundtrip import QUICK, R1, mutate_model

from agent.delta import CorruptPatchError, DeltaConfig, apply_bytes, make_patch_bytes
from agent.delta.ans import (
    ContextModel,
    decode_chunk,
    encode_chunk,
    fit_models,
    group_size,
    histogram,
)
from agent.delta.format import HEADER_SIZE, Section, decode_header, scan_sections
from agent.delta.table import Layout, TensorEntry, decode_table, encode_table

NOISY = mutate_model(R1, 3, "noise")
RESCALED = mutate_model(R1, 7, "rescale")
TFLITE = DeltaConfig(methods=("tflite",), measure_bound=True)


def _sections(patch: bytes) -> dict[Section, tuple[int, int]]:
    refs = scan_sections(BytesIO(patch), len(patch), 1 << 20)
    return {r.kind: (r.offset, r.length) for r in refs}


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("new", [NOISY, RESCALED], ids=["noise", "rescale"])
def test_ans_patches_are_version_2_bit_exact_and_smaller(new: bytes) -> None:
    patch, info = make_patch_bytes(R1, new, TFLITE)
    plain, _ = make_patch_bytes(R1, new, DeltaConfig(methods=("tflite",), ans=False))
    assert decode_header(patch[:HEADER_SIZE]).version == 2
    assert Section.RESIDUALS_ANS in _sections(patch)
    assert apply_bytes(R1, patch) == new
    assert len(patch) < len(plain)
    assert info.order0_bound is not None and info.order0_bound > 0


def test_without_ans_the_patch_stays_version_1_and_decodes() -> None:
    patch, info = make_patch_bytes(R1, NOISY, DeltaConfig(methods=("tflite",), ans=False))
    assert decode_header(patch[:HEADER_SIZE]).version == 1
    assert Section.RESIDUALS_ANS not in _sections(patch)
    assert info.order0_bound is None
    assert apply_bytes(R1, patch) == NOISY


def test_damaged_ans_stream_is_corrupt_even_with_a_valid_crc() -> None:
    patch, _ = make_patch_bytes(R1, NOISY, TFLITE)
    offset, length = _sections(patch)[Section.RESIDUALS_ANS]
    for where in (offset + 1, offset + length // 2, offset + length - 1):
        body = bytearray(patch[:-4])
        body[where] ^= 0x5A
        with pytest.raises(CorruptPatchError):
            apply_bytes(R1, _recrc(bytes(body)))


def test_version_1_header_with_an_ans_section_is_refused() -> None:
    patch, _ = make_patch_bytes(R1, NOISY, TFLITE)
    body = bytearray(patch[:-4])
    body[4] = 1
    with pytest.raises(CorruptPatchError, match="unexpected sections"):
        apply_bytes(R1, _recrc(bytes(body)))


def test_models_fit_histograms_and_survive_the_table() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 3, 5000).astype(np.uint8)
    values = np.rint(rng.normal(0, 1 + keys, 5000)).astype(np.int8)
    hist = histogram(keys, values, 4)
    assert hist.sum() == 5000 and not hist[3].any()
    cost, models = fit_models(hist)
    assert models[3] is None and all(isinstance(m, ContextModel) for m in models[:3])
    # Wider contexts get wider models, and the estimate is near the empirical entropy.
    widths = [len(m.q) for m in models[:3] if m is not None]
    assert widths == sorted(widths)
    p = hist[hist > 0] / hist.sum(axis=1, keepdims=True).repeat(256, 1)[hist > 0]
    entropy = float(-(hist[hist > 0] * np.log2(p)).sum() / 8)
    assert entropy < cost < entropy * 1.1 + 100
    entry = TensorEntry(
        0, 64, 0, "|i1", (8, 8), layout=Layout.ANS, key_mags=4, models=tuple(models)
    )
    (parsed,), _ = decode_table(encode_table([entry], []), 64, 64)
    assert parsed.models == entry.models


def test_bad_model_range_in_table_is_corrupt() -> None:
    bad = ContextModel(120, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10))  # runs past +127
    entry = TensorEntry(0, 64, 0, "|i1", (8, 8), layout=Layout.ANS, models=(bad,))
    with pytest.raises(CorruptPatchError, match="ANS model range"):
        decode_table(encode_table([entry], []), 64, 64)


def test_quick_config_still_round_trips() -> None:
    patch, _ = make_patch_bytes(R1, RESCALED, QUICK)
    assert apply_bytes(R1, patch) == RESCALED


CHILD = """
import sys
sys.modules["constriction"] = None  # an install without the package, e.g. an aarch64 agent
from pathlib import Path
from agent.delta import UnsupportedPatchError, ans_available, apply_delta
assert not ans_available()
old, patch, out = (Path(a) for a in sys.argv[1:4])
try:
    apply_delta(old, patch, out)
except UnsupportedPatchError as err:
    print("unsupported", err.version, out.exists())
else:
    print("applied", out.read_bytes() == Path(sys.argv[4]).read_bytes())
"""


@pytest.mark.parametrize("ans", [True, False])
def test_agent_without_constriction_applies_version_1_and_refuses_version_2(
    tmp_path: Path, ans: bool
) -> None:
    patch, _ = make_patch_bytes(R1, NOISY, DeltaConfig(methods=("tflite",), ans=ans))
    paths = [tmp_path / n for n in ("old", "patch", "out", "new")]
    for path, data in zip(paths, (R1, patch, None, NOISY), strict=True):
        if data is not None:
            path.write_bytes(data)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.stdout.split() == (["unsupported", "2", "False"] if ans else ["applied", "True"])


def test_chunk_streams_round_trip_for_every_symbol_grouping() -> None:
    rng = np.random.default_rng(5)
    n = 10_007  # odd, so groups leave tails
    keys = rng.integers(0, 4, n).astype(np.uint8)
    spread = np.array([0.0, 0.5, 1.5, 20.0])[keys]  # one value, triples, pairs, singles
    values = np.clip(np.rint(rng.normal(0, 1, n) * spread), -128, 127).astype(np.int8)
    hist = histogram(keys, values, 5)
    _, models = fit_models(hist)
    groups = {1 if len(m.q) == 1 else group_size(len(m.q)) for m in models if m is not None}
    assert {len(models[0].q) if models[0] else 0} == {1} and groups >= {1, 2, 3}
    blob = encode_chunk(keys, values, models)
    stream = BytesIO(blob)
    assert np.array_equal(decode_chunk(stream.read, keys, models), values)
    assert stream.read() == b""
    # Near the empirical entropy: coding pairs and triples costs (almost) nothing.
    p = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    entropy = float(-(hist[hist > 0] * np.log2(p[hist > 0])).sum() / 8)
    assert len(blob) <= entropy * 1.02 + 16

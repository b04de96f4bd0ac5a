"""Delta round trips: real .tflite pairs and random bytes come back byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.delta import (
    DeltaConfig,
    apply_bytes,
    apply_delta,
    make_delta,
    make_patch_bytes,
    read_header,
)
from agent.delta.tflite import parse_constants, scale_links

FIXTURES = Path(__file__).parent / "fixtures"
R1 = (FIXTURES / "digits_int8_r1.tflite").read_bytes()
R2 = (FIXTURES / "digits_int8_r2.tflite").read_bytes()
# Same codec, less effort: keeps the property tests fast.
QUICK = DeltaConfig(zstd_level=3, full_probe_bytes=0)


def mutate_model(base: bytes, seed: int, kind: str) -> bytes:
    """A realistic new release of ``base``: weights move, scales change, a float edits."""
    rng = np.random.default_rng(seed)
    data = bytearray(base)
    consts = parse_constants(base)
    assert consts
    for const in consts:
        if const.dtype not in ("|i1", "<i4") or rng.random() < 0.3:
            continue
        values = np.frombuffer(base, const.dtype, const.length // np.dtype(const.dtype).itemsize,
                               const.offset).astype(np.int64)
        if kind == "noise":
            values = values + rng.integers(-2, 3, values.shape)
        elif kind == "rescale" and const.scales is not None:
            factor = rng.uniform(0.8, 1.25, len(const.scales))
            scales = (const.scales / factor).astype("<f4")
            data[const.scale_offset : const.scale_offset + 4 * len(scales)] = scales.tobytes()
            per = np.resize(factor, values.size) if len(factor) > 1 else factor[0]
            values = np.rint(values * per)
        elif kind == "fresh":
            values = rng.permutation(values)
        info = np.iinfo(np.dtype(const.dtype))
        values = np.clip(values, info.min, info.max).astype(const.dtype)
        data[const.offset : const.offset + const.length] = values.tobytes()
    return bytes(data)


def test_fixture_release_uses_the_model_aware_method_and_beats_byte_methods() -> None:
    patch, info = make_patch_bytes(R1, R2)
    assert info.mode == "tflite" and info.method == "tflite"
    assert info.patch_size == len(patch) == min(info.candidates.values())
    assert info.candidates["tflite"] < 0.5 * info.candidates["zstd"]
    assert apply_bytes(R1, patch) == R2
    assert info.base_sha256 == hashlib.sha256(R1).hexdigest()
    assert info.target_sha256 == hashlib.sha256(R2).hexdigest()


def test_patched_model_loads_and_runs_in_litert(tmp_path: Path) -> None:
    new = mutate_model(R1, 7, "rescale")
    (tmp_path / "old.tflite").write_bytes(R1)
    (tmp_path / "new.tflite").write_bytes(new)
    info = make_delta(tmp_path / "old.tflite", tmp_path / "new.tflite", tmp_path / "p.efd")
    assert info.mode == "tflite"
    applied = apply_delta(tmp_path / "old.tflite", tmp_path / "p.efd", tmp_path / "out.tflite")
    assert applied.target_length == len(new)
    assert (tmp_path / "out.tflite").read_bytes() == new
    interpreter = Interpreter(model_path=str(tmp_path / "out.tflite"))
    interpreter.allocate_tensors()
    interpreter.invoke()
    header = read_header(tmp_path / "p.efd")
    assert header.magic == b"EFDL" and header.version in (1, 2) and header.mode == "tflite"
    assert header.target_length == len(new)
    assert header.base_sha256 == hashlib.sha256(R1).hexdigest()


def test_bias_scales_are_found_as_exact_products_of_input_and_filter_scales() -> None:
    links = scale_links(R2)
    assert len(links) == 5  # three convolutions, two dense layers
    assert all(link.a_count == link.count for link in links)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["noise", "rescale", "fresh"]))
def test_mutated_models_round_trip(seed: int, kind: str) -> None:
    new = mutate_model(R1, seed, kind)
    patch, info = make_patch_bytes(R1, new, QUICK)
    assert apply_bytes(R1, patch) == new
    assert set(info.candidates) >= {"zstd", "bsdiff"}


@settings(max_examples=60, deadline=None)
@given(
    old=st.binary(max_size=3000),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 40), st.binary(max_size=40)),
                   max_size=8),
)
def test_random_bytes_round_trip(old: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    new = bytearray(old)
    for pos, cut, insert in edits:
        at = min(pos, len(new))
        new[at : at + cut] = insert
    patch, info = make_patch_bytes(old, bytes(new), QUICK)
    assert info.mode == "bytes"
    assert apply_bytes(old, patch) == bytes(new)


@settings(max_examples=20, deadline=None)
@given(old=st.binary(max_size=500), new=st.binary(max_size=500))
def test_unrelated_files_round_trip(old: bytes, new: bytes) -> None:
    patch, _ = make_patch_bytes(old, new, QUICK)
    assert apply_bytes(old, patch) == new


def _offset_buffer_model(base: bytes) -> tuple[bytes, int]:
    """``base`` re-serialized with every buffer appended after the flatbuffer.

    Returns the file and the flatbuffer's length.
    """
    model = schema.ModelT.InitFromPackedBuf(base, 0)
    blobs = []
    for buf in model.buffers:
        data = b"" if buf.data is None else np.asarray(buf.data, np.uint8).tobytes()
        blobs.append(data)
        buf.data = None
        buf.offset, buf.size = (1 << 40, len(data)) if data else (0, 0)

    def pack() -> bytes:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = pack()  # placeholder offsets keep every field, so the length is final
    cursor = -(-len(head) // 16) * 16
    for buf, data in zip(model.buffers, blobs, strict=True):
        if data:
            buf.offset = cursor
            cursor = -(-(cursor + len(data)) // 16) * 16
    head = pack()
    out = bytearray(head)
    for buf, data in zip(model.buffers, blobs, strict=True):
        if data:
            out += bytes(buf.offset - len(out)) + data
    return bytes(out), len(head)


def test_buffers_stored_after_the_flatbuffer_are_matched() -> None:
    old, _ = _offset_buffer_model(R1)
    new, head = _offset_buffer_model(R2)
    consts = parse_constants(new)
    assert consts is not None and len(consts) == len(parse_constants(R2) or [])
    assert all(c.offset >= head for c in consts)
    patch, info = make_patch_bytes(old, new, QUICK)
    assert info.method == "tflite"
    assert apply_bytes(old, patch) == new


@pytest.mark.parametrize("garbage", [b"", b"TFL3", b"\x00" * 8 + b"TFL3" * 8, R1[:64]])
def test_garbage_that_looks_like_tflite_falls_back_to_bytes(garbage: bytes) -> None:
    assert parse_constants(garbage) is None or parse_constants(garbage) == []
    patch, info = make_patch_bytes(garbage, R1[:2000], QUICK)
    assert info.mode == "bytes"
    assert apply_bytes(garbage, patch) == R1[:2000]

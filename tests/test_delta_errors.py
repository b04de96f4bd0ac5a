"""Bad patches are refused with one-line reasons and never leave a partial output."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.errors import AgentError
from agent.delta import (
    CorruptPatchError,
    DeltaConfig,
    DeltaError,
    DeltaInputError,
    TruncatedPatchError,
    WrongBaseError,
    apply_bytes,
    apply_delta,
    make_patch_bytes,
    read_header,
)

FIXTURES = Path(__file__).parent / "fixtures"
R1 = (FIXTURES / "digits_int8_r1.tflite").read_bytes()
R2 = (FIXTURES / "digits_int8_r2.tflite").read_bytes()
QUICK = DeltaConfig(zstd_level=3, full_probe_bytes=0)
MODEL_PATCH, _ = make_patch_bytes(R1, R2, QUICK)
BYTES_PATCH, _ = make_patch_bytes(R1[:20000], R1[:9000] + b"edgefleet" + R1[9000:20000], QUICK)
PATCHES = {"tflite": MODEL_PATCH, "bytes": BYTES_PATCH}
SENTINEL = b"previous release, must survive"


def _setup(tmp_path: Path, patch: bytes, base: bytes = R1) -> tuple[Path, Path, Path]:
    (tmp_path / "old").write_bytes(base)
    (tmp_path / "p.efd").write_bytes(patch)
    out = tmp_path / "model.tflite"
    out.write_bytes(SENTINEL)
    return tmp_path / "old", tmp_path / "p.efd", out


def _assert_untouched(tmp_path: Path, out: Path) -> None:
    assert out.read_bytes() == SENTINEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite", "old", "p.efd"]


def test_errors_belong_to_the_agent_tree() -> None:
    for cls in (WrongBaseError, CorruptPatchError, TruncatedPatchError, DeltaInputError):
        assert issubclass(cls, DeltaError) and issubclass(cls, AgentError)
    assert issubclass(TruncatedPatchError, CorruptPatchError)


def test_wrong_base_is_refused_before_decoding(tmp_path: Path) -> None:
    old, patch, out = _setup(tmp_path, MODEL_PATCH, base=R2)
    with pytest.raises(WrongBaseError) as caught:
        apply_delta(old, patch, out)
    message = str(caught.value)
    assert message.startswith("wrong base: patch needs base sha256 f8ec1a46")
    assert "\n" not in message
    _assert_untouched(tmp_path, out)


@pytest.mark.parametrize("kind", sorted(PATCHES))
def test_every_truncation_is_reported_as_truncated(tmp_path: Path, kind: str) -> None:
    patch = PATCHES[kind]
    for length in sorted({0, 1, 3, 50, 77, 78, 79, len(patch) // 2, len(patch) - 5,
                          len(patch) - 4, len(patch) - 1}):
        old, path, out = _setup(tmp_path, patch[:length])
        with pytest.raises(TruncatedPatchError, match=r"^truncated patch"):
            apply_delta(old, path, out)
        _assert_untouched(tmp_path, out)


@pytest.mark.parametrize("kind", sorted(PATCHES))
def test_flipped_bits_are_caught_by_the_checksum(tmp_path: Path, kind: str) -> None:
    patch = PATCHES[kind]
    for pos in (0, 5, 6, 20, 50, 90, len(patch) // 2, len(patch) - 6, len(patch) - 1):
        bad = bytearray(patch)
        bad[pos] ^= 0x10
        old, path, out = _setup(tmp_path, bytes(bad))
        with pytest.raises(CorruptPatchError):
            apply_delta(old, path, out)
        _assert_untouched(tmp_path, out)


def test_trailing_bytes_are_corrupt_not_truncated() -> None:
    with pytest.raises(CorruptPatchError, match="stray bytes") as caught:
        apply_bytes(R1, MODEL_PATCH + b"\x00")
    assert not isinstance(caught.value, TruncatedPatchError)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"PK\x03\x04" + bytes(200), "bad magic"),
        (R1, "bad magic"),
        (b"EFDL\x09" + bytes(100), "unsupported delta format version 9"),
        (b"EFDL\x01\x07" + bytes(100), "unknown method 7"),
    ],
)
def test_foreign_files_are_named_as_such(tmp_path: Path, blob: bytes, reason: str) -> None:
    old, path, out = _setup(tmp_path, blob)
    with pytest.raises(CorruptPatchError, match=reason):
        apply_delta(old, path, out)
    _assert_untouched(tmp_path, out)
    with pytest.raises(CorruptPatchError):
        read_header(path)


def test_unreadable_inputs_raise_delta_input_errors(tmp_path: Path) -> None:
    old, patch, out = _setup(tmp_path, MODEL_PATCH)
    with pytest.raises(DeltaInputError, match="cannot read patch"):
        apply_delta(old, tmp_path / "missing.efd", out)
    with pytest.raises(DeltaInputError, match="cannot read base"):
        apply_delta(tmp_path / "missing", patch, out)
    _assert_untouched(tmp_path, out)


def test_success_replaces_the_output_atomically(tmp_path: Path) -> None:
    old, patch, out = _setup(tmp_path, MODEL_PATCH)
    info = apply_delta(old, patch, out)
    assert out.read_bytes() == R2
    assert info.mode == "tflite" and info.patch_length == len(MODEL_PATCH)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite", "old", "p.efd"]


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(PATCHES)),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1,
                   max_size=4),
)
def test_crafted_patches_with_valid_checksums_fail_cleanly(
    kind: str, edits: list[tuple[int, int]]
) -> None:
    """A hostile sender can fix the CRC; the decoder must still only raise DeltaError."""
    patch = PATCHES[kind]
    body = bytearray(patch[:-4])
    for pos, value in edits:
        body[pos % len(body)] = value
    try:
        result = apply_bytes(R1 if kind == "tflite" else R1[:20000], _with_crc(bytes(body)))
    except DeltaError as err:
        assert "\n" not in str(err)
    else:  # an edit that changes nothing decodable still has to produce the target
        assert len(result) == (len(R2) if kind == "tflite" else 20009)

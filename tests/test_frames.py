"""agent.inference.sources on real image and array files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from agent.common.errors import FrameSourceError
from agent.inference.sources import DirSource, FrameConfig, frame_shape, open_source

GOLDEN = Path(__file__).parent / "fixtures" / "golden_frames"
SHAPE = (1, 32, 32, 3)


def test_dir_of_png_and_npy_yields_matching_frames() -> None:
    source = open_source(f"dir:{GOLDEN}", SHAPE)
    files = sorted(p for p in GOLDEN.iterdir() if p.suffix in (".png", ".npy"))
    frames = [next(source) for _ in files]
    for frame in frames:
        assert frame.shape == (32, 32, 3) and frame.dtype == np.float32
        assert float(frame.min()) >= 0.0 and float(frame.max()) <= 1.0
        assert not frame.flags.writeable
    # Each PNG is the uint8 rendering of its .npy twin.
    by_name = dict(zip((p.name for p in files), frames, strict=True))
    for npy in GOLDEN.glob("*.npy"):
        png = by_name[npy.with_suffix(".png").name]
        assert float(np.abs(png - by_name[npy.name]).max()) <= 1 / 255 + 1e-6
        np.testing.assert_array_equal(by_name[npy.name], np.load(npy))


def test_dir_source_cycles_forever() -> None:
    source = open_source(f"dir:{GOLDEN}", SHAPE)
    count = len([p for p in GOLDEN.iterdir() if p.suffix in (".png", ".npy")])
    first = [next(source) for _ in range(count)]
    again = [next(source) for _ in range(count)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_cycles_without_cache_too(tmp_path: Path) -> None:
    shutil.copy(GOLDEN / "digit_1_0.npy", tmp_path)
    source = open_source(f"dir:{tmp_path}", SHAPE, FrameConfig(cache_bytes=0))
    a, b = next(source), next(source)
    np.testing.assert_array_equal(a, b)


def test_images_are_resized_and_converted(tmp_path: Path) -> None:
    rgba = np.zeros((120, 90, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "big.png")
    Image.fromarray(np.full((40, 40), 128, np.uint8), "L").save(tmp_path / "gray.jpg")
    source = open_source(f"dir:{tmp_path}", (32, 32, 3))
    red, gray = next(source), next(source)  # sorted: big.png, gray.jpg
    assert red.shape == gray.shape == (32, 32, 3)
    np.testing.assert_allclose(red[..., 0], 1.0)
    np.testing.assert_allclose(red[..., 1:], 0.0)
    assert abs(float(gray.mean()) - 128 / 255) < 0.02


def test_npy_batches_grayscale_and_uint8(tmp_path: Path) -> None:
    batch = np.stack([np.full((32, 32, 3), v, np.float32) for v in (0.1, 0.2, 0.3)])
    np.save(tmp_path / "a_batch.npy", batch)
    np.save(tmp_path / "b_gray.npy", np.full((32, 32), 51, np.uint8))
    source = open_source(f"dir:{tmp_path}", SHAPE)
    values = [float(next(source).mean()) for _ in range(4)]
    assert values == pytest.approx([0.1, 0.2, 0.3, 0.2])
    assert next(source).shape == (32, 32, 3)


def test_synthetic_is_deterministic_and_in_range() -> None:
    a = open_source("synthetic", SHAPE)
    b = open_source("synthetic", (32, 32, 3))
    c = open_source("synthetic:7", SHAPE)
    fa, fb, fc = next(a), next(b), next(c)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(fa, fc)
    assert fa.dtype == np.float32 and fa.shape == (32, 32, 3)
    assert float(fa.min()) >= 0.0 and float(fa.max()) < 1.0
    assert not np.array_equal(fa, next(a))


@pytest.mark.parametrize(("spec", "match"), [
    ("camera:/dev/video0", "unknown frame source"),
    ("", "unknown frame source"),
    ("dir:", "needs a path"),
    ("synthetic:abc", "not an integer"),
    ("synthetic:-1", "must not be negative"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(FrameSourceError, match=match):
        open_source(spec, SHAPE)


def test_bad_shapes() -> None:
    for shape in ((32, 32), (2, 32, 32, 3), (32, 32, 4), (0, 32, 3)):
        with pytest.raises(FrameSourceError, match="frame shape"):
            frame_shape(shape)


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(FrameSourceError, match="does not exist"):
        open_source(f"dir:{tmp_path / 'absent'}", SHAPE)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(FrameSourceError, match="holds no"):
        open_source(f"dir:{tmp_path}", SHAPE)


def test_too_many_files(tmp_path: Path) -> None:
    for i in range(3):
        shutil.copy(GOLDEN / "digit_1_0.npy", tmp_path / f"{i}.npy")
    with pytest.raises(FrameSourceError, match="over the limit of 2"):
        open_source(f"dir:{tmp_path}", SHAPE, FrameConfig(max_files=2))


def test_images_without_pillow_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(GOLDEN / "digit_1_0.png", tmp_path)
    # A None entry in sys.modules makes `import PIL.Image` fail as if Pillow were absent.
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(FrameSourceError, match="Pillow is not installed"):
        open_source(f"dir:{tmp_path}", SHAPE)


def test_npy_only_dirs_need_no_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(GOLDEN / "digit_1_0.npy", tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    assert next(open_source(f"dir:{tmp_path}", SHAPE)).shape == (32, 32, 3)


def test_corrupt_file_is_skipped_and_the_rest_still_cycle(tmp_path: Path) -> None:
    (tmp_path / "a_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    shutil.copy(GOLDEN / "digit_2_1.npy", tmp_path / "b_good.npy")
    source = open_source(f"dir:{tmp_path}", SHAPE)
    good = np.load(tmp_path / "b_good.npy")
    for _ in range(3):
        np.testing.assert_array_equal(next(source), good)
    assert isinstance(source, DirSource) and source.file_count == 1


@pytest.mark.parametrize(("content", "match"), [
    (b"\x89PNG\r\n\x1a\n truncated", "cannot be decoded"),
    (b"\x93NUMPY garbage", "cannot be read as .npy"),
])
def test_only_unreadable_files_is_an_error(tmp_path: Path, content: bytes, match: str) -> None:
    suffix = ".png" if content.startswith(b"\x89PNG") else ".npy"
    (tmp_path / f"frame{suffix}").write_bytes(content)
    source = open_source(f"dir:{tmp_path}", SHAPE)
    with pytest.raises(FrameSourceError, match=match):
        next(source)


@pytest.mark.parametrize(("array", "match"), [
    (np.zeros((28, 28, 3), np.float32), "has shape"),
    (np.full((32, 32, 3), 255.0, np.float32), "must be in"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((32, 32, 3), np.int32), "dtype"),
    (np.zeros((0, 32, 32, 3), np.float32), "no frames"),
])
def test_bad_arrays(tmp_path: Path, array: npt.NDArray[np.generic], match: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    source = open_source(f"dir:{tmp_path}", SHAPE)
    with pytest.raises(FrameSourceError, match=match):
        next(source)


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FrameSourceError, match="cannot be read"):
        next(open_source(f"dir:{tmp_path}", SHAPE))

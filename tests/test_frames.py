"""agent.inference.sources on real image and array files: frames in camera space."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from agent.common.errors import FrameSourceError
from agent.inference.sources import (
    DirSource,
    Frame,
    FrameConfig,
    SourceState,
    SourceStats,
    frame_shape,
    open_source,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden_frames"
SHAPE = (1, 32, 32, 3)


def assert_camera_frame(frame: Frame, height: int, width: int) -> None:
    assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
    assert frame.flags.c_contiguous and not frame.flags.writeable


def test_dir_of_png_and_npy_yields_camera_frames() -> None:
    source = open_source(f"dir:{GOLDEN}", SHAPE)
    files = sorted(p for p in GOLDEN.iterdir() if p.suffix in (".png", ".npy"))
    frames = [next(source) for _ in files]
    for frame in frames:
        assert_camera_frame(frame, 32, 32)
    # Each PNG is the uint8 rendering of its legacy float .npy twin: round(x * 255).
    by_name = dict(zip((p.name for p in files), frames, strict=True))
    for npy in GOLDEN.glob("*.npy"):
        png = by_name[npy.with_suffix(".png").name]
        expected = np.round(np.load(npy).astype(np.float64) * 255).astype(np.uint8)
        np.testing.assert_array_equal(by_name[npy.name], expected)
        np.testing.assert_array_equal(png, np.asarray(Image.open(npy.with_suffix(".png"))))


def test_dir_source_cycles_forever_and_counts() -> None:
    source = open_source(f"dir:{GOLDEN}", SHAPE)
    count = len([p for p in GOLDEN.iterdir() if p.suffix in (".png", ".npy")])
    first = [next(source) for _ in range(count)]
    again = [next(source) for _ in range(count)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = source.stats()
    assert stats == SourceStats(SourceState.STREAMING, 0.0, 2 * count, 2 * count, 0, 0, 0, 0.0)
    assert stats.as_dict()["state"] == "streaming"
    assert source.health().ok


def test_every_frame_mode_makes_one_pass(tmp_path: Path) -> None:
    for name in ("digit_1_0.npy", "digit_2_1.npy"):
        shutil.copy(GOLDEN / name, tmp_path)
    source = open_source(f"dir:{tmp_path}", every_frame=True)
    assert len(list(source)) == 2
    assert source.stats().state is SourceState.ENDED
    looping = open_source(f"dir:{tmp_path}", every_frame=True, loop=True)
    assert len([next(looping) for _ in range(5)]) == 5


def test_cycles_without_cache_too(tmp_path: Path) -> None:
    shutil.copy(GOLDEN / "digit_1_0.npy", tmp_path)
    source = open_source(f"dir:{tmp_path}", SHAPE, FrameConfig(cache_bytes=0))
    a, b = next(source), next(source)
    np.testing.assert_array_equal(a, b)


def test_images_keep_their_size_and_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((120, 90, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "big.png")
    Image.fromarray(np.full((40, 50), 128, np.uint8), "L").save(tmp_path / "gray.jpg")
    source = open_source(f"dir:{tmp_path}", (32, 32, 3))  # the model's shape changes nothing
    red, gray = next(source), next(source)  # sorted: big.png, gray.jpg
    assert_camera_frame(red, 120, 90)
    assert_camera_frame(gray, 40, 50)
    assert (red[..., 0] == 255).all() and (red[..., 1:] == 0).all()
    assert abs(float(gray.mean()) - 128) <= 2 and (gray[..., 0] == gray[..., 2]).all()


def test_npy_batches_grayscale_uint8_and_legacy_floats(tmp_path: Path) -> None:
    batch = np.stack([np.full((24, 20, 3), v, np.float32) for v in (0.1, 0.2, 0.25)])
    np.save(tmp_path / "a_batch.npy", batch)
    np.save(tmp_path / "b_gray.npy", np.full((32, 32), 51, np.uint8))
    np.save(tmp_path / "c_gray1.npy", np.full((8, 9, 1), 7, np.uint8))
    np.save(tmp_path / "d_rgb.npy", np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    source = open_source(f"dir:{tmp_path}")
    floats = [next(source) for _ in range(3)]
    assert [int(f[0, 0, 0]) for f in floats] == [26, 51, 64]  # round(x * 255)
    assert_camera_frame(floats[0], 24, 20)
    gray = next(source)
    assert_camera_frame(gray, 32, 32)
    assert (gray == 51).all()
    gray1 = next(source)
    assert_camera_frame(gray1, 8, 9)
    np.testing.assert_array_equal(next(source), np.load(tmp_path / "d_rgb.npy"))


def test_floats_just_outside_the_unit_range_are_rounding(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.array([[[-0.0005, 0.5, 1.0005]]], np.float32))
    assert next(open_source(f"dir:{tmp_path}")).tolist() == [[[0, 128, 255]]]


def test_synthetic_is_deterministic_uint8_rgb() -> None:
    a = open_source("synthetic", SHAPE)
    b = open_source("synthetic", (32, 32, 3))
    c = open_source("synthetic:7", SHAPE)
    fa, fb, fc = next(a), next(b), next(c)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(fa, fc)
    assert_camera_frame(fa, 32, 32)
    assert int(fa.min()) < 10 and int(fa.max()) > 245
    assert not np.array_equal(fa, next(a))
    assert a.stats().frames_delivered == 2
    assert 0 < a.captured_ns <= time.perf_counter_ns()


def test_synthetic_defaults_to_vga_and_ignores_channels() -> None:
    assert_camera_frame(next(open_source("synthetic")), 480, 640)
    assert_camera_frame(next(open_source("synthetic:3", (1, 96, 128, 1))), 96, 128)


def test_closed_sources_refuse_frames() -> None:
    with open_source("synthetic") as source:
        next(source)
    assert source.stats().state is SourceState.CLOSED
    with pytest.raises(FrameSourceError, match="is closed"):
        next(source)


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
    with pytest.raises(FrameSourceError, match="frame shape"):
        open_source("synthetic", (3, 224, 224, 3))


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
    np.save(tmp_path / "b_good.npy", np.full((5, 6, 3), 9, np.uint8))
    source = open_source(f"dir:{tmp_path}", SHAPE)
    for _ in range(3):
        np.testing.assert_array_equal(next(source), np.load(tmp_path / "b_good.npy"))
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
    (np.zeros((28, 28, 4), np.uint8), "has shape"),
    (np.zeros((2, 3, 28, 28, 3), np.uint8), "has shape"),
    (np.zeros((0, 28, 3), np.uint8), "has shape"),
    (np.full((32, 32, 3), 255.0, np.float32), "must be in"),
    (np.full((32, 32, 3), -0.5, np.float64), "must be in"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((32, 32, 3), np.int32), "dtype"),
    (np.zeros((0, 32, 32, 3), np.float32), "no frames"),
])
def test_bad_arrays(tmp_path: Path, array: npt.NDArray[np.generic], match: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    source = open_source(f"dir:{tmp_path}", SHAPE)
    with pytest.raises(FrameSourceError, match=match) as caught:
        next(source)
    assert "bad.npy" in str(caught.value) and "\n" not in str(caught.value)


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FrameSourceError, match="cannot be read"):
        next(open_source(f"dir:{tmp_path}", SHAPE))

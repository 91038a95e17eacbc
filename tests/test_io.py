"""Tests for lorun_fast.io: image reading conventions, folder listing and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorun_fast import io as lio
from lorun_fast.io import (
    atomic_write_bytes,
    atomic_write_text,
    data_root,
    list_images,
    read_gray,
    read_rgb,
    rgb_to_y,
    write_png_atomic,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _gray_ramp(h: int = 6, w: int = 5) -> np.ndarray:
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 7 % 256).astype(np.uint8)


def _leftover_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------------
# data_root
# ----------------------------------------------------------------------------------------------------------------
def test_data_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORUN_DATA", str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere"


def test_data_root_relative_env_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORUN_DATA", "rel/data")
    assert data_root() == tmp_path / "rel" / "data"


def _requires_source_checkout() -> None:
    if Path(lio.__file__).resolve().parent.parent != REPO_ROOT:
        pytest.skip("lorun_fast is not imported from this checkout (non-editable install)")


def test_data_root_default_is_beside_repo(monkeypatch):
    _requires_source_checkout()
    monkeypatch.delenv("LORUN_DATA", raising=False)
    assert data_root() == REPO_ROOT.parent / "shared" / "data"


def test_data_root_empty_env_means_default(monkeypatch):
    _requires_source_checkout()
    monkeypatch.setenv("LORUN_DATA", "")
    assert data_root() == REPO_ROOT.parent / "shared" / "data"


def test_data_root_does_not_raise_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("LORUN_DATA", str(tmp_path / "absent"))
    assert not data_root().exists()


# ----------------------------------------------------------------------------------------------------------------
# read_gray
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_read_gray_8bit_gray_unchanged(tmp_path, suffix):
    gray = _gray_ramp()
    path = tmp_path / f"g{suffix}"
    Image.fromarray(gray).save(path)
    out = read_gray(path)
    assert out.dtype == np.uint8 and out.shape == gray.shape
    np.testing.assert_array_equal(out, gray)


def test_read_gray_palette_tiff_with_gray_palette(tmp_path):
    # Like Set11's Parrots.tif / foreman.tif: 'P' mode, palette index == gray value.
    values = _gray_ramp()
    img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    path = tmp_path / "pal.tif"
    img.save(path)
    assert Image.open(path).mode == "P"
    out = read_gray(path)
    assert out.dtype == np.uint8 and out.ndim == 2
    np.testing.assert_array_equal(out, values)
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("L")))


def test_read_gray_palette_with_gray_but_permuted_palette(tmp_path):
    # Gray palette whose index != value: the palette must be applied, not the raw indices returned.
    indices = _gray_ramp()
    img = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    img.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    path = tmp_path / "pal_inv.png"
    img.save(path)
    np.testing.assert_array_equal(read_gray(path), 255 - indices)


def test_read_gray_colour_palette_uses_luma(tmp_path):
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (12, 200, 77)]
    img = Image.frombytes("P", (2, 2), indices.tobytes())
    img.putpalette([c for rgb in colours for c in rgb] + [0] * (3 * (256 - len(colours))))
    path = tmp_path / "pal_col.png"
    img.save(path)
    # Expected values are those of OpenCV (see test_read_gray_rgb_matches_opencv).
    np.testing.assert_array_equal(read_gray(path), np.array([[76, 150], [29, 130]], dtype=np.uint8))


def test_read_gray_rgb_with_equal_channels_keeps_values(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "grey_as_rgb.png"
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(path)
    assert Image.open(path).mode == "RGB"
    out = read_gray(path)
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    np.testing.assert_array_equal(out, gray)


def test_read_gray_rgb_matches_opencv(tmp_path):
    # Expected Y values were computed with opencv-python-headless 5.0.0 in a throwaway venv:
    #   cv2.cvtColor(rgb[..., ::-1], cv2.COLOR_BGR2YCrCb)[..., 0]
    # The last three pixels are colours where OpenCV's fixed-point result differs from
    # round(0.299 R + 0.587 G + 0.114 B) (which gives 28, 123, 169) and from PIL's convert("L").
    # (An exhaustive check over all 2**24 colours against OpenCV found no mismatch.)
    pixels = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (12, 200, 77), (255, 255, 255),
              (0, 0, 250), (7, 196, 47), (167, 195, 36)]
    expected_opencv = [76, 150, 29, 130, 255, 29, 122, 168]
    rgb = np.array(pixels, dtype=np.uint8).reshape(1, -1, 3)
    path = tmp_path / "colours.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(read_gray(path)[0], expected_opencv)


def test_read_gray_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = [[0, 128, 255], [255, 0, 7]]
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    assert Image.open(path).mode == "RGBA"
    np.testing.assert_array_equal(read_gray(path), np.full((2, 3), 100, dtype=np.uint8))


def test_read_gray_16bit_is_refused_with_clear_error(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    with pytest.raises(ValueError, match="mode") as info:
        read_gray(path)
    assert str(path) in str(info.value)


def test_read_gray_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError) as info:
        read_gray(path)
    assert str(path) in str(info.value)


def test_read_gray_not_an_image_names_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG")
    with pytest.raises(ValueError) as info:
        read_gray(path)
    assert str(path) in str(info.value)


def test_read_gray_truncated_file_names_path(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        read_gray(path)
    assert str(path) in str(info.value)


def test_read_gray_folder_is_not_a_file(tmp_path):
    with pytest.raises(ValueError) as info:
        read_gray(tmp_path)
    assert str(tmp_path) in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# read_rgb / rgb_to_y
# ----------------------------------------------------------------------------------------------------------------
def test_read_rgb_roundtrip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "c.png"
    Image.fromarray(rgb).save(path)
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_rgb_expands_gray_and_drops_alpha(tmp_path):
    gray = _gray_ramp()
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "g.png"), np.repeat(gray[..., None], 3, axis=2))

    rgba = np.dstack([np.full((2, 2), v, dtype=np.uint8) for v in (10, 20, 30, 0)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), rgba[..., :3])


def test_read_rgb_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_rgb(tmp_path / "missing.png")


def test_rgb_to_y_black_white_and_hand_value():
    img = np.array([[[0, 0, 0], [255, 255, 255], [10, 100, 200]]], dtype=np.uint8)
    y = rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 3)
    hand = 16.0 + (65.481 * 10 + 128.553 * 100 + 24.966 * 200) / 255.0  # = 89.6831...
    np.testing.assert_allclose(y[0], [16.0, 235.0, hand], rtol=0, atol=1e-12)


def test_rgb_to_y_is_not_rounded():
    y = rgb_to_y(np.array([[[1, 2, 3]]], dtype=np.uint8))
    assert y[0, 0] != round(y[0, 0])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float64)])
def test_rgb_to_y_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="rgb_to_y"):
        rgb_to_y(bad)


# ----------------------------------------------------------------------------------------------------------------
# list_images
# ----------------------------------------------------------------------------------------------------------------
def test_list_images_sorted_case_insensitive_and_filtered(tmp_path):
    names = ["b.PNG", "a.tif", "c.TIFF", "d.bmp", "e.Jpg", "f.jpeg"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "readme.txt").write_text("no")
    (tmp_path / "._a.png").write_bytes(b"resource fork")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "sub.png" / "inner.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == sorted(names)
    assert all(isinstance(p, Path) for p in list_images(str(tmp_path)))


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        list_images(tmp_path / "absent")
    assert "absent" in str(info.value)


def test_list_images_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError) as info:
        list_images(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_list_images_on_a_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="x.png"):
        list_images(path)


# ----------------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_write_bytes_and_text_create_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c.bin"
    assert atomic_write_bytes(target, b"\x00\x01\xff") == target
    assert target.read_bytes() == b"\x00\x01\xff"
    text_target = tmp_path / "t" / "notes.txt"
    atomic_write_text(text_target, "héllo\nwörld\n")
    assert text_target.read_bytes() == "héllo\nwörld\n".encode("utf-8")
    assert _leftover_temp_files(target.parent) == [] and _leftover_temp_files(text_target.parent) == []


def test_atomic_write_overwrites(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_respects_umask_like_open(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions only")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write_text(atomic, "x")
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


def test_atomic_write_failure_at_replace_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(lio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_failure_while_writing_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError("simulated disk error")

    monkeypatch.setattr(lio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_type_errors(tmp_path):
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "x", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str"):
        atomic_write_text(tmp_path / "x", b"bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_write_png_atomic_gray_and_rgb_roundtrip(tmp_path):
    gray = _gray_ramp()
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    gpath = write_png_atomic(tmp_path / "out" / "deeper" / "g.png", gray)
    cpath = write_png_atomic(tmp_path / "out" / "c.png", rgb)
    with Image.open(gpath) as img:
        assert img.format == "PNG" and img.mode == "L"
    with Image.open(cpath) as img:
        assert img.format == "PNG" and img.mode == "RGB"
    np.testing.assert_array_equal(read_gray(gpath), gray)
    np.testing.assert_array_equal(read_rgb(cpath), rgb)
    assert _leftover_temp_files(gpath.parent) == [] and _leftover_temp_files(cpath.parent) == []


def test_write_png_atomic_float_is_clipped_and_rounded(tmp_path):
    values = np.array([[-0.2, 0.0, 0.5, 1.0, 1.5, 0.1 / 255, 0.6 / 255]], dtype=np.float64)
    path = write_png_atomic(tmp_path / "f.png", values)
    # 0.5 * 255 = 127.5 rounds (half to even) to 128; 0.1 -> 0; 0.6 -> 1.
    np.testing.assert_array_equal(read_gray(path)[0], [0, 0, 128, 255, 255, 0, 1])
    rgb = np.full((2, 2, 3), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(read_rgb(write_png_atomic(tmp_path / "c.png", rgb)), 64)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 3, 4), np.uint8), "shape"),
    (np.zeros((3,), np.uint8), "shape"),
    (np.zeros((3, 3), np.int64), "dtype"),
    (np.array([[0.5, np.nan]]), "NaN"),
    (np.zeros((0, 3), np.uint8), "empty"),
])
def test_write_png_atomic_rejects_bad_arrays(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_png_atomic(tmp_path / "bad.png", bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Real data (skipped when the shared data folder is absent)
# ----------------------------------------------------------------------------------------------------------------
SET11_SIZES = {
    "Monarch": 256, "Parrots": 256, "barbara": 256, "boats": 256, "cameraman": 256, "fingerprint": 512,
    "flinstones": 512, "foreman": 256, "house": 256, "lena256": 256, "peppers256": 256,
}


def _require(folder_name: str) -> Path:
    folder = data_root() / folder_name
    if not folder.exists():
        pytest.skip(f"real data folder {folder} not found (set LORUN_DATA to the shared data folder)")
    return folder


@pytest.mark.data
def test_set11_images_read_as_gray_with_expected_sizes():
    paths = list_images(_require("Set11"))
    assert sorted(p.stem for p in paths) == sorted(SET11_SIZES)
    for path in paths:
        img = read_gray(path)
        side = SET11_SIZES[path.stem]
        assert img.dtype == np.uint8 and img.shape == (side, side), path.name


@pytest.mark.data
@pytest.mark.parametrize("name", ["Parrots", "foreman"])
def test_set11_palette_images_become_gray(name):
    path = _require("Set11") / f"{name}.tif"
    with Image.open(path) as raw:
        assert raw.mode == "P"
        expected = np.asarray(raw.convert("L"))
    img = read_gray(path)
    assert img.ndim == 2 and img.dtype == np.uint8
    np.testing.assert_array_equal(img, expected)
    assert img.std() > 10  # a real picture, not palette indices collapsed to a constant


@pytest.mark.data
def test_set5_reads_as_rgb():
    expected_hw = {"baby": (512, 512), "bird": (288, 288), "butterfly": (256, 256), "head": (280, 280),
                   "woman": (344, 228)}
    paths = list_images(_require("Set5"))
    assert sorted(p.stem for p in paths) == sorted(expected_hw)
    for path in paths:
        img = read_rgb(path)
        assert img.dtype == np.uint8 and img.shape == (*expected_hw[path.stem], 3), path.name
        y = rgb_to_y(img)
        assert 16.0 <= y.min() and y.max() <= 235.0

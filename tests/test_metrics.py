"""Tests for lorun_fast.metrics: ISTA-Net PSNR and scikit-image-compatible SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorun_fast.io import data_root, read_gray
from lorun_fast.metrics import psnr, ssim


def _deterministic_pair() -> tuple[np.ndarray, np.ndarray]:
    """A small 12x10 pair built from integer formulas (no RNG, so identical on every numpy version)."""
    i, j = np.mgrid[0:12, 0:10]
    x = ((i * 37 + j * 11) % 256).astype(np.float64)
    ref = ((i * i + 3 * j) % 256).astype(np.float64)
    return x, ref


# ----------------------------------------------------------------------------------------------------------------
# PSNR
# ----------------------------------------------------------------------------------------------------------------
def test_psnr_hand_computed():
    x = np.zeros((2, 2))
    ref = np.array([[0.0, 0.0], [0.0, 2.0]])  # MSE = 4 / 4 = 1
    assert psnr(x, ref) == pytest.approx(20 * math.log10(255.0), abs=1e-12)
    assert psnr(x, ref, data_range=1.0) == pytest.approx(0.0, abs=1e-12)


def test_psnr_non_trivial_value():
    x = np.array([[10.0, 20.0, 30.0]])
    ref = np.array([[12.0, 17.0, 30.5]])  # MSE = (4 + 9 + 0.25) / 3
    expected = 20 * math.log10(255.0 / math.sqrt(13.25 / 3))
    assert psnr(x, ref) == pytest.approx(expected, abs=1e-12)
    assert psnr(ref, x) == psnr(x, ref)


def test_psnr_identical_is_inf():
    img = np.arange(12.0).reshape(3, 4)
    assert psnr(img, img) == float("inf")


def test_psnr_uint8_inputs_do_not_wrap_around():
    # With raw uint8 subtraction 0 - 255 would wrap to 1; the metric must see a difference of 255.
    x = np.zeros((2, 2), dtype=np.uint8)
    ref = np.full((2, 2), 255, dtype=np.uint8)
    assert psnr(x, ref) == pytest.approx(0.0, abs=1e-12)


def test_psnr_returns_python_float():
    x, ref = _deterministic_pair()
    assert type(psnr(x, ref)) is float


def test_psnr_shape_mismatch():
    with pytest.raises(ValueError, match=r"psnr: .*\(2, 3\).*\(3, 2\)"):
        psnr(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("data_range", [0.0, -1.0, float("nan"), float("inf")])
def test_psnr_bad_data_range(data_range):
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((2, 2)), np.ones((2, 2)), data_range=data_range)


# ----------------------------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------------------------
def test_ssim_identical_is_one():
    x, _ = _deterministic_pair()
    assert ssim(x, x) == 1.0
    flat = np.full((9, 9), 77.0)
    assert ssim(flat, flat) == 1.0


def test_ssim_hard_coded_skimage_values():
    # Expected values obtained with scikit-image 0.26.0 (numpy 2.4.6, scipy 1.17.1) in a throwaway venv:
    #   from skimage.metrics import structural_similarity
    #   structural_similarity(x, ref, data_range=255)  -> -0.027523983197044216
    #   structural_similarity(x, ref, data_range=100.0) -> -0.032895530707063365
    # for x, ref = _deterministic_pair(). Our implementation reproduced both bit for bit.
    x, ref = _deterministic_pair()
    assert ssim(x, ref) == pytest.approx(-0.027523983197044216, abs=1e-12)
    assert ssim(x, ref, data_range=100.0) == pytest.approx(-0.032895530707063365, abs=1e-12)


def test_ssim_constant_images_hard_coded():
    # skimage 0.26.0: structural_similarity(np.full((10, 10), 3.0), np.full((10, 10), 200.0), data_range=255)
    #   -> 0.030150877150674295 (only the luminance term and the constants C1, C2 contribute).
    a, b = np.full((10, 10), 3.0), np.full((10, 10), 200.0)
    assert ssim(a, b) == pytest.approx(0.030150877150674295, abs=1e-12)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 3 * 200 + c1) / (3**2 + 200**2 + c1), abs=1e-12)


def test_ssim_is_symmetric_and_accepts_uint8():
    x, ref = _deterministic_pair()
    assert ssim(x, ref) == ssim(ref, x)
    assert ssim(x.astype(np.uint8), ref.astype(np.uint8)) == ssim(x, ref)


def _naive_ssim(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Straight from the definition: every 7x7 window fully inside the image, sample (ddof=1) statistics.

    These windows are exactly the centres kept after skimage's 3-pixel border crop, so no padding is involved.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for r in range(3, x.shape[0] - 3):
        for c in range(3, x.shape[1] - 3):
            a = x[r - 3:r + 4, c - 3:c + 4].ravel()
            b = ref[r - 3:r + 4, c - 3:c + 4].ravel()
            cov = np.cov(a, b, ddof=1)
            values.append((2 * a.mean() * b.mean() + c1) * (2 * cov[0, 1] + c2)
                          / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    return float(np.mean(values))


def test_ssim_matches_naive_definition_with_border_crop():
    x, ref = _deterministic_pair()
    assert ssim(x, ref) == pytest.approx(_naive_ssim(x, ref, 255.0), abs=1e-12)
    rng = np.random.default_rng(7)
    a, b = rng.random((15, 11)), rng.random((15, 11))
    assert ssim(a, b, data_range=1.0) == pytest.approx(_naive_ssim(a, b, 1.0), abs=1e-12)


def test_ssim_returns_python_float():
    x, ref = _deterministic_pair()
    assert type(ssim(x, ref)) is float


def _shape_pattern(shape: tuple[int, int]) -> str:
    return r"\(" + ", ".join(str(s) for s in shape) + r"\)"


@pytest.mark.parametrize("shape", [(6, 6), (6, 20), (20, 6)])
def test_ssim_rejects_images_smaller_than_window(shape):
    with pytest.raises(ValueError, match=r"at least 7x7.*" + _shape_pattern(shape)):
        ssim(np.zeros(shape), np.zeros(shape))


def test_ssim_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_ssim_shape_mismatch():
    with pytest.raises(ValueError, match="ssim: x and ref must have the same shape"):
        ssim(np.zeros((8, 8)), np.zeros((8, 9)))


def test_ssim_bad_data_range():
    with pytest.raises(ValueError, match="data_range"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)), data_range=0)


def test_ssim_matches_skimage_on_random_data():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1234)
    for shape in [(7, 7), (8, 13), (33, 33), (64, 100)]:
        for scale in (1.0, 255.0):
            ref = rng.random(shape) * scale
            x = np.clip(ref + rng.normal(0.0, 0.1 * scale, shape), 0.0, scale)
            expected = skimage_metrics.structural_similarity(x, ref, data_range=scale)
            assert ssim(x, ref, data_range=scale) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Real data (skipped when the shared data folder is absent)
# ----------------------------------------------------------------------------------------------------------------
def _cameraman() -> np.ndarray:
    folder = data_root() / "Set11"
    if not folder.exists():
        pytest.skip(f"real data folder {folder} not found (set LORUN_DATA to the shared data folder)")
    return read_gray(folder / "cameraman.tif")


@pytest.mark.data
def test_metrics_on_set11_cameraman_hard_coded():
    # A deterministic "reconstruction": cameraman plus a 12-gray-level sinusoidal pattern, clipped.
    # Expected values from scikit-image 0.26.0 structural_similarity(noisy, gray, data_range=255) and the
    # ISTA-Net PSNR formula; our ssim reproduced the skimage value bit for bit.
    gray = _cameraman().astype(np.float64)
    i, j = np.mgrid[0:256, 0:256]
    noisy = np.clip(gray + 12.0 * np.sin(0.7 * i + 1.3 * j), 0.0, 255.0)
    assert ssim(noisy, gray) == pytest.approx(0.6864005825307724, abs=1e-12)
    assert psnr(noisy, gray) == pytest.approx(29.585557582883865, abs=1e-10)


@pytest.mark.data
def test_ssim_matches_skimage_on_set11_with_noise():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    gray = _cameraman()
    rng = np.random.default_rng(5)
    rec = np.clip(gray / 255.0 + rng.normal(0.0, 10 / 255.0, gray.shape), 0.0, 1.0) * 255.0
    expected = skimage_metrics.structural_similarity(rec, gray.astype(np.float64), data_range=255)
    assert ssim(rec, gray) == pytest.approx(expected, abs=1e-12)

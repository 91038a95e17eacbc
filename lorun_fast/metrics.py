"""Image quality metrics, written to reproduce the published CS evaluation numbers exactly.

* :func:`psnr` is ISTA-Net's formula (``20·log10(255 / √MSE)`` on float images, no rounding).
* :func:`ssim` is scikit-image's ``structural_similarity(x, ref, data_range=...)`` with its defaults, which is
  what ISTA-Net and most CS papers report. It is *not* the 11×11 Gaussian SSIM of Wang et al. (2004) or of
  torchmetrics, which gives different values.
* :func:`ssim_gaussian` is that 11×11 Gaussian SSIM of Wang et al.: with ``padding="valid"`` it is MATLAB's
  ``ssim_index`` (and BasicSR's ``calculate_ssim``), the SSIM the super-resolution literature reports; with
  ``padding="same"`` it is the zero-padded variant the CASSI literature (MST and its successors) reports.

scikit-image is deliberately not a dependency; the tests cross-check against it when it is installed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d, uniform_filter

__all__ = ["psnr", "ssim", "ssim_gaussian", "SSIM_WIN_SIZE", "SSIM_GAUSSIAN_WIN_SIZE"]

#: Side of skimage's default uniform SSIM window; images must be at least this large.
SSIM_WIN_SIZE = 7
#: Side of the Gaussian SSIM window of Wang et al. (σ = 1.5); images must be at least this large.
SSIM_GAUSSIAN_WIN_SIZE = 11
_SSIM_GAUSSIAN_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _float64_pair(x: np.ndarray, ref: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 arrays of the same, non-empty shape.

    Casting first also avoids the uint8 wrap-around of ``x - ref`` that a direct difference of two
    uint8 images would give.
    """
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"{who}: x and ref must have the same shape, got x {x.shape} and ref {ref.shape}")
    if x.size == 0:
        raise ValueError(f"{who}: images are empty (shape {x.shape})")
    return x, ref


def _check_data_range(data_range: float, who: str) -> float:
    data_range = float(data_range)
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"{who}: data_range must be a positive finite number, got {data_range}")
    return data_range


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, exactly as ISTA-Net computes it.

    ``MSE = mean((x - ref)²)`` over all pixels in float64 and ``PSNR = 20·log10(data_range / √MSE)``.
    For Set11 pass the unrounded reconstruction ``x_rec * 255`` and the uint8 original with the default
    ``data_range=255``.

    Identical images (MSE = 0) give ``float('inf')``, the mathematically right value. ISTA-Net's code
    returned 100 there instead; this never happens on real reconstructions, but an average containing an
    inf is easy to spot, while a made-up 100 is not.
    """
    x, ref = _float64_pair(x, ref, "psnr")
    data_range = _check_data_range(data_range, "psnr")
    mse = float(np.mean((x - ref) ** 2))
    if mse == 0.0:
        return float("inf")
    return 20.0 * math.log10(data_range / math.sqrt(mse))


def _ssim_inputs(x, ref, data_range, name: str, window: int):
    """Both images as float64 2-D arrays of one shape, at least ``window`` on each side, and the data range."""
    x, ref = _float64_pair(x, ref, name)
    data_range = _check_data_range(data_range, name)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected 2-D gray images of shape (H, W), got shape {x.shape}; "
                         "compute it per channel or on the Y channel for colour images")
    if min(x.shape) < window:
        raise ValueError(f"{name}: images must be at least {window}x{window} (the SSIM window), got shape {x.shape}")
    return x, ref, data_range


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two 2-D gray images, equal to skimage's ``structural_similarity(x, ref, data_range=...)``.

    The skimage defaults reproduced here, all in float64 (skimage itself would drop to float32 when given
    float32 input; this function always casts to float64 first):

    * local means, variances and covariance from a 7×7 uniform window, ``scipy.ndimage.uniform_filter``
      with its default ``mode='reflect'`` border handling;
    * sample (co)variances: the window moments are scaled by N/(N−1) with N = 49;
    * ``C1 = (0.01·data_range)²``, ``C2 = (0.03·data_range)²``;
    * ``S = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`` per pixel;
    * the SSIM map is averaged after dropping (7 − 1) // 2 = 3 pixels on every border, where the window
      would reach into the reflected padding.

    The result is symmetric in ``x`` and ``ref``. Images smaller than 7×7 are rejected, like skimage does.
    """
    x, ref, data_range = _ssim_inputs(x, ref, data_range, "ssim", SSIM_WIN_SIZE)

    ssim_map = _ssim_map(x, ref, data_range)
    pad = (SSIM_WIN_SIZE - 1) // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean(dtype=np.float64))


def _ssim_map(x: np.ndarray, ref: np.ndarray, data_range: float) -> np.ndarray:
    """Per-pixel SSIM (uncropped) with the uniform window and sample covariance, see :func:`ssim`.

    The arithmetic is grouped the same way as skimage's so that the two agree to the last few ulps,
    not just to a tolerance.
    """
    def local_mean(img: np.ndarray) -> np.ndarray:
        return uniform_filter(img, size=SSIM_WIN_SIZE)

    n = SSIM_WIN_SIZE ** 2
    cov_norm = n / (n - 1)
    mu_x, mu_r = local_mean(x), local_mean(ref)
    var_x = cov_norm * (local_mean(x * x) - mu_x * mu_x)
    var_r = cov_norm * (local_mean(ref * ref) - mu_r * mu_r)
    cov_xr = cov_norm * (local_mean(x * ref) - mu_x * mu_r)

    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_x * mu_r + c1) * (2 * cov_xr + c2)
    denominator = (mu_x ** 2 + mu_r ** 2 + c1) * (var_x + var_r + c2)
    return numerator / denominator


def _gaussian_window_1d() -> np.ndarray:
    """The normalised 1-D factor of MATLAB's ``fspecial('gaussian', 11, 1.5)`` (the 2-D window is its outer
    product, because a normalised isotropic Gaussian on a square grid separates exactly)."""
    half = SSIM_GAUSSIAN_WIN_SIZE // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    window = np.exp(-(offsets ** 2) / (2.0 * _SSIM_GAUSSIAN_SIGMA ** 2))
    return window / window.sum()


def ssim_gaussian(x: np.ndarray, ref: np.ndarray, data_range: float = 255.0, padding: str = "valid") -> float:
    """Mean SSIM of two 2-D gray images with the 11×11 Gaussian window (σ = 1.5) of Wang et al. (2004).

    Per pixel, with local statistics weighted by the normalised Gaussian window ``w``:
    ``μ = w ⋆ img``, ``σ² = w ⋆ img² − μ²``, ``σxy = w ⋆ (x·ref) − μx μr`` (population moments, no N/(N−1)),
    ``C1 = (0.01·data_range)²``, ``C2 = (0.03·data_range)²`` and
    ``S = (2 μx μr + C1)(2 σxy + C2) / ((μx² + μr² + C1)(σx² + σr² + C2))``; the result is the mean of S.

    ``padding`` says where S is evaluated:

    * ``"valid"`` (default): only where the whole window lies inside the image, an (H−10)×(W−10) map. This is
      MATLAB's ``ssim_index`` (``filter2(w, img, 'valid')``) and BasicSR's ``calculate_ssim``, i.e. the SSIM of
      the super-resolution papers (computed there on the border-shaved Y channel, see
      :mod:`lorun_fast.tasks.sr`).
    * ``"same"``: an H×W map, the image zero-padded by 5 on every side before filtering, as MST's
      ``torch_ssim`` does for CASSI (there on [0, 1] images, i.e. ``data_range=1``). The zeros enter the local
      statistics near the border, so this differs from ``"valid"`` (in either direction).

    Everything is computed in float64. Images smaller than 11×11 are rejected for both paddings: "valid"
    would have no pixel left, and in "same" every pixel would be dominated by the zero padding.
    """
    if padding not in ("valid", "same"):
        raise ValueError(f"ssim_gaussian: padding must be 'valid' or 'same', got {padding!r}")
    x, ref, data_range = _ssim_inputs(x, ref, data_range, "ssim_gaussian", SSIM_GAUSSIAN_WIN_SIZE)

    window = _gaussian_window_1d()

    def local_mean(img: np.ndarray) -> np.ndarray:
        # Zero padding gives the "same" map; its interior, where no zero enters the window, is exactly
        # the "valid" map, so one filter serves both.
        out = correlate1d(img, window, axis=0, mode="constant", cval=0.0)
        return correlate1d(out, window, axis=1, mode="constant", cval=0.0)

    mu_x, mu_r = local_mean(x), local_mean(ref)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_r = local_mean(ref * ref) - mu_r * mu_r
    cov_xr = local_mean(x * ref) - mu_x * mu_r

    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_r + c1) * (2 * cov_xr + c2)) / ((mu_x ** 2 + mu_r ** 2 + c1) * (var_x + var_r + c2))
    if padding == "valid":
        half = SSIM_GAUSSIAN_WIN_SIZE // 2
        ssim_map = ssim_map[half:-half, half:-half]
    return float(ssim_map.mean(dtype=np.float64))

"""Image quality metrics, written to reproduce the published CS evaluation numbers exactly.

* :func:`psnr` is ISTA-Net's formula (``20·log10(255 / √MSE)`` on float images, no rounding).
* :func:`ssim` is scikit-image's ``structural_similarity(x, ref, data_range=...)`` with its defaults, which is
  what ISTA-Net and most CS papers report. It is *not* the 11×11 Gaussian SSIM of Wang et al. (2004) or of
  torchmetrics, which gives different values.

scikit-image is deliberately not a dependency; the tests cross-check against it when it is installed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import uniform_filter

__all__ = ["psnr", "ssim", "SSIM_WIN_SIZE"]

#: Side of skimage's default uniform SSIM window; images must be at least this large.
SSIM_WIN_SIZE = 7
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
    x, ref = _float64_pair(x, ref, "ssim")
    data_range = _check_data_range(data_range, "ssim")
    if x.ndim != 2:
        raise ValueError(f"ssim: expected 2-D gray images of shape (H, W), got shape {x.shape}; "
                         "compute it per channel or on the Y channel for colour images")
    if min(x.shape) < SSIM_WIN_SIZE:
        raise ValueError(f"ssim: images must be at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} (the SSIM window), "
                         f"got shape {x.shape}")

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

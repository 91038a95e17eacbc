"""Bicubic super-resolution: the degradation and evaluation protocol of the SR benchmarks (Set5, Set14, ...).

The protocol, pinned down by reproducing the published bicubic baseline on Set5 (mean Y-PSNR / SSIM
33.66 / 0.9299 at ×2, 30.39 / 0.8682 at ×3, 28.42 / 0.8104 at ×4, the "Bicubic" row of VDSR, EDSR, RCAN, ...):

1. **HR**: the 8-bit image, cropped at the bottom and right to a multiple of the scale (:func:`modcrop`,
   MATLAB's ``modcrop``); e.g. Set5's 280×280 ``head`` becomes 279×279 at ×3.
2. **LR**: MATLAB ``imresize(HR, 1/s, 'bicubic')`` on the *uint8* image (:func:`degrade_bicubic`). MATLAB
   resizes one dimension at a time, rows (height) first, and ``imresize``'s inner routine returns the class of
   its input: each pass computes in double and then rounds (half away from zero) and saturates to uint8, so
   the rows-resized image is already quantised before the columns are resized. :func:`matlab_imresize_uint8`
   does exactly that; the arithmetic of each pass is :mod:`lorun_fast.reference.bicubic`'s matrices.
3. **Bicubic SR**: ``imresize(LR, s, 'bicubic')`` on the uint8 LR, the same two quantised passes; the output is
   uint8 (:func:`upscale_bicubic`, :func:`bicubic_baseline`).
4. **Y channel** of both SR and HR (:func:`y_channel`): for RGB the BT.601 luma of ``lorun_fast.io.rgb_to_y``,
   ``16 + (65.481 R + 128.553 G + 24.966 B)/255`` as float, *not* rounded (BasicSR / SwinIR practice). For a
   gray image the gray values themselves are used as Y (no [16, 235] rescaling): a gray image has no colour to
   remove, and BasicSR's ``to_y_channel`` likewise leaves single-channel images as they are.
5. **Shave** ``s`` pixels from every border of both Y images (:func:`shave`).
6. **Scores** (:func:`sr_scores`): PSNR with peak 255 on the float Y (``lorun_fast.metrics.psnr``) and the
   11×11 Gaussian SSIM on the 'valid' region (``lorun_fast.metrics.ssim_gaussian``, MATLAB ``ssim_index``),
   both per image; the benchmark figure is the mean over images.

Measured with this module on Set5 (``tests/test_task_sr.py``), mean Y-PSNR / SSIM:

=====  =================  ==================
scale  this protocol      published
=====  =================  ==================
×2     33.673 / 0.9303    33.66 / 0.9299
×3     30.403 / 0.8689    30.39 / 0.8682
×4     28.429 / 0.8111    28.42 / 0.8104
=====  =================  ==================

Per image at ×2: baby 37.08, bird 36.82, butterfly 27.44, head 34.88, woman 32.15 dB. The published figures
cannot tell the remaining details apart, all of these stay within 0.03 dB / 0.002 of them:

* rounding Y to uint8 as MATLAB's ``rgb2ycbcr`` does on uint8 input: 33.640 / 30.385 / 28.416 dB (0.9292 /
  0.8678 / 0.8101) — the published SSIMs sit between the float-Y and rounded-Y values;
* rounding each ``imresize`` only once at the end instead of after each pass: < 0.005 dB difference;
* scoring the unrounded (float) bicubic output: + 0.005 to 0.01 dB;
* SRCNN's own route (MATLAB's uint8 Y of the HR first, then both resizes on that Y in float, unrounded):
  33.677 / 30.399 / 28.426 dB.

The float Y of ``rgb_to_y`` is kept because the Python SR evaluation code (BasicSR, SwinIR) uses it, so
networks scored here compare with their published numbers; per-pass rounding is kept because it is what MATLAB
does.

**Gaussian blur + decimation** (:class:`SRDegradation` with ``kind="gaussian"``) is the other degradation: the
USRNet-style ``y = (k ∗ x)↓s`` of ``lorun_fast.reference.SuperResolution`` with an isotropic Gaussian ``k``
(σ = 1.6 and a 2⌈3σ⌉ + 1 square support unless given), circular boundaries and plain decimation (every s-th
pixel from the first). Its LR test images are that operator applied to the 8-bit HR in float64 and rounded to
8 bits; the Y channel, shave and scores are the protocol above, and the "bicubic" baseline is MATLAB bicubic
upscaling of that LR. No published table exists for it (every paper picks its own kernels), so it serves
experiments with a known blur rather than comparison with the benchmark numbers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from lorun_fast.io import read_rgb, rgb_to_y
from lorun_fast.metrics import SSIM_GAUSSIAN_WIN_SIZE, psnr, ssim_gaussian
from lorun_fast.names import DEGRADATIONS  # MATLAB bicubic (the benchmarks'), or Gaussian blur + decimation
from lorun_fast.reference.bicubic import SUPPORTED_SCALES, imresize_matrix

__all__ = ["SRScores", "SUPPORTED_SCALES", "DEGRADATIONS", "SRDegradation", "TASK", "SRTask", "evaluate_sr",
           "reconstruct_y", "sr_input", "colour_sr",
           "bicubic_baseline", "degrade_bicubic", "matlab_imresize_uint8",
           "modcrop", "read_hr", "shave", "sr_scores", "upscale_bicubic", "y_channel"]

# Kernel support of MATLAB's bicubic: 4 pixels at the low resolution, i.e. 4·s HR pixels when downscaling.
_KERNEL_WIDTH = 4

#: The Gaussian blur's default standard deviation in HR pixels.
DEFAULT_BLUR_SIGMA = 1.6


class SRScores(NamedTuple):
    """Per-image SR scores on the shaved Y channel: PSNR in dB and the Gaussian SSIM."""

    psnr: float
    ssim: float


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or int(scale) not in SUPPORTED_SCALES:
        raise ValueError(f"scale: bicubic SR supports the integer scales {SUPPORTED_SCALES}, got {scale!r}")
    return int(scale)


def _check_uint8_image(img, name: str) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"{name}: expected a uint8 image (the SR protocol works on 8-bit images), got dtype "
                        f"{img.dtype}")
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3))):
        raise ValueError(f"{name}: expected shape (H, W) or (H, W, 3), got {img.shape}")
    return img


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop (H, W[, C]) to ``H − H mod s`` × ``W − W mod s``, keeping the top-left corner (MATLAB ``modcrop``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3):
        raise ValueError(f"img: expected a (H, W) or (H, W, C) array, got {getattr(img, 'shape', type(img))}")
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def _round_saturate_uint8(values: np.ndarray) -> np.ndarray:
    """MATLAB's double → uint8 conversion: round half away from zero, then saturate to [0, 255].

    Clipping first and then ``floor(v + 0.5)`` is the same map, and differs from ``np.round`` (half to even)
    on exact ties, which the dyadic ×2 and ×4 weights do produce on 8-bit input.
    """
    return np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def matlab_imresize_uint8(img: np.ndarray, scale: float | None = None, *,
                          size: tuple[int, int] | None = None) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (or ``imresize(img, size)``), bicubic, on a uint8 (H, W[, C]) image.

    Rows first, then columns (MATLAB's order for equal scales), each pass in float64 with the
    :func:`~lorun_fast.reference.bicubic.imresize_matrix` weights and rounded/saturated to uint8 as MATLAB's
    resize routine does for integer input. Downscaling uses the antialiased kernel.
    """
    img = _check_uint8_image(img, "img")
    h, w = img.shape[:2]
    if (scale is None) == (size is None):
        raise ValueError("matlab_imresize_uint8: give exactly one of scale and size")
    if size is not None:
        rows = imresize_matrix(h, out_length=int(size[0])).numpy()
        cols = imresize_matrix(w, out_length=int(size[1])).numpy()
    else:
        rows = imresize_matrix(h, scale=scale).numpy()
        cols = imresize_matrix(w, scale=scale).numpy()
    planes = img[..., None] if img.ndim == 2 else img
    out = np.empty((rows.shape[0], cols.shape[0], planes.shape[2]), dtype=np.uint8)
    for c in range(planes.shape[2]):
        first = _round_saturate_uint8(rows @ planes[..., c].astype(np.float64))
        out[..., c] = _round_saturate_uint8(first.astype(np.float64) @ cols.T)
    return out[..., 0] if img.ndim == 2 else out


def _check_hr_for_scale(hr: np.ndarray, scale: int, name: str) -> None:
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"{name}: image {h}×{w} is not a multiple of the scale {scale}; modcrop it first")
    if h < _KERNEL_WIDTH * scale or w < _KERNEL_WIDTH * scale:
        raise ValueError(f"{name}: image {h}×{w} is smaller than the ×1/{scale} bicubic kernel's support "
                         f"({_KERNEL_WIDTH * scale}×{_KERNEL_WIDTH * scale})")


def degrade_bicubic(hr_uint8: np.ndarray, scale: int) -> np.ndarray:
    """The benchmark LR image: MATLAB ``imresize(HR, 1/scale, 'bicubic')`` of the uint8 HR, as uint8.

    ``hr_uint8`` is (H, W) or (H, W, 3) with H and W multiples of ``scale`` (see :func:`modcrop`).
    """
    scale = _check_scale(scale)
    hr = _check_uint8_image(hr_uint8, "hr_uint8")
    _check_hr_for_scale(hr, scale, "hr_uint8")
    h, w = hr.shape[:2]
    return matlab_imresize_uint8(hr, size=(h // scale, w // scale))


def upscale_bicubic(lr_uint8: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic SR baseline: MATLAB ``imresize(LR, scale, 'bicubic')`` of the uint8 LR, as uint8."""
    scale = _check_scale(scale)
    lr = _check_uint8_image(lr_uint8, "lr_uint8")
    h, w = lr.shape[:2]
    if h < _KERNEL_WIDTH or w < _KERNEL_WIDTH:
        raise ValueError(f"lr_uint8: image {h}×{w} is smaller than the bicubic kernel's support "
                         f"({_KERNEL_WIDTH}×{_KERNEL_WIDTH})")
    return matlab_imresize_uint8(lr, size=(h * scale, w * scale))


def y_channel(img: np.ndarray) -> np.ndarray:
    """The channel SR is scored on, float64 on [0, 255]: ``rgb_to_y`` for RGB, the gray values for gray."""
    img = _check_uint8_image(img, "img")
    if img.ndim == 3 and img.shape[2] == 3:
        return rgb_to_y(img)
    return (img[..., 0] if img.ndim == 3 else img).astype(np.float64)


def shave(img: np.ndarray, border: int) -> np.ndarray:
    """``img`` without ``border`` pixels on each of its four sides."""
    if isinstance(border, bool) or not isinstance(border, (int, np.integer)) or border < 0:
        raise ValueError(f"border: expected a non-negative int, got {border!r}")
    if border == 0:
        return img
    h, w = img.shape[:2]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"img: {h}×{w} has nothing left after shaving {border} pixels from each border")
    return img[border:-border, border:-border]


def _check_float_y(img, name: str) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D Y channel (H, W), got shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
        raise TypeError(f"{name}: expected a real-valued image, got dtype {img.dtype}")
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        bad = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN or inf); a diverged model output?")
    return img


def sr_scores(sr_y: np.ndarray, hr_y: np.ndarray, scale: int) -> SRScores:
    """PSNR (peak 255) and valid-window Gaussian SSIM of two Y channels on [0, 255], ``scale`` pixels shaved.

    Both are 2-D float (or integer) arrays of the same shape, e.g. :func:`y_channel` of the uint8 SR output
    and of the modcropped HR.
    """
    scale = _check_scale(scale)
    sr_y = _check_float_y(sr_y, "sr_y")
    hr_y = _check_float_y(hr_y, "hr_y")
    if sr_y.shape != hr_y.shape:
        raise ValueError(f"sr_y, hr_y: shapes differ, {sr_y.shape} vs {hr_y.shape}; is the SR output "
                         f"{scale}× its LR input and the HR modcropped to a multiple of {scale}?")
    sr_y, hr_y = shave(sr_y, scale), shave(hr_y, scale)
    if min(sr_y.shape) < SSIM_GAUSSIAN_WIN_SIZE:
        raise ValueError(f"sr_y: {sr_y.shape} after shaving {scale} pixels is smaller than the "
                         f"{SSIM_GAUSSIAN_WIN_SIZE}×{SSIM_GAUSSIAN_WIN_SIZE} SSIM window")
    return SRScores(psnr(sr_y, hr_y, data_range=255.0), ssim_gaussian(sr_y, hr_y, data_range=255.0))


def _rawmodes(img: Image.Image) -> list[str]:
    """The decoder raw modes of a not-yet-loaded image (PNG gives a string, TIFF a tuple starting with it)."""
    modes = []
    for tile in img.tile:
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, tuple) and args:
            args = args[0]
        if isinstance(args, str):
            modes.append(args)
    return modes


def read_hr(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit test image as uint8: (H, W) when stored as gray (or gray palette), (H, W, 3) otherwise.

    16-bit files are refused with an error naming the file: 16-bit gray by ``lorun_fast.io``'s readers, and
    16-bit RGB here, because PIL decodes it as 8-bit RGB by keeping only the high byte of each sample.
    """
    path = Path(path)
    rgb = read_rgb(path)  # missing, unreadable, 16-bit gray and float files fail here, naming the path
    with Image.open(path) as probe:
        mode = probe.mode
        rawmodes = _rawmodes(probe)
    sixteen = [m for m in rawmodes if ";16" in m]
    if sixteen:
        raise ValueError(f"'{path}' stores 16 bits per sample (raw mode {sixteen[0]}); the SR protocol is "
                         "defined on 8-bit images, convert it deliberately")
    if mode in ("L", "LA", "1"):
        return rgb[..., 0].copy()
    if mode in ("P", "PA") and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0].copy()
    return rgb


@dataclass(frozen=True)
class SRDegradation:
    """How an HR image becomes the LR one: ``kind`` "bicubic" (MATLAB ``imresize``, the benchmarks') or
    "gaussian" (blur with an isotropic Gaussian of ``blur_sigma`` HR pixels on a ``blur_size``² support, circular
    boundaries, then every ``scale``-th pixel). ``blur_sigma`` / ``blur_size`` belong to "gaussian" only; left
    ``None`` they are 1.6 and 2⌈3σ⌉ + 1."""

    scale: int = 4
    kind: str = "bicubic"
    blur_sigma: float | None = None
    blur_size: int | None = None

    def __post_init__(self):
        _check_scale(self.scale)
        if self.kind not in DEGRADATIONS:
            raise ValueError(f"degradation: expected one of {DEGRADATIONS}, got {self.kind!r}")
        if self.kind == "bicubic":
            if self.blur_sigma is not None or self.blur_size is not None:
                raise ValueError("blur_sigma, blur_size: options of the gaussian degradation, not of bicubic")
            return
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"blur_sigma: expected a finite number > 0, got {self.blur_sigma!r}")
        size = self.size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"blur_size: expected an odd positive int, got {self.blur_size!r}")

    @property
    def sigma(self) -> float:
        return DEFAULT_BLUR_SIGMA if self.blur_sigma is None else self.blur_sigma

    @property
    def size(self) -> int:
        return 2 * math.ceil(3 * self.sigma) + 1 if self.blur_size is None else self.blur_size

    @classmethod
    def from_record(cls, record: dict | None) -> "SRDegradation":
        """The degradation a checkpoint's task record names (records without one are bicubic ×4 or ×scale)."""
        record = record or {}
        kind = record.get("degradation", "bicubic")
        scale = int(record.get("scale", 4))
        if kind == "gaussian":
            return cls(scale, kind, float(record["blur_sigma"]), int(record["blur_size"]))
        return cls(scale, kind)

    def record(self) -> dict:
        """The part of a task record that names this degradation (sizes resolved, so a record is explicit)."""
        if self.kind == "gaussian":
            return {"scale": self.scale, "degradation": "gaussian", "blur_sigma": self.sigma, "blur_size": self.size}
        return {"scale": self.scale, "degradation": "bicubic"}

    def describe(self) -> str:
        if self.kind == "gaussian":
            return (f"Gaussian blur σ = {self.sigma:g} ({self.size}×{self.size}, circular) + ×1/{self.scale} "
                    "decimation")
        return f"MATLAB bicubic ×1/{self.scale}"

    def operator(self):
        """The DUN's degradation operator: ``BicubicSR`` or ``SuperResolution`` with the Gaussian kernel."""
        if self.kind == "gaussian":
            from lorun_fast.reference.operators import SuperResolution, gaussian_kernel

            return SuperResolution(gaussian_kernel(self.size, self.sigma), self.scale)
        from lorun_fast.reference.bicubic import BicubicSR

        return BicubicSR(self.scale)

    def min_size(self) -> int:
        """The smallest HR side the operator is defined on."""
        if self.kind == "gaussian":
            return max(self.scale, self.size // 2 + 1)
        return _KERNEL_WIDTH * self.scale

    def check_hr(self, hr: np.ndarray, name: str) -> None:
        """``hr`` (a modcropped (H, W[, C]) image) is a multiple of the scale and large enough for the kernel."""
        if self.kind == "bicubic":
            _check_hr_for_scale(hr, self.scale, name)
            return
        h, w = hr.shape[:2]
        if h % self.scale or w % self.scale:
            raise ValueError(f"{name}: image {h}×{w} is not a multiple of the scale {self.scale}; modcrop it first")
        if min(h, w) < self.min_size():
            raise ValueError(f"{name}: image {h}×{w} is smaller than the {self.size}×{self.size} blur kernel's "
                             f"reach ({self.min_size()} pixels)")

    def degrade(self, hr_uint8: np.ndarray) -> np.ndarray:
        """The LR test image of an 8-bit HR (modcropped), as uint8."""
        hr = _check_uint8_image(hr_uint8, "hr_uint8")
        self.check_hr(hr, "hr_uint8")
        if self.kind == "bicubic":
            return degrade_bicubic(hr, self.scale)
        import torch

        planes = hr[..., None] if hr.ndim == 2 else hr
        x = torch.from_numpy(np.ascontiguousarray(planes.transpose(2, 0, 1), dtype=np.float64))[None]
        lr = self.operator().A(x)[0].numpy().transpose(1, 2, 0)
        lr = _round_saturate_uint8(lr)
        return lr[..., 0] if hr.ndim == 2 else lr


def bicubic_baseline(hr_path: str | os.PathLike, scale: int,
                     lr_path: str | os.PathLike | None = None, degradation: SRDegradation | None = None) -> SRScores:
    """Scores of the bicubic baseline on one HR test image, following the module's protocol.

    The LR is ``degradation``'s (default: :func:`degrade_bicubic`) of the modcropped HR unless ``lr_path`` gives
    a stored LR image, which must then be exactly ``1/scale`` of the modcropped HR.
    """
    scale = _check_scale(scale)
    degradation = degradation or SRDegradation(scale)
    if degradation.scale != scale:
        raise ValueError(f"degradation: a ×{degradation.scale} degradation for scale {scale}")
    hr_path = Path(hr_path)
    if not hr_path.exists():
        raise FileNotFoundError(f"HR image not found: '{hr_path}'")
    hr = modcrop(read_hr(hr_path), scale)
    try:
        degradation.check_hr(hr, "hr")
    except ValueError as err:
        raise ValueError(f"'{hr_path}': {err}") from err
    if lr_path is None:
        lr = degradation.degrade(hr)
    else:
        lr = read_hr(lr_path)
        if lr.ndim != hr.ndim:
            raise ValueError(f"'{lr_path}' is {'gray' if lr.ndim == 2 else 'colour'} but its HR '{hr_path}' "
                             f"is {'gray' if hr.ndim == 2 else 'colour'}")
        if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
            raise ValueError(f"'{lr_path}': LR {lr.shape[0]}×{lr.shape[1]} times {scale} is "
                             f"{lr.shape[0] * scale}×{lr.shape[1] * scale}, but the modcropped HR '{hr_path}' "
                             f"is {hr.shape[0]}×{hr.shape[1]}")
    sr = upscale_bicubic(lr, scale)
    return sr_scores(y_channel(sr), y_channel(hr), scale)


# ----------------------------------------------------------------------------------------------------------------
# The task plug-in: a DUN on the Y channel with the bicubic operator
# ----------------------------------------------------------------------------------------------------------------
def sr_input(lr_uint8: np.ndarray) -> np.ndarray:
    """The DUN's input for an 8-bit LR image: its Y channel (gray values for gray images) on [0, 1]."""
    return y_channel(lr_uint8) / 255.0


def reconstruct_y(model, lr_uint8: np.ndarray, scale: int, device="cpu", dtype=None) -> np.ndarray:
    """The model's Y channel of the ×``scale`` image of an 8-bit LR image, float64 on [0, 255], rounded to 8-bit
    levels as a saved result would be."""
    import torch

    dtype = dtype or torch.float32
    y = torch.from_numpy(sr_input(lr_uint8))[None, None].to(device=device, dtype=dtype)
    h, w = y.shape[-2] * scale, y.shape[-1] * scale
    with torch.no_grad():
        x = model(y, (h, w))
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("model: the reconstruction holds non-finite values; the model is broken")
    return np.rint(np.clip(x[0, 0].double().cpu().numpy() * 255.0, 0.0, 255.0))


def evaluate_sr(model, paths, scale: int, device="cpu", dtype=None, progress: bool = False,
                degradation: SRDegradation | None = None):
    """The SR protocol with a model: modcrop the HR, make the 8-bit LR (``degradation``, default MATLAB
    bicubic), reconstruct Y from the LR's Y, score against the HR's Y with ``scale`` pixels shaved. One
    ``ImageResult`` per image."""
    import time

    from lorun_fast.evaluate import ImageResult, output_names

    degradation = degradation or SRDegradation(scale)
    if degradation.scale != scale:
        raise ValueError(f"degradation: a ×{degradation.scale} degradation for scale {scale}")
    paths = list(paths)
    names = output_names(paths)
    iterator = zip(names, paths)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(list(iterator), desc="eval", unit="img")
    results = []
    for name, path in iterator:
        hr = modcrop(read_hr(path), scale)
        try:
            degradation.check_hr(hr, "hr")
        except ValueError as err:
            raise ValueError(f"'{path}': {err}") from err
        lr = degradation.degrade(hr)
        start = time.perf_counter()
        try:
            sr_y = reconstruct_y(model, lr, scale, device, dtype)
        except FloatingPointError as err:
            raise FloatingPointError(f"'{path}': {err}") from err
        seconds = time.perf_counter() - start
        scores = sr_scores(sr_y, y_channel(hr), scale)
        results.append(ImageResult(name, hr.shape[0], hr.shape[1], scores.psnr, scores.ssim, seconds))
    return results


# BT.601 studio swing on 8-bit values, as MATLAB's rgb2ycbcr: [Y, Cb, Cr] = offset + M·[R, G, B] / 255.
_YCBCR = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]])
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])


def colour_sr(lr_uint8: np.ndarray, sr_y: np.ndarray, scale: int) -> np.ndarray:
    """The displayed SR image as SR papers make it: the model's Y with Cb and Cr from bicubic upscaling of the LR
    (MATLAB ``imresize``), converted back to 8-bit RGB; a gray LR gives the gray Y itself."""
    sr_y = np.asarray(sr_y, dtype=np.float64)
    if lr_uint8.ndim == 2:
        return np.clip(np.rint(sr_y), 0, 255).astype(np.uint8)
    up = upscale_bicubic(lr_uint8, scale).astype(np.float64)
    ycbcr = _YCBCR_OFFSET + up @ _YCBCR.T / 255.0
    ycbcr[..., 0] = sr_y
    rgb = (ycbcr - _YCBCR_OFFSET) @ np.linalg.inv(_YCBCR).T * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def degradation_of(config) -> SRDegradation:
    """The degradation a training configuration asks for (``scale``, ``degradation``, ``blur_sigma``,
    ``blur_size``)."""
    return SRDegradation(int(config.scale), config.degradation, config.blur_sigma, config.blur_size)


class SRTask:
    """×2/×3/×4 super-resolution of the Y channel (gray training images are their own Y), with MATLAB bicubic or
    Gaussian blur + decimation as the degradation.

    Record: ``{"task": "sr", "scale": s, "degradation": "bicubic"}`` (or ``"gaussian"`` with ``blur_sigma`` and
    ``blur_size``). Training LR images are made on the fly with the same operator and rounded to 8-bit levels, as
    the test LR images are.
    """

    name = "sr"
    default_crop = 96

    def record(self, config) -> dict:
        return {"task": self.name, **degradation_of(config).record()}

    def operator(self, record: dict):
        return SRDegradation.from_record(record).operator()

    def training_operator(self, record: dict, config):
        return self.operator(record)

    def backbone_kwargs(self, backbone: str, kwargs: dict) -> dict:
        if backbone != "resunet":
            raise ValueError(f"backbone: the sr task uses the resunet backbone, got {backbone!r}")
        return dict(kwargs)

    def default_train_images(self) -> str:
        from lorun_fast.io import data_root

        return str(data_root() / "Train400")

    def default_adapter_name(self, config) -> str:
        return f"sr_x{config.scale}"

    def check(self, config, need) -> None:
        """The SR part of ``TrainConfig.validate`` (Φ and mask options belong to other tasks)."""
        need(config.phi is None and config.qinit is None and config.gaussian_seed is None and config.mask is None
             and not config.exclude, "phi, qinit, gaussian_seed, mask, exclude: not options of the sr task")
        need(config.scale in SUPPORTED_SCALES, f"scale: expected one of {SUPPORTED_SCALES}, got {config.scale!r}")
        try:
            degradation = degradation_of(config)
        except ValueError as err:
            need(False, str(err))
        least = degradation.min_size()
        need(config.crop % config.scale == 0 and config.crop >= least,
             f"crop: expected a multiple of the scale {config.scale} of at least {least}, got {config.crop}")

    def sampler(self, config):
        from lorun_fast.tasks.cs import PatchSampler

        return PatchSampler.from_folder(config.train_images or self.default_train_images(), config.crop,
                                        config.batch_size, config.seed, config.augment)

    def rank_slice(self, batch, rank: int, world_size: int):
        per = batch.shape[0] // world_size
        return batch[rank * per:(rank + 1) * per]

    def loss(self, model, train_model, batch, device, bf16: bool):
        """MSE of the reconstruction of HR crops from their bicubic LR, rounded to 8-bit levels."""
        import torch

        x = batch.to(device)
        with torch.no_grad():
            y = torch.round(model.operator.A(x).clamp(0, 1) * 255.0) / 255.0
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            x_hat = train_model(y, tuple(x.shape[-2:]))
        return torch.nn.functional.mse_loss(x_hat.float(), x)

    def validation_files(self, folder):
        from lorun_fast.io import list_images

        return list_images(folder)

    def validate(self, model, paths, device: str, config):
        return evaluate_sr(model, paths, config.scale, device, degradation=degradation_of(config))


TASK = SRTask()

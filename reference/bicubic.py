"""MATLAB's ``imresize(·, 'bicubic')`` as separable float64 matrices, and the bicubic SR operator built on it.

The SR papers (SRCNN, VDSR, EDSR, RCAN, SwinIR, ...) make their low-resolution test images with MATLAB's
``imresize(HR, 1/s, 'bicubic')``; a network trained on another downscaler (PIL, OpenCV, ``F.interpolate``) is
evaluated on a different problem. This module reproduces MATLAB's arithmetic exactly:

* the Keys cubic kernel with a = −0.5:
  ``k(t) = 1.5|t|³ − 2.5|t|² + 1`` for |t| ≤ 1, ``−0.5|t|³ + 2.5|t|² − 4|t| + 2`` for 1 < |t| ≤ 2, else 0;
* output pixel ``x`` (1-based) samples the input at ``u = x/scale + 0.5·(1 − 1/scale)``, so pixel *edges* line
  up (0.5 ↦ 0.5), with ``scale = out/in``;
* when downscaling (scale < 1) the kernel is stretched to antialias: ``h(t) = scale·k(scale·t)``, support
  4/scale input pixels; when upscaling it is the plain ``k``;
* taps are the ``ceil(width) + 2`` input pixels from ``floor(u − width/2)``, their weights normalised to sum 1
  per output sample *before* the boundary is handled;
* out-of-range taps are mirrored, half-sample symmetric (``…, 2, 1 | 1, 2, …, n | n, n−1, …``), and a
  mirrored tap adds its weight to the pixel it lands on.

Each 1-D resize is therefore one fixed ``out × in`` matrix ``M`` with rows summing to 1, and a 2-D resize of an
(H, W) image is ``M_H · X · M_Wᵀ``: linear, with the exact adjoint ``M_Hᵀ · Y · M_W``. In floating point the
order of the two passes does not matter beyond rounding; MATLAB does rows (height) first, and the uint8
emulation in :mod:`lorun_fast.tasks.sr` follows that order because there it does matter.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .operators import Operator, _check_image

__all__ = ["BicubicSR", "SUPPORTED_SCALES", "cubic_kernel", "imresize", "imresize_matrix"]

#: The integer SR scales :class:`BicubicSR` is defined for (the ones SR benchmarks report).
SUPPORTED_SCALES = (2, 3, 4)
_KERNEL_WIDTH = 4.0


def cubic_kernel(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = −0.5 (MATLAB's ``cubic``), elementwise on a float64 array."""
    a = np.abs(np.asarray(t, dtype=np.float64))
    a2, a3 = a * a, a * a * a
    inner = (1.5 * a3 - 2.5 * a2 + 1.0) * (a <= 1.0)
    outer = (-0.5 * a3 + 2.5 * a2 - 4.0 * a + 2.0) * ((a > 1.0) & (a <= 2.0))
    return inner + outer


def _check_length(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _resolve_length_and_scale(in_length: int, out_length, scale) -> tuple[int, float]:
    """MATLAB's rules: a given scale fixes the output size to ``ceil(scale·in)`` and is used as is; a given output
    size fixes the scale to ``out/in``."""
    if (out_length is None) == (scale is None):
        raise ValueError("imresize_matrix: give exactly one of out_length and scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(f"scale: expected a number, got {type(scale).__name__}")
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale: expected a positive finite number, got {scale}")
        return math.ceil(scale * in_length), scale
    out_length = _check_length(out_length, "out_length")
    return out_length, out_length / in_length


@functools.lru_cache(maxsize=64)
def _matrix_numpy(in_length: int, out_length: int, scale: float, antialiasing: bool) -> np.ndarray:
    """The dense (out_length, in_length) float64 resize matrix; read-only because it is shared by the cache."""
    if scale < 1.0 and antialiasing:
        width = _KERNEL_WIDTH / scale

        def h(t):
            return scale * cubic_kernel(scale * t)
    else:
        width = _KERNEL_WIDTH
        h = cubic_kernel

    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may lie outside [1, n]
    weights = h(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)

    # Half-sample symmetric extension has period 2n: fold any 1-based index into [0, 2n) and mirror the top half.
    period = 2 * in_length
    folded = np.mod(indices.astype(np.int64) - 1, period)
    source = np.where(folded < in_length, folded, period - 1 - folded)

    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], source.shape)
    np.add.at(matrix, (rows, source), weights)
    matrix.setflags(write=False)
    return matrix


_TORCH_CACHE: dict[tuple, torch.Tensor] = {}
_TORCH_CACHE_MAX = 64


def imresize_matrix(in_length: int, *, out_length: int | None = None, scale: float | None = None,
                    antialiasing: bool = True, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The (out_length, in_length) matrix of MATLAB's 1-D bicubic ``imresize`` (see the module docstring).

    Give exactly one of ``out_length`` (then ``scale = out_length / in_length``) or ``scale`` (then
    ``out_length = ceil(scale · in_length)``, MATLAB's rule). ``antialiasing=False`` uses the plain kernel when
    downscaling too (MATLAB's ``'Antialiasing', false``). The weights are computed in float64 and cast once;
    results are cached per (lengths, scale, antialiasing, dtype, device), so treat the returned tensor as
    read-only.
    """
    in_length = _check_length(in_length, "in_length")
    out_length, scale = _resolve_length_and_scale(in_length, out_length, scale)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (in_length, out_length, scale, bool(antialiasing), dtype, device)
    matrix = _TORCH_CACHE.get(key)
    if matrix is None:
        array = _matrix_numpy(in_length, out_length, scale, bool(antialiasing))
        matrix = torch.from_numpy(array.copy()).to(dtype=dtype, device=device)
        if len(_TORCH_CACHE) >= _TORCH_CACHE_MAX:
            _TORCH_CACHE.pop(next(iter(_TORCH_CACHE)))
        _TORCH_CACHE[key] = matrix
    return matrix


def _apply_separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows · X · colsᵀ`` on every (H, W) slice of a (N, C, H, W) batch."""
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def imresize(x: torch.Tensor, scale: float | None = None, *, size: tuple[int, int] | None = None,
             antialiasing: bool = True) -> torch.Tensor:
    """MATLAB ``imresize(x, scale, 'bicubic')`` (or ``imresize(x, size, ...)``) of a (N, C, H, W) float tensor.

    Works in ``x``'s dtype and device without rounding or clipping (MATLAB on double input); for MATLAB's
    uint8 behaviour see :func:`lorun_fast.tasks.sr.matlab_imresize_uint8`. Upscaling (scale > 1) uses the plain
    cubic kernel, downscaling the antialiased one unless ``antialiasing=False``. Both dimensions use the same
    scale, as MATLAB does for a scalar scale.
    """
    _check_image(x, None)
    h, w = x.shape[-2:]
    if (scale is None) == (size is None):
        raise ValueError("imresize: give exactly one of scale and size")
    if size is not None:
        if len(tuple(size)) != 2:
            raise ValueError(f"size: expected (H, W), got {size!r}")
        out_h, out_w = (_check_length(s, "size") for s in size)
        rows = imresize_matrix(h, out_length=out_h, antialiasing=antialiasing, dtype=x.dtype, device=x.device)
        cols = imresize_matrix(w, out_length=out_w, antialiasing=antialiasing, dtype=x.dtype, device=x.device)
    else:
        rows = imresize_matrix(h, scale=scale, antialiasing=antialiasing, dtype=x.dtype, device=x.device)
        cols = imresize_matrix(w, scale=scale, antialiasing=antialiasing, dtype=x.dtype, device=x.device)
    return _apply_separable(x, rows, cols)


@functools.lru_cache(maxsize=None)
def _squared_norm_bound(scale: int) -> float:
    """An upper bound on ‖M‖₂² of the ×1/scale downscaling matrix that holds for every image length.

    With integer ``scale`` every output sample uses the same taps h (shifted by ``scale``), and the output grid is
    symmetric about the mirror points, so ``M`` is the restriction of a decimated convolution acting on the
    2n-periodic symmetric extension. Hence ``‖M‖₂² ≤ max_ω R(ω)`` with ``R(ω) = Σ_m c_m cos(mω)`` and ``c_m`` the
    autocorrelation of h at lag ``m·scale``. R is evaluated on a fine grid and the grid error bounded by
    ``max|R'| · spacing / 2``. The maximum is at ω = 0, where R = 1/scale (the filter's aliases vanish there),
    so the bound exceeds the true value by ~1e-5 relative; the tests compare it with the matrices' actual
    spectral norms.
    """
    taps = _matrix_numpy(16 * scale, 16, 1.0 / scale, True)[8]
    taps = np.trim_zeros(taps)  # only the ends: the ×3 taps have zeros inside (k(±1) = 0)
    autocorrelation = np.correlate(taps, taps, mode="full")
    centre = len(taps) - 1
    lags = np.arange(0, centre + 1, scale)
    c = autocorrelation[centre + lags]
    points = 1 << 16
    omega = np.linspace(0.0, math.pi, points)
    response = c[0] + 2.0 * (c[1:, None] * np.cos(np.outer(lags[1:] // scale, omega))).sum(axis=0)
    slope = 2.0 * float(np.sum((lags[1:] // scale) * np.abs(c[1:])))
    return float(response.max()) + slope * (math.pi / (points - 1)) / 2.0


class BicubicSR(Operator):
    """Bicubic super-resolution: ``A x = imresize(x, 1/scale)`` with MATLAB's antialiased bicubic kernel.

    ``x`` is a (N, C, H, W) float batch with H and W multiples of ``scale`` and at least ``4·scale`` (the
    antialiased kernel's support); ``y`` is (N, C, H/scale, W/scale). ``A`` and ``A_adjoint`` apply the cached
    float64-exact matrices in the input's dtype (``A_adjoint(y) = M_Hᵀ y M_W``), so ``<A x, y> = <x, Aᵀ y>`` holds
    to rounding. ``init`` is MATLAB's bicubic upscaling ``imresize(y, scale)``, the usual SR starting point.
    This is the degradation of the standard SR benchmarks; :class:`SuperResolution` (Gaussian blur + decimation,
    circular boundaries) stays available for the blur-kernel setting.
    """

    def __init__(self, scale: int):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or int(scale) not in SUPPORTED_SCALES:
            raise ValueError(f"scale: bicubic SR supports the integer scales {SUPPORTED_SCALES}, got {scale!r}")
        self.scale = int(scale)

    @property
    def min_size(self) -> int:
        return int(_KERNEL_WIDTH) * self.scale

    def _check_hr_size(self, size: tuple[int, int], name: str) -> None:
        h, w = size
        if h % self.scale or w % self.scale:
            raise ValueError(f"{name}: image {h}×{w} is not a multiple of the scale {self.scale}; crop it first "
                             "(lorun_fast.tasks.sr.modcrop)")
        if h < self.min_size or w < self.min_size:
            raise ValueError(f"{name}: image {h}×{w} is smaller than the ×1/{self.scale} bicubic kernel's support "
                             f"({self.min_size}×{self.min_size})")

    def _matrices(self, size: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (h, w), s = size, self.scale
        rows = imresize_matrix(h, out_length=h // s, dtype=like.dtype, device=like.device)
        cols = imresize_matrix(w, out_length=w // s, dtype=like.dtype, device=like.device)
        return rows, cols

    def image_size(self, y: torch.Tensor) -> tuple[int, int]:
        _check_image(y, None, "y")
        return (y.shape[-2] * self.scale, y.shape[-1] * self.scale)

    def _resolve_size(self, y: torch.Tensor, size) -> tuple[int, int]:
        _check_image(y, None, "y")
        expected = self.image_size(y)
        if size is None:
            size = expected
        size = tuple(int(s) for s in size)
        if size != expected:
            raise ValueError(f"size: a {tuple(y.shape[-2:])} measurement at scale {self.scale} comes from a "
                             f"{expected} image, got size {size}")
        self._check_hr_size(size, "size")
        return size

    def A(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, None)
        size = tuple(x.shape[-2:])
        self._check_hr_size(size, "x")
        rows, cols = self._matrices(size, x)
        return _apply_separable(x, rows, cols)

    def A_adjoint(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = self._resolve_size(y, size)
        rows, cols = self._matrices(size, y)
        return torch.matmul(torch.matmul(rows.transpose(0, 1), y), cols)

    def init(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """MATLAB ``imresize(y, scale, 'bicubic')``: plain cubic interpolation up to the HR size."""
        size = self._resolve_size(y, size)
        return imresize(y, size=size)

    def default_step(self) -> float:
        """1/‖A‖², with ‖A‖ = ‖M_H‖₂·‖M_W‖₂ bounded from above for every image size (``_squared_norm_bound``).

        ``‖M‖₂² = 1/scale`` for the antialiased downscaler (a constant image keeps its value and loses a factor
        ``scale`` of its pixels), so this is ``scale²`` up to ~1e-5, not 1: the blur's passband gain is 1 and
        the decimation is what shrinks the operator.
        """
        return 1.0 / _squared_norm_bound(self.scale) ** 2

    def extra_repr(self) -> str:
        return f"scale={self.scale}, kernel='bicubic (MATLAB imresize, antialiased)'"

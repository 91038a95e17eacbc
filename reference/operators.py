"""Degradation operators of the three tasks, in plain PyTorch: ``A``, ``A_adjoint``, the GD step and ``init``.

Every operator satisfies ``<A x, y> = <x, A_adjoint(y)>`` to float64 precision and defines

    gd_step(x, y, rho) = x − rho · A_adjoint(A x − y)

which is the gradient-descent module (GDM) of every DUN stage. These are the ground truth for the fused
kernels of ``lorun_fast.kernels``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Operator", "BlockCS", "CASSI", "SuperResolution", "load_mat_array", "MissingKeyError", "gaussian_kernel",
           "cs_measurement_size"]


class MissingKeyError(KeyError, ValueError):
    """A file lacks the array asked for by key: a KeyError, and a ValueError (bad input) for callers that report
    those to the user."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def load_mat_array(path, key: str) -> torch.Tensor:
    """One float64 array from a MATLAB ``.mat`` file, with errors that say which file and key went wrong."""
    import scipy.io

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{key} file: {path} is a folder; expected a .mat file")
    if not path.is_file():
        raise FileNotFoundError(f"{key} file: {path} does not exist")
    try:
        contents = scipy.io.loadmat(str(path))
    except NotImplementedError as err:  # MATLAB v7.3 files are HDF5
        raise ValueError(f"{key} file: {path} is a MATLAB v7.3 (HDF5) file; save it with -v7 ({err})") from err
    except Exception as err:
        raise ValueError(f"{key} file: {path} is not a readable .mat file ({type(err).__name__}: {err})") from err
    if key not in contents:
        keys = sorted(k for k in contents if not k.startswith("__"))
        raise MissingKeyError(f"{key} file: {path} has no key {key!r}; it has {keys}")
    array = np.asarray(contents[key])
    if np.iscomplexobj(array):
        # astype(float64) would drop the imaginary part without a word
        raise ValueError(f"{key} file: {path}[{key!r}] is complex (dtype {array.dtype}); expected a real matrix")
    if not np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
        raise ValueError(f"{key} file: {path}[{key!r}] is not numeric (dtype {array.dtype})")
    array = array.astype(np.float64)
    if array.size == 0:
        raise ValueError(f"{key} file: {path}[{key!r}] is empty (shape {array.shape})")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"{key} file: {path}[{key!r}] holds {bad} non-finite value(s) (NaN or inf)")
    return torch.from_numpy(array)


def cs_measurement_size(ratio: float, n: int = 1089) -> int:
    """Measurements per block for a sampling ratio, as ISTA-Net's matrices have them (10% → 109, 25% → 272,
    50% → 545): rounding half up, not Python's half-to-even ``round`` (which gives 544 for 50%)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio: expected a fraction in (0, 1], got {ratio}")
    return max(1, math.floor(ratio * n + 0.5))


def check_real_tensor(value, name: str, dims: int | None = None) -> torch.Tensor:
    """``value`` as given, after checking it is a real, finite torch tensor (of ``dims`` dimensions)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__module__}.{type(value).__name__}"
                        + (" (wrap it with torch.from_numpy)" if type(value).__module__ == "numpy" else ""))
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real tensor, got dtype {value.dtype}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(value.shape)})")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: holds {bad} non-finite value(s) (NaN or inf)")
    return value


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum``; floats such as 2.0 or 2.5 and bools are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value}")
    return value


def _as_step(rho, like: torch.Tensor) -> torch.Tensor:
    return rho if isinstance(rho, torch.Tensor) else torch.tensor(float(rho), dtype=like.dtype, device=like.device)


class Operator(nn.Module):
    """The interface every degradation operator implements; sizes are (H, W) of the image ``x``."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def image_size(self, y: torch.Tensor) -> tuple[int, int]:
        """The (H, W) of the image a measurement ``y`` comes from when the caller does not say."""
        raise NotImplementedError

    def init(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The DUN's starting point x0; the adjoint unless the operator knows better."""
        return self.A_adjoint(y, size)

    def gd_step(self, x: torch.Tensor, y: torch.Tensor, rho) -> torch.Tensor:
        ax = self.A(x)
        if not isinstance(y, torch.Tensor) or ax.shape != y.shape:
            # A x − y would broadcast silently (e.g. one block's or one image's measurement against many)
            raise ValueError(f"y: expected the measurement shape {tuple(ax.shape)} of x {tuple(x.shape)}, got "
                             f"{tuple(getattr(y, 'shape', ()))}")
        return x - _as_step(rho, x) * self.A_adjoint(ax - y, tuple(x.shape[-2:]))

    def default_step(self) -> float:
        """A step size no larger than 1/‖A‖², where plain gradient descent is stable."""
        return 1.0


def _check_image(x: torch.Tensor, channels: int | None, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
    if min(x.shape[1:]) < 1:  # an empty batch (N = 0) is fine; an image without pixels is not
        raise ValueError(f"{name}: expected channels and pixels (C, H, W ≥ 1), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channel(s), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


class BlockCS(Operator):
    """Block compressive sensing (ISTA-Net convention).

    The image (N, C, H, W) is zero-padded at the right and bottom to whole ``block_size`` blocks; each block,
    flattened row-major (n = block_size²), is measured as ``y_b = Φ x_b``. Measurements have shape
    (N, C, Hb, Wb, m). ``Φ`` is m × n (``phi``); ``Qinit`` (n × m), when given, makes ``init(y) = Qinit·y``.
    The adjoint crops the padding again, so A and A_adjoint are exact adjoints for any H, W ≥ block_size.
    """

    def __init__(self, phi: torch.Tensor, qinit: torch.Tensor | None = None, block_size: int = 33):
        super().__init__()
        block_size = check_int(block_size, "block_size", 1)
        n = block_size * block_size
        check_real_tensor(phi, "phi")
        if phi.dim() != 2:
            raise ValueError(f"phi: expected a 2-D matrix (m, {n}), got shape {tuple(phi.shape)}")
        if qinit is not None:
            check_real_tensor(qinit, "qinit")
        if phi.shape[1] != n:
            raise ValueError(f"phi: expected width {n} ({block_size}×{block_size} blocks), got shape "
                             f"{tuple(phi.shape)}")
        if not 1 <= phi.shape[0] <= n:
            raise ValueError(f"phi: expected 1 to {n} rows, got {phi.shape[0]}")
        if qinit is not None and tuple(qinit.shape) != (n, phi.shape[0]):
            raise ValueError(f"qinit: expected shape ({n}, {phi.shape[0]}) to match phi, got {tuple(qinit.shape)}")
        self.block_size = block_size
        self.register_buffer("phi", phi.detach().clone())
        self.register_buffer("qinit", None if qinit is None else qinit.detach().clone())

    @classmethod
    def from_mat(cls, phi_path, qinit_path=None, block_size: int = 33) -> "BlockCS":
        """ISTA-Net's files: ``phi`` (m × 1089) and optionally ``Qinit`` (1089 × m)."""
        phi = load_mat_array(phi_path, "phi")
        qinit = None if qinit_path is None else load_mat_array(qinit_path, "Qinit")
        return cls(phi, qinit, block_size)

    @classmethod
    def gaussian(cls, ratio: float, seed: int = 0, block_size: int = 33) -> "BlockCS":
        """A seeded Gaussian Φ with orthonormal rows (QR in float64), m = round(ratio · n)."""
        n = block_size * block_size
        m = cs_measurement_size(ratio, n)
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64))
        return cls(q.T.contiguous(), None, block_size)

    @property
    def num_measurements(self) -> int:
        return self.phi.shape[0]

    @property
    def ratio(self) -> float:
        return self.phi.shape[0] / self.phi.shape[1]

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        b = self.block_size
        return (math.ceil(size[0] / b) * b, math.ceil(size[1] / b) * b)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, Hb, Wb, block_size²), zero-padding to whole blocks."""
        _check_image(x, None)
        h, w = x.shape[-2:]
        b = self.block_size
        if h < b or w < b:
            raise ValueError(f"x: image {h}×{w} is smaller than one {b}×{b} block")
        hp, wp = self.padded_size((h, w))
        x = F.pad(x, (0, wp - w, 0, hp - h))
        n, c = x.shape[:2]
        x = x.reshape(n, c, hp // b, b, wp // b, b).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(n, c, hp // b, wp // b, b * b)

    def from_blocks(self, blocks: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, C, Hb, Wb, block_size²) → (N, C, H, W), cropping the padding to ``size`` (default: none)."""
        n, c, hb, wb, _ = blocks.shape
        b = self.block_size
        x = blocks.reshape(n, c, hb, wb, b, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, hb * b, wb * b)
        if size is None:
            return x
        h, w = size
        if not (hb * b - b < h <= hb * b and wb * b - b < w <= wb * b):
            raise ValueError(f"size: {h}×{w} does not match {hb}×{wb} blocks of {b}×{b}")
        return x[..., :h, :w]

    def _check_measurement(self, y: torch.Tensor) -> None:
        if not isinstance(y, torch.Tensor) or y.dim() != 5 or y.shape[-1] != self.num_measurements:
            raise ValueError(f"y: expected (N, C, Hb, Wb, {self.num_measurements}) block measurements, got "
                             f"{tuple(getattr(y, 'shape', ()))}")

    def image_size(self, y: torch.Tensor) -> tuple[int, int]:
        self._check_measurement(y)
        return (y.shape[2] * self.block_size, y.shape[3] * self.block_size)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_blocks(x) @ self.phi.to(x.dtype).T

    def A_adjoint(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        self._check_measurement(y)
        return self.from_blocks(y @ self.phi.to(y.dtype), size)

    def init(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.qinit is None:
            return self.A_adjoint(y, size)
        self._check_measurement(y)
        return self.from_blocks(y @ self.qinit.to(y.dtype).T, size)

    def default_step(self) -> float:
        """1/‖Φ‖₂²: exactly 1.0 for orthonormal rows (ISTA-Net's and the Gaussian Φ), smaller for any other Φ."""
        norm2 = float(torch.linalg.matrix_norm(self.phi.double(), ord=2)) ** 2
        return 1.0 if norm2 <= 1.0 + 1e-9 else 1.0 / norm2

    def extra_repr(self) -> str:
        return f"m={self.num_measurements}, block_size={self.block_size}, qinit={self.qinit is not None}"


class CASSI(Operator):
    """Single-disperser CASSI: ``y[h, w + step·λ] += mask[h, w]·x_λ[h, w]`` for each of ``num_bands`` bands.

    x is (N, Λ, H, W) with (H, W) the mask's size; y is (N, H, W + step·(Λ − 1)).
    """

    def __init__(self, mask: torch.Tensor, num_bands: int = 28, step: int = 2):
        super().__init__()
        check_real_tensor(mask, "mask", dims=2)
        num_bands = check_int(num_bands, "num_bands", 1)
        step = check_int(step, "step", 0)
        if not bool((mask != 0).any()):
            raise ValueError(f"mask: is zero everywhere ({tuple(mask.shape)}); nothing would be measured")
        self.num_bands = num_bands
        self.step = step
        self.register_buffer("mask", mask.detach().clone())

    @classmethod
    def from_mat(cls, path, num_bands: int = 28, step: int = 2, key: str = "mask") -> "CASSI":
        return cls(load_mat_array(path, key), num_bands, step)

    @property
    def measurement_width(self) -> int:
        return self.mask.shape[1] + self.step * (self.num_bands - 1)

    def image_size(self, y: torch.Tensor) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def _check_cube(self, x: torch.Tensor) -> None:
        _check_image(x, self.num_bands)
        if tuple(x.shape[-2:]) != tuple(self.mask.shape):
            raise ValueError(f"x: expected spatial size {tuple(self.mask.shape)} (the mask's), got "
                             f"{tuple(x.shape[-2:])}")

    def _check_measurement(self, y: torch.Tensor) -> None:
        expected = (self.mask.shape[0], self.measurement_width)
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[-2:]) != expected:
            raise ValueError(f"y: expected (N, {expected[0]}, {expected[1]}), got {tuple(getattr(y, 'shape', ()))}")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self._check_cube(x)
        width = x.shape[-1]
        mask = self.mask.to(x.dtype)
        y = x.new_zeros(x.shape[0], x.shape[2], self.measurement_width)
        for band in range(self.num_bands):
            y[..., band * self.step: band * self.step + width] += mask * x[:, band]
        return y

    def A_adjoint(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        self._check_measurement(y)
        width = self.mask.shape[1]
        mask = self.mask.to(y.dtype)
        bands = [mask * y[..., band * self.step: band * self.step + width] for band in range(self.num_bands)]
        return torch.stack(bands, dim=1)

    def init(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``A_adjoint(y / Σ_λ shift_λ(mask²))``: the usual normalised back-projection (GAP-net, TSA-Net)."""
        self._check_measurement(y)
        ones = torch.ones(1, self.num_bands, *self.mask.shape, dtype=y.dtype, device=y.device)
        weight = self.A(ones * self.mask.to(y.dtype))
        return self.A_adjoint(torch.where(weight > 0, y / weight.clamp_min(1e-12), torch.zeros_like(y)))

    def default_step(self) -> float:
        ones = torch.ones(1, self.num_bands, *self.mask.shape, dtype=torch.float64, device=self.mask.device)
        return float(1.0 / self.A(ones * self.mask.double()).max())

    def extra_repr(self) -> str:
        return f"mask={tuple(self.mask.shape)}, num_bands={self.num_bands}, step={self.step}"


def gaussian_kernel(size: int = 7, sigma: float = 1.6) -> torch.Tensor:
    """An isotropic Gaussian blur kernel (size × size, odd size), normalised to sum 1, float64."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size: expected an odd kernel size, got {size}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a finite number > 0, got {sigma}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


class SuperResolution(Operator):
    """``y = (k ∗ x)↓s``: correlation with an odd blur kernel under circular boundaries, then keeping every
    s-th pixel. Circular boundaries make A_adjoint (zero-fill upsampling, then correlation with the flipped
    kernel) exact, as USRNet's closed-form data step assumes. Images must be whole multiples of the scale.
    """

    def __init__(self, kernel: torch.Tensor, scale: int):
        super().__init__()
        check_real_tensor(kernel, "kernel", dims=2)
        if not bool((kernel != 0).any()):
            raise ValueError(f"kernel: is zero everywhere ({tuple(kernel.shape)}); nothing would be measured")
        if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel: expected odd sizes, got {tuple(kernel.shape)}")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale: expected a positive int, got {scale!r}")
        self.scale = scale
        self.register_buffer("kernel", kernel.detach().clone())

    def _pad(self) -> tuple[int, int, int, int]:
        ph, pw = (self.kernel.shape[0] - 1) // 2, (self.kernel.shape[1] - 1) // 2
        return (pw, pw, ph, ph)

    def _correlate(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight = kernel.to(x.dtype).expand(c, 1, *kernel.shape)
        return F.conv2d(F.pad(x, self._pad(), mode="circular"), weight, groups=c)

    def _check_hr(self, x: torch.Tensor, name: str = "x") -> None:
        _check_image(x, None, name)
        h, w = x.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"{name}: image {h}×{w} is not a multiple of the scale {self.scale}; crop it first")
        kh, kw = self.kernel.shape
        if h <= kh // 2 or w <= kw // 2:
            raise ValueError(f"{name}: image {h}×{w} is too small for a {kh}×{kw} kernel")

    def image_size(self, y: torch.Tensor) -> tuple[int, int]:
        return (y.shape[-2] * self.scale, y.shape[-1] * self.scale)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self._check_hr(x)
        return self._correlate(x, self.kernel)[..., :: self.scale, :: self.scale]

    def A_adjoint(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        _check_image(y, None, "y")
        size = self.image_size(y) if size is None else tuple(size)
        if (math.ceil(size[0] / self.scale), math.ceil(size[1] / self.scale)) != tuple(y.shape[-2:]):
            raise ValueError(f"y: {tuple(y.shape[-2:])} is not the measurement of a {size} image at scale "
                             f"{self.scale}")
        up = y.new_zeros(*y.shape[:2], *size)
        up[..., :: self.scale, :: self.scale] = y
        self._check_hr(up, "y upsampled")
        return self._correlate(up, self.kernel.flip(0, 1))

    def init(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Bicubic upsampling of y, the usual starting point of SR unfolding networks."""
        _check_image(y, None, "y")
        size = self.image_size(y) if size is None else tuple(size)
        return F.interpolate(y, size=size, mode="bicubic", align_corners=False)

    def default_step(self) -> float:
        return float(1.0 / self.kernel.abs().sum() ** 2)

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.kernel.shape)}, scale={self.scale}"

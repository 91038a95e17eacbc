"""Fast degradation operators: the reference operators with ``gd_step`` computed by the fused Triton kernels.

``FastBlockCS``, ``FastCASSI``, ``FastSuperResolution`` and ``FastBicubicSR`` subclass ``BlockCS``, ``CASSI``,
``SuperResolution`` (``lorun_fast.reference.operators``) and ``BicubicSR`` (``lorun_fast.reference.bicubic``): A,
A_adjoint, init, default_step and every check are the reference's; only ``gd_step`` changes, and only when the
kernels apply. ``backend`` chooses:

- ``"reference"``: always the reference ``gd_step`` (plain PyTorch).
- ``"triton"``: always the fused kernels (``lorun_fast.kernels.gd_step_cs``, ``_cassi``, ``_sr``, ``_bicubic``);
  errors if they cannot run the inputs (e.g. float64, or CPU tensors without ``TRITON_INTERPRET=1``). The CPU
  interpreter tests use this.
- ``"auto"`` (default): the module-level ``BACKEND`` decides; when that is ``"auto"`` too, the kernels run for CUDA
  tensors of a supported dtype (float32, bfloat16, float16) with y of x's dtype and device, a step that is a number
  or a one-element tensor on x's device, and an operator buffer (Φ, mask, blur kernel; the bicubic operator has
  none) on that device that does not need a gradient; the reference runs everything else (CPU tensors, float64, mixed dtypes, ...).

``fast_operator(op)`` turns a reference operator into its fast sibling sharing the same buffers (no copies);
``reference_operator(op)`` goes back. The kernel modules are imported on first use, so importing this module neither
imports triton nor fixes the interpreter choice.
"""
from __future__ import annotations

import copy
import importlib

import torch

from lorun_fast.reference.bicubic import BicubicSR
from lorun_fast.reference.operators import CASSI, BlockCS, Operator, SuperResolution

__all__ = ["FastBlockCS", "FastCASSI", "FastSuperResolution", "FastBicubicSR", "fast_operator", "reference_operator",
           "has_fast_sibling", "BACKEND", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")

# Module-level switch consulted by operators whose own backend is "auto".
BACKEND = "auto"

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels(module: str):
    """``lorun_fast.kernels.<module>``, imported on first use (importing decorates the Triton kernels)."""
    return importlib.import_module(f"lorun_fast.kernels.{module}")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


class _FastMixin:
    """The backend choice shared by the three fast operators."""

    backend: str

    def _use_kernels(self, x, y, rho, buffer: torch.Tensor | None) -> bool:
        backend = _check_backend(self.backend)
        if backend == "auto":
            backend = _check_backend(BACKEND)
        if backend != "auto":
            return backend == "triton"
        # Anything the kernels would refuse but the reference handles (type promotion between x and y, a CPU step
        # tensor with CUDA images, a trainable Φ / mask / kernel) goes to the reference.
        return (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in _KERNEL_DTYPES
                and isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.device == x.device
                and (not isinstance(rho, torch.Tensor) or (rho.device == x.device and rho.numel() == 1))
                and (buffer is None
                     or (buffer.device == x.device and not (buffer.requires_grad and torch.is_grad_enabled()))))

    def _fast_repr(self) -> str:
        return f", backend={self.backend!r}"


class FastBlockCS(_FastMixin, BlockCS):
    """``BlockCS`` whose ``gd_step`` runs ``gd_step_cs`` (see ``lorun_fast.kernels.gd_step_cs``).

    Extra arguments: ``backend`` ("auto" | "triton" | "reference"), ``algorithm`` ("auto" | "one_gemm" |
    "two_gemm") and ``input_precision`` ("ieee" | "tf32" | "tf32x3", float32 only).
    """

    def __init__(self, phi: torch.Tensor, qinit: torch.Tensor | None = None, block_size: int = 33, *,
                 backend: str = "auto", algorithm: str = "auto", input_precision: str = "tf32"):
        super().__init__(phi, qinit, block_size)
        self.backend = _check_backend(backend)
        self.algorithm = algorithm
        self.input_precision = input_precision

    def gd_step(self, x: torch.Tensor, y: torch.Tensor, rho) -> torch.Tensor:
        if not self._use_kernels(x, y, rho, self.phi):
            return super().gd_step(x, y, rho)
        return _kernels("gd_step_cs").gd_step_cs(x, y, self.phi, rho, algorithm=self.algorithm,
                                     input_precision=self.input_precision, block_size=self.block_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._fast_repr() + f", algorithm={self.algorithm!r}"


class FastCASSI(_FastMixin, CASSI):
    """``CASSI`` whose ``gd_step`` runs ``gd_step_cassi`` (one fused launch). Extra argument: ``backend``."""

    def __init__(self, mask: torch.Tensor, num_bands: int = 28, step: int = 2, *, backend: str = "auto"):
        super().__init__(mask, num_bands, step)
        self.backend = _check_backend(backend)

    def gd_step(self, x: torch.Tensor, y: torch.Tensor, rho) -> torch.Tensor:
        if not self._use_kernels(x, y, rho, self.mask):
            return super().gd_step(x, y, rho)
        return _kernels("gd_step_cassi").gd_step_cassi(x, y, self.mask, rho, step=self.step, num_bands=self.num_bands)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._fast_repr()


class FastSuperResolution(_FastMixin, SuperResolution):
    """``SuperResolution`` whose ``gd_step`` runs ``gd_step_sr`` (two launches). Extra argument: ``backend``."""

    def __init__(self, kernel: torch.Tensor, scale: int, *, backend: str = "auto"):
        super().__init__(kernel, scale)
        self.backend = _check_backend(backend)

    def gd_step(self, x: torch.Tensor, y: torch.Tensor, rho) -> torch.Tensor:
        if not self._use_kernels(x, y, rho, self.kernel):
            return super().gd_step(x, y, rho)
        return _kernels("gd_step_sr").gd_step_sr(x, y, self.kernel, rho, scale=self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._fast_repr()


class FastBicubicSR(_FastMixin, BicubicSR):
    """``BicubicSR`` whose ``gd_step`` runs ``gd_step_bicubic`` (two launches through gather tables; see
    ``lorun_fast.kernels.gd_step_bicubic``). Extra argument: ``backend``."""

    def __init__(self, scale: int, *, backend: str = "auto"):
        super().__init__(scale)
        self.backend = _check_backend(backend)

    def gd_step(self, x: torch.Tensor, y: torch.Tensor, rho) -> torch.Tensor:
        if not self._use_kernels(x, y, rho, None):
            return super().gd_step(x, y, rho)
        return _kernels("gd_step_bicubic").gd_step_bicubic(x, y, rho, scale=self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._fast_repr()


_FAST = {BlockCS: FastBlockCS, CASSI: FastCASSI, SuperResolution: FastSuperResolution, BicubicSR: FastBicubicSR}
_REFERENCE = {fast: ref for ref, fast in _FAST.items()}
_FAST_ATTRS = ("backend", "algorithm", "input_precision")


def _retyped(op: Operator, cls: type) -> Operator:
    """A new module of class ``cls`` with ``op``'s state: the same buffer tensors (shared, not copied), but its own
    buffer / parameter / submodule dicts, so moving one module later (``.to()``) does not rebind the other's."""
    new = copy.copy(op)
    new.__class__ = cls
    for name in ("_buffers", "_parameters", "_modules"):
        setattr(new, name, copy.copy(getattr(op, name)))
    return new


def has_fast_sibling(op: Operator) -> bool:
    """Whether ``op`` has a fused gradient step (block CS, CASSI, Gaussian-blur SR, bicubic SR)."""
    return type(op) in _FAST or type(op) in _REFERENCE


def fast_operator(op: Operator, *, backend: str = "auto", algorithm: str = "auto",
                  input_precision: str = "tf32") -> Operator:
    """The fast sibling of a reference operator (``BlockCS`` → ``FastBlockCS``, ...), sharing its buffers.

    A fast operator is returned as is when the arguments match, else re-configured in a new module. ``algorithm``
    and ``input_precision`` apply to block CS only.
    """
    _check_backend(backend)
    if type(op) in _REFERENCE:
        ref_cls = _REFERENCE[type(op)]
        if (op.backend == backend and (ref_cls is not BlockCS
                                       or (op.algorithm, op.input_precision) == (algorithm, input_precision))):
            return op
        new = _retyped(op, type(op))
    elif type(op) in _FAST:
        new = _retyped(op, _FAST[type(op)])
    else:
        raise TypeError(f"op: expected a BlockCS, CASSI, SuperResolution or BicubicSR operator (or a fast one), got "
                        f"{type(op).__name__}")
    new.backend = backend
    if isinstance(new, FastBlockCS):
        new.algorithm = algorithm
        new.input_precision = input_precision
    return new


def reference_operator(op: Operator) -> Operator:
    """The plain reference operator (``FastBlockCS`` → ``BlockCS``, ...) sharing the fast one's buffers; a
    reference operator is returned as is."""
    if type(op) in _FAST:
        return op
    if type(op) not in _REFERENCE:
        raise TypeError(f"op: expected a BlockCS, CASSI, SuperResolution or BicubicSR operator (or a fast one), got "
                        f"{type(op).__name__}")
    new = _retyped(op, _REFERENCE[type(op)])
    for name in _FAST_ATTRS:
        new.__dict__.pop(name, None)
    return new

"""The tolerance rule every fast path is judged by (docs/design.md, §7.2 and §7.3), in one place.

Kernel tests compare a fast result with the float64 reference on the same (already rounded) inputs:

* float32 by dot mode, and float64 — ``max|got − ref| ≤ rtol·scale + atol``, with ``scale`` the largest reference magnitude (for
  a reduction such as dρ the caller passes the sum of the magnitudes of its terms: its rounding error grows with
  them, not with a possibly cancelled total). "tf32" is loose because a GPU multiplies 10-bit mantissas; in the
  interpreter it is exact fp32.
* 16-bit dtypes, relative to PyTorch's own error at the same precision (flash-attention's rule) —
  ``max|got − ref| ≤ factor·max|torch − ref| + atol·scale``, where "torch" is the reference computed by PyTorch in
  that dtype: a kernel may be up to twice as inexact as PyTorch, never more.

Benchmarks gate each provider before timing it by ``‖out − ref‖ / ‖ref‖`` against :data:`BENCH_TOLERANCE` of the
row's precision, or :data:`BASELINE_FACTOR` times the error of the row's baseline provider when that is larger.
"""
from __future__ import annotations

import torch

__all__ = ["KERNEL_TOLERANCE", "BENCH_TOLERANCE", "BASELINE_FACTOR", "max_abs_error", "assert_close_to_reference",
           "bench_tolerance"]

#: Per float32 dot mode ("ieee", "tf32", "tf32x3") and per 16-bit dtype.
KERNEL_TOLERANCE = {
    "ieee": {"rtol": 1e-5, "atol": 1e-6},
    "tf32x3": {"rtol": 1e-5, "atol": 1e-6},
    "tf32": {"rtol": 5e-3, "atol": 1e-4},
    torch.float16: {"factor": 2.0, "atol": 2e-3},
    torch.bfloat16: {"factor": 2.0, "atol": 1.6e-2},
    # A float64 fast path (the merged layer, a converted model) against the float64 reference: the same math,
    # reassociated.
    torch.float64: {"rtol": 1e-12, "atol": 0.0},
}

#: Relative error (‖out − ref‖ / ‖ref‖) a benchmark row may show before it is reported as failing, per precision.
BENCH_TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2, "fp16": 1e-2}

#: A fast provider may also be this many times as inexact as its baseline provider at the same precision.
BASELINE_FACTOR = 2.0


def max_abs_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got − ref|`` in float64 (0 for empty tensors)."""
    if got.numel() == 0:
        return 0.0
    return (got.double().cpu() - ref.double().cpu()).abs().max().item()


def assert_close_to_reference(name: str, got: torch.Tensor, ref: torch.Tensor, mode, *, scale: float | None = None,
                              torch_same: torch.Tensor | None = None) -> None:
    """Assert the kernel-test rule for ``got`` against the float64 ``ref``.

    ``mode``: a float32 dot mode ("ieee", "tf32", "tf32x3") or a 16-bit dtype; for a 16-bit dtype ``torch_same`` (the
    reference evaluated by PyTorch in that dtype) is required. ``scale`` defaults to ``max|ref|``. Non-finite values in
    ``got`` fail (the kernel tests poison outputs with NaN, so an unwritten element shows up here).
    """
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{name}: non-finite values (unwritten / poisoned elements?)")
    if mode not in KERNEL_TOLERANCE:
        raise ValueError(f"mode: expected one of {tuple(KERNEL_TOLERANCE)}, got {mode!r}")
    tol = KERNEL_TOLERANCE[mode]
    scale = (ref.abs().max().item() if ref.numel() else 0.0) if scale is None else scale
    err = max_abs_error(got, ref)
    if "factor" in tol:
        if torch_same is None:
            raise ValueError(f"torch_same: a {mode} comparison needs PyTorch's own result in that dtype")
        torch_err = max_abs_error(torch_same, ref)
        bound = tol["factor"] * torch_err + tol["atol"] * scale
        if not err <= bound:
            raise AssertionError(f"{name}: error {err:.3g} vs torch {mode} error {torch_err:.3g} "
                                 f"(bound {bound:.3g}, scale {scale:.3g})")
        return
    bound = tol["rtol"] * scale + tol["atol"]
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} (bound {bound:.3g}, scale {scale:.3g}, {mode})")


def bench_tolerance(precision_tolerance: float, baseline_error: float | None = None) -> float:
    """The relative error a benchmark row may show: its precision's ``BENCH_TOLERANCE`` entry, or
    ``BASELINE_FACTOR`` times its baseline provider's error when that is larger (see the module docstring)."""
    if baseline_error is None:
        return precision_tolerance
    # + 1e-6: a baseline that happens to be exact must not make the bound zero.
    return max(precision_tolerance, BASELINE_FACTOR * baseline_error + 1e-6)

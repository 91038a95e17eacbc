"""Fused gradient-descent step ``z = x − ρ·Aᵀ(A x − y)`` for bicubic super-resolution, in Triton.

The operator is ``BicubicSR`` (``lorun_fast.reference.bicubic``): ``A x = M_H · x · M_Wᵀ``, MATLAB's antialiased
bicubic ``imresize(x, 1/s)`` as two banded matrices with half-sample symmetric boundaries, and
``Aᵀ r = M_Hᵀ · r · M_W``. A row of ``M`` touches ``4s + 2`` HR pixels (fewer distinct ones at the borders, where
mirrored taps land on the same pixel); a column of ``M`` is touched by ⌈(4s + 2)/s⌉ LR rows or a few more at the
borders. Dense matrix products would spend ``2·H`` FLOPs per output instead of ``2·(4s + 2)``, so the kernels gather
through two small tables per axis instead (built once per image size, scale, dtype and device, from the same float64
matrices the reference uses, rounded to x's dtype as the reference rounds them):

* ``fwd_index`` / ``fwd_weight`` (L, T): for LR index i, the T distinct HR indices with ``M[i, ·] ≠ 0`` and their
  weights (zero-padded: index 0, weight 0, so no lane needs a mask).
* ``adj_index`` / ``adj_weight`` (n, TA): for HR index p, the LR indices with ``M[·, p] ≠ 0`` and their weights.

Two launches, for the reason the Gaussian SR step has two (``gd_step_sr``'s module docstring): every HR output of
``Aᵀ r`` needs r on an LR neighbourhood owned by other programs, and every r value needs a 4s-wide HR neighbourhood.

1. ``_bicubic_residual_kernel`` (LR grid): ``r[i, j] = Σ_t Σ_u wh[i, t]·ww[j, u]·x[ih[i, t], iw[j, u]] − y[i, j]``
   in fp32; with ``PARTIAL`` it also forms per-LR-row ``Σ_j r·r_saved`` (the dρ partial sums of the backward).
2. ``_bicubic_update_kernel`` (HR grid): ``z[p, q] = x[p, q] − ρ·Σ_a Σ_b vh[p, a]·vw[q, b]·r[jh[p, a], jw[q, b]]``.

Per HR pixel and step: forward ``(4s + 2)²/s²`` x gathers (mostly L1 hits: neighbouring LR outputs share all but s
of their HR rows) = 36 at ×2 and 20 at ×4, and ``TA²`` ≈ 9–25 gathers of the fp32 residual (1/s² of the image, L2
resident). HBM traffic is one read of x and y and one write of z plus the residual's write and read: ``(2 + 8/s²)``
bytes-per-element words per pixel, the same as the Gaussian step.

Backward (see ``GDStepBicubicFunction``): ``dx = G − ρ·AᵀA G``, ``dy = ρ·A G``, ``dρ = −⟨A G, A x − y⟩``, by the
same two kernels on G.

Precision: float32, bfloat16 and float16 inputs; weights in x's dtype, everything accumulated in fp32, z rounded once.
The row configs, launch functions, checks and the NaN-poisoning test switch (``gd_step_common.POISON_OUTPUTS``) are
``gd_step_common``'s.
"""
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from lorun_fast.kernels.gd_step_common import (_SR_CONFIGS, _as_rho, _backward_fakes, _check_device,
                                               _check_runnable, _check_x, _check_y, _empty, _finish_backward,
                                               _forward_fakes, _mark_residual, _nothing, _plane_rows, _prune_rows,
                                               _store_residual, _store_update)
from lorun_fast.reference.bicubic import SUPPORTED_SCALES, _matrix_numpy

__all__ = ["gd_step_bicubic", "GDStepBicubicFunction", "bicubic_forward", "bicubic_backward", "bicubic_tables",
           "clear_tables"]


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------

@triton.autotune(configs=_SR_CONFIGS, key=["HL", "WL", "TR", "TC", "HAS_Y", "PARTIAL"],
                 prune_configs_by={"early_config_prune": _prune_rows("WL")})
@triton.jit
def _bicubic_residual_kernel(
    x_ptr, y_ptr, rh_idx_ptr, rh_w_ptr, rw_idx_ptr, rw_w_ptr, r_ptr, rs_ptr, part_ptr,
    C, HL, WL,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    TR: tl.constexpr, TC: tl.constexpr,
    HAS_Y: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Bicubic pass 1: ``r = M_H x M_Wᵀ − y`` on a tile of LR rows, gathered through the forward tables.

    Grid: (N·C·⌈HL / BLOCK_H⌉,); a program owns BLOCK_H whole LR rows of one (n, c) plane, in BLOCK_W chunks. For
    each of the TR row taps it gathers one HR row per LR row and reduces it over the TC column taps (unrolled).

    Args:
        x_ptr: HR image (N, C, H, W), strides ``sx_*``.
        y_ptr: LR measurement (N, C, HL, WL), strides ``sy_*``. Ignored unless ``HAS_Y``.
        rh_idx_ptr, rh_w_ptr: int32 / x-dtype (HL, TR) contiguous: HR row indices and weights of each LR row.
        rw_idx_ptr, rw_w_ptr: int32 / x-dtype (WL, TC) contiguous: the same for the columns.
        r_ptr: fp32 (N, C, HL, WL) contiguous: the residual ``A x − y`` (always written).
        rs_ptr: fp32 (N, C, HL, WL) contiguous saved residual. Read only if ``PARTIAL``.
        part_ptr: fp32 (N·C·HL,): per LR row ``Σ_j r[i, j]·rs[i, j]``. Written only if ``PARTIAL``.
        C, HL, WL: channels and LR size.
        sx_*, sy_*: element strides.
        TR, TC: taps per LR row / column (the tables' widths).
        HAS_Y, PARTIAL: switches.
        BLOCK_H: LR rows per program; BLOCK_W: LR pixels per chunk.
    """
    nc, i, i_ok, x_img, y_img, r_rows = _plane_rows(C, HL, WL, sx_n, sx_c, sy_n, sy_c, BLOCK_H)
    offs = tl.arange(0, BLOCK_W)
    part = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
    for j0 in range(0, WL, BLOCK_W):
        j = j0 + offs
        j_ok = j < WL
        ok = i_ok[:, None] & j_ok[None, :]
        acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
        for t in range(TR):
            src_h = tl.load(rh_idx_ptr + i * TR + t, mask=i_ok, other=0).to(tl.int64) * sx_h
            wh = tl.load(rh_w_ptr + i * TR + t, mask=i_ok, other=0.0).to(tl.float32)
            row = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
            for u in tl.static_range(TC):
                src_w = tl.load(rw_idx_ptr + j * TC + u, mask=j_ok, other=0).to(tl.int64) * sx_w
                ww = tl.load(rw_w_ptr + j * TC + u, mask=j_ok, other=0.0).to(tl.float32)
                xv = tl.load(x_ptr + x_img + src_h[:, None] + src_w[None, :], mask=ok, other=0.0)
                row += ww[None, :] * xv.to(tl.float32)
            acc += wh[:, None] * row
        part = _store_residual(acc, part, i, j, ok, y_ptr, y_img, sy_h, sy_w, r_ptr, rs_ptr, r_rows, HAS_Y, PARTIAL)
    if PARTIAL:
        tl.store(part_ptr + nc.to(tl.int64) * HL + i, tl.sum(part, axis=1), mask=i_ok)


@triton.autotune(configs=_SR_CONFIGS, key=["H", "W", "TAH", "TAW"],
                 prune_configs_by={"early_config_prune": _prune_rows("W")})
@triton.jit
def _bicubic_update_kernel(
    x_ptr, r_ptr, ah_idx_ptr, ah_w_ptr, aw_idx_ptr, aw_w_ptr, rho_ptr, z_ptr,
    C, H, W, HL, WL,
    sx_n, sx_c, sx_h, sx_w,
    sz_n, sz_c, sz_h, sz_w,
    TAH: tl.constexpr, TAW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Bicubic pass 2: ``z = x − ρ·M_Hᵀ r M_W`` on a tile of HR rows, gathered through the adjoint tables.

    Grid: (N·C·⌈H / BLOCK_H⌉,); a program owns BLOCK_H whole HR rows of one (n, c) plane, in BLOCK_W chunks.

    Args:
        x_ptr: HR image (N, C, H, W), strides ``sx_*``.
        r_ptr: fp32 residual (N, C, HL, WL), contiguous (from pass 1).
        ah_idx_ptr, ah_w_ptr: int32 / x-dtype (H, TAH) contiguous: the LR rows whose taps include HR row p, and
            the weights ``M_H[i, p]``.
        aw_idx_ptr, aw_w_ptr: int32 / x-dtype (W, TAW) contiguous: the same for the columns.
        rho_ptr: ρ, one element (read as fp32).
        z_ptr: output (N, C, H, W), strides ``sz_*``.
        C, H, W, HL, WL: channels, HR and LR sizes.
        sx_*, sz_*: element strides.
        TAH, TAW: the adjoint tables' widths.
        BLOCK_H: HR rows per program; BLOCK_W: HR pixels per chunk.
    """
    nc, p, p_ok, x_img, z_img, _ = _plane_rows(C, H, W, sx_n, sx_c, sz_n, sz_c, BLOCK_H)
    r_img = nc.to(tl.int64) * HL * WL
    rho = tl.load(rho_ptr).to(tl.float32)
    offs = tl.arange(0, BLOCK_W)
    for q0 in range(0, W, BLOCK_W):
        q = q0 + offs
        q_ok = q < W
        ok = p_ok[:, None] & q_ok[None, :]
        acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
        for a in range(TAH):
            src_h = tl.load(ah_idx_ptr + p * TAH + a, mask=p_ok, other=0).to(tl.int64) * WL
            vh = tl.load(ah_w_ptr + p * TAH + a, mask=p_ok, other=0.0).to(tl.float32)
            row = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
            for b in tl.static_range(TAW):
                src_w = tl.load(aw_idx_ptr + q * TAW + b, mask=q_ok, other=0)
                vw = tl.load(aw_w_ptr + q * TAW + b, mask=q_ok, other=0.0).to(tl.float32)
                rv = tl.load(r_ptr + r_img + src_h[:, None] + src_w[None, :], mask=ok, other=0.0)
                row += vw[None, :] * rv
            acc += vh[:, None] * row
        _store_update(acc, rho, p, q, ok, x_ptr, x_img, sx_h, sx_w, z_ptr, z_img, sz_h, sz_w)


# --------------------------------------------------------------------------------------------------------------------
# Gather tables
# --------------------------------------------------------------------------------------------------------------------

def _sparse_rows(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, weights) of the non-zeros of each row of ``matrix``, zero-padded to the longest row."""
    support = matrix != 0.0
    width = int(support.sum(axis=1).max())
    index = np.zeros((matrix.shape[0], width), dtype=np.int32)
    weight = np.zeros((matrix.shape[0], width), dtype=np.float64)
    for row in range(matrix.shape[0]):
        cols = np.flatnonzero(support[row])
        index[row, :cols.size] = cols
        weight[row, :cols.size] = matrix[row, cols]
    return index, weight


class BicubicTables:
    """One axis of the bicubic operator (HR length n, LR length n/s) as gather tables in a compute dtype."""

    def __init__(self, length: int, scale: int, dtype: torch.dtype, device: torch.device):
        matrix = _matrix_numpy(length, length // scale, 1.0 / scale, True)
        # Rounded to the compute dtype before the sparsity is read, as the reference's matrix is.
        rounded = torch.from_numpy(matrix.copy()).to(dtype).double().numpy()
        fwd_index, fwd_weight = _sparse_rows(rounded)
        adj_index, adj_weight = _sparse_rows(np.ascontiguousarray(rounded.T))

        def put(array, kind):
            return torch.from_numpy(array).to(device=device, dtype=kind)

        self.fwd_index, self.fwd_weight = put(fwd_index, torch.int32), put(fwd_weight, dtype)
        self.adj_index, self.adj_weight = put(adj_index, torch.int32), put(adj_weight, dtype)
        self.taps, self.adjoint_taps = fwd_index.shape[1], adj_index.shape[1]


_TABLES: "OrderedDict[tuple, BicubicTables]" = OrderedDict()
_TABLES_SIZE = 32


def clear_tables() -> None:
    """Forget every cached gather table."""
    _TABLES.clear()


def bicubic_tables(length: int, scale: int, dtype: torch.dtype, device) -> BicubicTables:
    """The gather tables of one axis (cached per length, scale, dtype and device; a few KB each)."""
    key = (int(length), int(scale), dtype, str(torch.device(device)))
    tables = _TABLES.get(key)
    if tables is None:
        tables = BicubicTables(int(length), int(scale), dtype, torch.device(device))
        _TABLES[key] = tables
        if len(_TABLES) > _TABLES_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


# --------------------------------------------------------------------------------------------------------------------
# Launchers (no autograd, no validation)
# --------------------------------------------------------------------------------------------------------------------

def _bicubic_launch(x, y, rho, scale, write_z, r_saved):
    """Returns ``(z, r, part)``: z if ``write_z``, fp32 residual (N, C, H/s, W/s) always, per-LR-row
    ``Σ r·r_saved`` if ``r_saved`` is given."""
    nb, c, h, w = x.shape
    hl, wl = h // scale, w // scale
    partial = r_saved is not None
    z = _empty(x.shape, x) if write_z else _nothing(x)
    r = _empty((nb, c, hl, wl), x, torch.float32)
    part = _empty((nb * c * hl,), x, torch.float32) if partial else _nothing(x, torch.float32)
    if r.numel() == 0:
        return z, r, part
    _check_runnable(x)
    rows = bicubic_tables(h, scale, x.dtype, x.device)
    cols = bicubic_tables(w, scale, x.dtype, x.device)
    has_y = y is not None
    ysrc = y if has_y else x
    ystr = y.stride() if has_y else (0, 0, 0, 0)
    grid = lambda meta: (nb * c * triton.cdiv(hl, meta["BLOCK_H"]),)  # noqa: E731
    _bicubic_residual_kernel[grid](
        x, ysrc, rows.fwd_index, rows.fwd_weight, cols.fwd_index, cols.fwd_weight,
        r, r_saved if partial else r, part if partial else r,
        c, hl, wl,
        *x.stride(), *ystr,
        TR=rows.taps, TC=cols.taps, HAS_Y=has_y, PARTIAL=partial,
    )
    if write_z:
        grid = lambda meta: (nb * c * triton.cdiv(h, meta["BLOCK_H"]),)  # noqa: E731
        _bicubic_update_kernel[grid](
            x, r, rows.adj_index, rows.adj_weight, cols.adj_index, cols.adj_weight, rho, z,
            c, h, w, hl, wl,
            *x.stride(), *z.stride(),
            TAH=rows.adjoint_taps, TAW=cols.adjoint_taps,
        )
    return z, r, part


def bicubic_forward(x, y, rho, scale):
    """Launch the bicubic SR step (two kernels). Returns ``(z, r)``, r the fp32 residual ``A x − y``."""
    z, r, _ = _bicubic_launch(x, y, rho, scale, True, None)
    return z, r


def bicubic_backward(grad, rho, residual, scale, need_x, need_y, need_rho):
    """``(dx, dy, dρ)`` of the bicubic SR step; see ``GDStepBicubicFunction``."""
    dx, ag, part = _bicubic_launch(grad, None, rho, scale, need_x, residual if need_rho else None)
    dy, drho = _finish_backward(ag, part, rho, grad.dtype, need_y, need_rho)
    return dx, dy, drho


# --------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lorun_fast::gd_step_bicubic", mutates_args=())
def _gd_step_bicubic_op(x: torch.Tensor, y: torch.Tensor, rho: torch.Tensor,
                        scale: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bicubic SR step: ``(z, r)``, r = fp32 ``A x − y`` (N, C, H/s, W/s)."""
    return bicubic_forward(x, y, rho, scale)


@_gd_step_bicubic_op.register_fake
def _(x, y, rho, scale):
    return _forward_fakes(x, y)


@torch.library.custom_op("lorun_fast::gd_step_bicubic_backward", mutates_args=())
def _gd_step_bicubic_backward_op(grad: torch.Tensor, rho: torch.Tensor, residual: Optional[torch.Tensor],
                                 scale: int, need_x: bool, need_y: bool,
                                 need_rho: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``lorun_fast::gd_step_bicubic``: ``(dx, dy, dρ)``, empty where not needed."""
    return bicubic_backward(grad, rho, residual, scale, need_x, need_y, need_rho)


@_gd_step_bicubic_backward_op.register_fake
def _(grad, rho, residual, scale, need_x, need_y, need_rho):
    nb, c, h, w = grad.shape
    return _backward_fakes(grad, (nb, c, h // scale, w // scale), rho, need_x, need_y, need_rho)


class GDStepBicubicFunction(torch.autograd.Function):
    """Autograd of the bicubic SR step (also registered as ``lorun_fast::gd_step_bicubic``'s autograd).

    Inputs ``(x, y, ρ, s)``, outputs ``(z, r)``, with ``A x = M_H x M_Wᵀ`` (MATLAB's ``imresize(x, 1/s)``):

        r = A x − y                 (fp32, pass 1; pass 2 reads it)
        z = x − ρ·M_Hᵀ r M_W

    Backward, with ``G = ∂L/∂z``:

        dx = G − ρ·AᵀA G            (the two forward kernels on G with y = 0)
        dy = ρ·A G                  (pass 1's output)
        dρ = −⟨A G, r⟩              (per-LR-row partial sums in pass 1, then a fixed-order torch sum)
    """

    @staticmethod
    def forward(x, y, rho, scale):
        return bicubic_forward(x, y, rho, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, rho, scale = inputs
        _, r = output
        ctx.save_for_backward(rho, r)
        ctx.scale = scale
        _mark_residual(ctx, r)

    @staticmethod
    def backward(ctx, grad_z, grad_r=None):
        rho, r = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dy, drho = torch.ops.lorun_fast.gd_step_bicubic_backward(
            grad_z, rho, r if need[2] else None, ctx.scale, need[0], need[1], need[2])
        return dx if need[0] else None, dy if need[1] else None, drho if need[2] else None, None


torch.library.register_autograd("lorun_fast::gd_step_bicubic", GDStepBicubicFunction.backward,
                                setup_context=GDStepBicubicFunction.setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------

def gd_step_bicubic(x: torch.Tensor, y: torch.Tensor, rho, *, scale: int) -> torch.Tensor:
    """Bicubic super-resolution gradient step ``z = x − ρ·Aᵀ(A x − y)``, ``A x = imresize(x, 1/s)`` (MATLAB).

    Two launches (residual at LR resolution through gather tables, then the update; see the module docstring).

    Args:
        x: HR image (N, C, H, W), float32 / bfloat16 / float16, H and W multiples of ``scale`` and at least
            ``4·scale`` (the antialiased kernel's support).
        y: LR measurement (N, C, H/s, W/s), x's dtype.
        rho: step size: a Python number or a scalar tensor on x's device (gets a gradient).
        scale: 2, 3 or 4.

    Registered as ``torch.ops.lorun_fast.gd_step_bicubic``; autograd for x, y and ρ.
    """
    _check_x(x, "(N, C, H, W) image")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in SUPPORTED_SCALES:
        raise ValueError(f"scale: bicubic SR supports the integer scales {SUPPORTED_SCALES}, got {scale!r}")
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"x: image {h}×{w} is not a multiple of the scale {scale}; crop it first")
    if h < 4 * scale or w < 4 * scale:
        raise ValueError(f"x: image {h}×{w} is smaller than the ×1/{scale} bicubic kernel's support "
                         f"({4 * scale}×{4 * scale})")
    _check_y(y, x, (x.shape[0], x.shape[1], h // scale, w // scale), "(N, C, H/s, W/s)")
    _check_device(x, y=y)
    rho_t = _as_rho(rho, x)
    z, _ = torch.ops.lorun_fast.gd_step_bicubic(x, y, rho_t, scale)
    return z

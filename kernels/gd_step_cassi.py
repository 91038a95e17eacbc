"""Fused CASSI gradient step ``z_λ = x_λ − ρ·M ⊙ shift_{−dλ}(Σ_μ shift_{dμ}(M ⊙ x_μ) − y)``, in Triton
(docs/design.md, §3.2).

The operator is ``CASSI`` (``lorun_fast.reference.operators``): x (N, Λ, H, W), mask (H, W), y (N, H, W + d(Λ−1)).
One launch; each program owns BLOCK_H whole image rows: phase 1 forms the rows' residual
``r[w'] = Σ_λ mask[w'−dλ]·x_λ[w'−dλ] − y[w']`` and stores it (it is also the residual the backward needs); a CTA
barrier; phase 2 updates all Λ bands, ``z_λ[w] = x_λ[w] − ρ·mask[w]·r[w + dλ]``, reading r back shifted (the shift is
a different lane for every band, so it goes through memory — the rows the same program just wrote, from L1/L2).

Backward (``GDStepCASSIFunction``): ``dx = G − ρ·AᵀA G``, ``dy = ρ·A G``, ``dρ = −⟨A G, A x − y⟩``, by the same kernel
on G (``gd_step_common``). Precision: float32, bfloat16 and float16 inputs, fp32 accumulation; the launch functions,
checks and the NaN-poisoning test switch are ``gd_step_common``'s.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorun_fast.kernels.gd_step_common import (_as_rho, _backward_fakes, _check_device, _check_fixed, _check_int,
                                               _check_runnable, _check_x, _check_y, _empty, _finish_backward,
                                               _forward_fakes, _nothing, _prune_rows, _row_cfg, _save_step,
                                               _step_backward, _tuning)

__all__ = ["gd_step_cassi", "GDStepCASSIFunction", "cassi_forward", "cassi_backward"]


# --------------------------------------------------------------------------------------------------------------------
# Tuning configurations
# --------------------------------------------------------------------------------------------------------------------

# The quick list's 8-warp entry has BLOCK_W = 64, which the width pruner always keeps.
_CASSI_CONFIGS = _tuning(
    interpret=[_row_cfg(4, 64, 4)],
    quick=[_row_cfg(1, 256, 4), _row_cfg(4, 64, 8)],
    full=[_row_cfg(bh, bw, w) for bh, bw, w in
          ((1, 256, 4), (2, 256, 4), (4, 128, 4), (1, 512, 8), (2, 512, 8), (8, 64, 4))],
)


# --------------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------------

@triton.autotune(configs=_CASSI_CONFIGS, key=["H", "W", "L", "STEP", "HAS_Y", "WRITE_Z", "PARTIAL"],
                 prune_configs_by={"early_config_prune": _prune_rows("WY")})
@triton.jit
def _cassi_kernel(
    x_ptr, y_ptr, mask_ptr, rho_ptr, z_ptr, r_ptr, rs_ptr, part_ptr,
    H, W, WY, L, STEP,
    sx_n, sx_l, sx_h, sx_w,
    sy_n, sy_h, sy_w,
    sz_n, sz_l, sz_h, sz_w,
    HAS_Y: tl.constexpr, WRITE_Z: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """CASSI GD step for BLOCK_H whole image rows per program: residual over the rows, barrier, update of all bands.

    Grid: (N·⌈H / BLOCK_H⌉,); program ``n·⌈H / BLOCK_H⌉ + t`` owns rows h ∈ [t·BLOCK_H, (t+1)·BLOCK_H) of image n.
    Phase 1, for w' ∈ [0, WY) in BLOCK_W chunks: ``r[h, w'] = Σ_λ mask[h, w'−STEP·λ]·x_λ[h, w'−STEP·λ] − y[h, w']``
    (terms with w'−STEP·λ outside [0, W) are absent), stored to ``r``. Phase 2 (if WRITE_Z), for w ∈ [0, W):
    ``z_λ[h, w] = x_λ[h, w] − ρ·mask[h, w]·r[h, w + STEP·λ]`` for every λ, r read back from memory.

    Args:
        x_ptr: cube (N, L, H, W), strides ``sx_*``.
        y_ptr: measurement (N, H, WY), strides ``sy_*``. Ignored unless ``HAS_Y``.
        mask_ptr: mask (H, W), contiguous, in x's dtype.
        rho_ptr: ρ, one element of any float dtype (read as fp32; a pointer, so no host sync).
        z_ptr: output cube (N, L, H, W), strides ``sz_*``. Ignored unless ``WRITE_Z``.
        r_ptr: fp32 (N, H, WY) contiguous: the residual ``A x − y`` (always written: phase 2 reads it back).
        rs_ptr: fp32 (N, H, WY) contiguous saved residual. Read only if ``PARTIAL``.
        part_ptr: fp32 (N·H,): ``part[n·H + h] = Σ_w' r[h, w']·rs[h, w']`` (per row, so independent of the tile
            config). Written only if ``PARTIAL``.
        H, W: image size; WY = W + STEP·(L − 1): measurement width; L: bands; STEP: dispersion per band (pixels).
        sx_*, sy_*, sz_*: element strides.
        HAS_Y, WRITE_Z, PARTIAL: switches (y = 0 and no z in parts of the backward).
        BLOCK_H: rows per program; BLOCK_W: pixels per chunk along the rows.
    """
    pid = tl.program_id(0)
    tiles_h = (H + BLOCK_H - 1) // BLOCK_H
    img = pid // tiles_h
    h = (pid % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    x_rows = img.to(tl.int64) * sx_n + h.to(tl.int64) * sx_h                  # (BLOCK_H,)
    m_rows = h * W
    r_rows = (img.to(tl.int64) * H + h) * WY
    offs = tl.arange(0, BLOCK_W)

    part = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
    for w0 in range(0, WY, BLOCK_W):
        wy = w0 + offs
        wy_ok = h_ok[:, None] & (wy < WY)[None, :]
        acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
        for lam in range(0, L):
            w = wy - lam * STEP
            ok = h_ok[:, None] & ((w >= 0) & (w < W))[None, :]
            xv = tl.load(x_ptr + x_rows[:, None] + lam * sx_l + w.to(tl.int64)[None, :] * sx_w, mask=ok, other=0.0)
            mv = tl.load(mask_ptr + m_rows[:, None] + w[None, :], mask=ok, other=0.0)
            acc += mv.to(tl.float32) * xv.to(tl.float32)
        if HAS_Y:
            acc -= tl.load(y_ptr + (img.to(tl.int64) * sy_n + h.to(tl.int64) * sy_h)[:, None]
                           + wy.to(tl.int64)[None, :] * sy_w, mask=wy_ok, other=0.0).to(tl.float32)
        tl.store(r_ptr + r_rows[:, None] + wy[None, :], acc, mask=wy_ok)
        if PARTIAL:
            part += acc * tl.load(rs_ptr + r_rows[:, None] + wy[None, :], mask=wy_ok, other=0.0)
    if PARTIAL:
        tl.store(part_ptr + img.to(tl.int64) * H + h, tl.sum(part, axis=1), mask=h_ok)

    if WRITE_Z:
        # The rows' residual was written by other threads of this CTA: a CTA barrier orders those global stores
        # before the shifted loads below (bar.sync has CTA-scope memory ordering; the lines were never read before,
        # so L1 holds nothing stale). The interpreter runs a program sequentially and ignores the barrier.
        tl.debug_barrier()
        rho = tl.load(rho_ptr).to(tl.float32)
        z_rows = img.to(tl.int64) * sz_n + h.to(tl.int64) * sz_h
        for w0 in range(0, W, BLOCK_W):
            w = w0 + offs
            ok = h_ok[:, None] & (w < W)[None, :]
            mv = tl.load(mask_ptr + m_rows[:, None] + w[None, :], mask=ok, other=0.0).to(tl.float32)
            for lam in range(0, L):
                xv = tl.load(x_ptr + x_rows[:, None] + lam * sx_l + w.to(tl.int64)[None, :] * sx_w, mask=ok,
                             other=0.0)
                rv = tl.load(r_ptr + r_rows[:, None] + (w + lam * STEP)[None, :], mask=ok, other=0.0)
                z = xv.to(tl.float32) - rho * (mv * rv)
                tl.store(z_ptr + z_rows[:, None] + lam * sz_l + w.to(tl.int64)[None, :] * sz_w,
                         z.to(z_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------------------
# Launcher (no autograd, no validation)
# --------------------------------------------------------------------------------------------------------------------

def _cassi_launch(x, y, mask_c, rho, step, write_z, r_saved):
    """Returns ``(z, r, part)``: z if ``write_z``, fp32 residual (N, H, WY) always, per-row ``Σ r·r_saved`` if
    ``r_saved`` is given."""
    nb, bands, h, w = x.shape
    wy = w + step * (bands - 1)
    partial = r_saved is not None
    z = _empty(x.shape, x) if write_z else _nothing(x)
    r = _empty((nb, h, wy), x, torch.float32)
    part = _empty((nb * h,), x, torch.float32) if partial else _nothing(x, torch.float32)
    if nb * h * w == 0:
        # No pixels: A x = 0 (bands == 0 cannot happen, validated), so r = −y.
        if y is not None:
            r.copy_(-y.float())
        else:
            r.zero_()
        if partial:
            part.zero_()
        return z, r, part
    _check_runnable(x)
    has_y = y is not None
    ysrc = y if has_y else x
    ystr = y.stride() if has_y else (0, 0, 0)
    zdst = z if write_z else x
    grid = lambda meta: (nb * triton.cdiv(h, meta["BLOCK_H"]),)  # noqa: E731
    _cassi_kernel[grid](
        x, ysrc, mask_c, rho, zdst, r, r_saved if partial else r, part if partial else r,
        h, w, wy, bands, step,
        *x.stride(), *ystr, *zdst.stride(),
        HAS_Y=has_y, WRITE_Z=write_z, PARTIAL=partial,
    )
    return z, r, part


def _mask_for(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Rounded to x's dtype, as the reference's mask.to(x.dtype); contiguous for the kernel's row addressing.
    return mask.detach().to(dtype).contiguous()


def cassi_forward(x, y, mask, rho, step=2):
    """Launch the CASSI step. Returns ``(z, r)`` with r the fp32 residual ``A x − y`` (N, H, W + step·(Λ−1))."""
    z, r, _ = _cassi_launch(x, y, _mask_for(mask, x.dtype), rho, step, True, None)
    return z, r


def cassi_backward(grad, mask, rho, residual, step, need_x, need_y, need_rho):
    """``(dx, dy, dρ)`` of the CASSI step; see ``GDStepCASSIFunction``."""
    dx, ag, part = _cassi_launch(grad, None, _mask_for(mask, grad.dtype), rho, step, need_x,
                                 residual if need_rho else None)
    dy, drho = _finish_backward(ag, part, rho, grad.dtype, need_y, need_rho)
    return dx, dy, drho


# --------------------------------------------------------------------------------------------------------------------
# Custom op and autograd
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lorun_fast::gd_step_cassi", mutates_args=())
def _gd_step_cassi_op(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, rho: torch.Tensor,
                      step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CASSI step: ``(z, r)``, r = fp32 ``A x − y`` (N, H, W + step·(Λ−1))."""
    return cassi_forward(x, y, mask, rho, step)


@_gd_step_cassi_op.register_fake
def _(x, y, mask, rho, step):
    return _forward_fakes(x, y)


@torch.library.custom_op("lorun_fast::gd_step_cassi_backward", mutates_args=())
def _gd_step_cassi_backward_op(grad: torch.Tensor, mask: torch.Tensor, rho: torch.Tensor,
                               residual: Optional[torch.Tensor], step: int, need_x: bool, need_y: bool,
                               need_rho: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``lorun_fast::gd_step_cassi``: ``(dx, dy, dρ)``, empty where not needed."""
    return cassi_backward(grad, mask, rho, residual, step, need_x, need_y, need_rho)


@_gd_step_cassi_backward_op.register_fake
def _(grad, mask, rho, residual, step, need_x, need_y, need_rho):
    nb, bands, h, w = grad.shape
    return _backward_fakes(grad, (nb, h, w + step * (bands - 1)), rho, need_x, need_y, need_rho)


class GDStepCASSIFunction(torch.autograd.Function):
    """Autograd of the CASSI step (also registered as ``lorun_fast::gd_step_cassi``'s autograd).

    Inputs ``(x, y, mask, ρ, step)``, outputs ``(z, r)``, with ``(A x)[h, w'] = Σ_λ M[h, w'−dλ]·x_λ[h, w'−dλ]``
    and ``(Aᵀ r)_λ[h, w] = M[h, w]·r[h, w + dλ]``:

        r = A x − y                 (fp32, always produced: the kernel reads it back for the update)
        z = x − ρ·Aᵀ r

    Backward, with ``G = ∂L/∂z``:

        dx = G − ρ·AᵀA G            (the forward kernel on G with y = 0)
        dy = ρ·A G                  (the residual that launch writes)
        dρ = −⟨A G, r⟩              (per-row partial sums in the kernel, then a fixed-order torch sum)

    The mask gets no gradient.
    """

    @staticmethod
    def forward(x, y, mask, rho, step):
        return cassi_forward(x, y, mask, rho, step)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_step(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_z, grad_r=None):
        return _step_backward(ctx, grad_z, torch.ops.lorun_fast.gd_step_cassi_backward)


torch.library.register_autograd("lorun_fast::gd_step_cassi", GDStepCASSIFunction.backward,
                                setup_context=GDStepCASSIFunction.setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------

def gd_step_cassi(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, rho, *, step: int = 2,
                  num_bands: Optional[int] = None) -> torch.Tensor:
    """CASSI gradient step ``z_λ = x_λ − ρ·M ⊙ shift_{−dλ}(Σ_μ shift_{dμ}(M ⊙ x_μ) − y)``, one fused launch.

    Args:
        x: cube (N, Λ, H, W), float32 / bfloat16 / float16.
        y: measurement (N, H, W + step·(Λ − 1)), x's dtype.
        mask: coded aperture (H, W), float or bool (rounded to x's dtype, like the reference); no gradient.
        rho: step size: a Python number or a scalar tensor on x's device (gets a gradient).
        step: dispersion d in pixels per band (2 for the standard simulation).
        num_bands: when given, the band count x must have (the operator's Λ); else Λ = x.shape[1].

    Registered as ``torch.ops.lorun_fast.gd_step_cassi``; autograd for x, y and ρ.
    """
    _check_x(x, "(N, Λ, H, W) cube")
    _check_int("step", step, 0)
    bands, h, w = x.shape[1:]
    if num_bands is not None:
        _check_int("num_bands", num_bands, 1)
        if bands != num_bands:
            raise ValueError(f"x: expected {num_bands} bands, got {bands} (shape {tuple(x.shape)})")
    if bands < 1:
        raise ValueError(f"x: expected at least one band, got shape {tuple(x.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask: expected a floating-point or bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (h, w):
        raise ValueError(f"mask: expected shape {(h, w)} (x's spatial size), got {tuple(mask.shape)}")
    _check_y(y, x, (x.shape[0], h, w + step * (bands - 1)), f"(N, H, W + {step}·(Λ−1)) with Λ = {bands}")
    _check_device(x, y=y, mask=mask)
    _check_fixed("mask", mask)
    rho_t = _as_rho(rho, x)
    z, _ = torch.ops.lorun_fast.gd_step_cassi(x, y, mask, rho_t, step)
    return z

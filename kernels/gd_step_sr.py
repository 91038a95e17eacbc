"""Fused gradient step for super-resolution with a Gaussian blur, ``z = x − ρ·Aᵀ(A x − y)``, in Triton
(docs/design.md, §3.3).

The operator is ``SuperResolution`` (``lorun_fast.reference.operators``): ``A x = correlate(circpad(x), k)[::s, ::s]``,
``Aᵀ`` = zero-fill upsampling, then correlation with the flipped k under circular padding. Two launches, because that
is what the data dependency allows: every HR output of ``Aᵀ r`` needs r on a ⌈kh/s⌉×⌈kw/s⌉ LR neighbourhood, and every
r value needs x on a kh×kw HR neighbourhood of *other* programs' pixels; one pass would need a grid-wide barrier or
recomputing a halo of r per tile. Kernel 1 writes ``r = A x − y`` (1/s² of x, fp32), kernel 2 forms
``z = x − ρ·Aᵀ r`` polyphase: an HR pixel (p, q) only meets the taps a ≡ p + kh//2 (mod s), b ≡ q + kw//2 (mod s),
i.e. ⌈kh/s⌉·⌈kw/s⌉ taps instead of kh·kw.

Backward (``GDStepSRFunction``): ``dx = G − ρ·AᵀA G``, ``dy = ρ·A G``, ``dρ = −⟨A G, A x − y⟩``, by the same two
kernels on G (``gd_step_common``). Precision: float32, bfloat16 and float16 inputs, fp32 accumulation; the row
configs, launch functions, checks and the NaN-poisoning test switch are ``gd_step_common``'s (shared with the bicubic
step, ``gd_step_bicubic``).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorun_fast.kernels.gd_step_common import (_SR_CONFIGS, _as_rho, _backward_fakes, _check_device, _check_fixed,
                                               _check_int, _check_runnable, _check_tensor, _check_x, _check_y, _empty,
                                               _finish_backward, _forward_fakes, _nothing, _plane_rows, _prune_rows,
                                               _save_step, _step_backward, _store_residual, _store_update)

__all__ = ["gd_step_sr", "GDStepSRFunction", "sr_forward", "sr_backward"]


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------

@triton.autotune(configs=_SR_CONFIGS, key=["H", "W", "S", "KH", "KW", "HAS_Y", "PARTIAL"],
                 prune_configs_by={"early_config_prune": _prune_rows("WL")})
@triton.jit
def _sr_residual_kernel(
    x_ptr, y_ptr, k_ptr, r_ptr, rs_ptr, part_ptr,
    C, H, W, HL, WL,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    S: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_Y: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """SR pass 1: ``r[i, j] = Σ_{a,b} k[a, b]·x[(S·i + a − KH//2) mod H, (S·j + b − KW//2) mod W] − y[i, j]``.

    Grid: (N·C·⌈HL / BLOCK_H⌉,); a program owns BLOCK_H whole low-resolution rows of one (n, c) plane and walks
    them in BLOCK_W chunks; the KH×KW taps are unrolled. x is read with stride S; the taps of neighbouring outputs
    overlap, so each x line comes from HBM about once and from L1/L2 for the other taps.

    Args:
        x_ptr: HR image (N, C, H, W), strides ``sx_*``.
        y_ptr: LR measurement (N, C, HL, WL), strides ``sy_*``. Ignored unless ``HAS_Y``.
        k_ptr: blur kernel (KH, KW), contiguous, in x's dtype.
        r_ptr: fp32 (N, C, HL, WL) contiguous: the residual ``A x − y`` (always written).
        rs_ptr: fp32 (N, C, HL, WL) contiguous saved residual. Read only if ``PARTIAL``.
        part_ptr: fp32 (N·C·HL,): per LR row ``Σ_j r[i, j]·rs[i, j]``. Written only if ``PARTIAL``.
        C, H, W: channels and HR size (multiples of S); HL = H/S, WL = W/S.
        sx_*, sy_*: element strides.
        S: scale; KH, KW: odd kernel size (KH//2 < H and KW//2 < W, so one wrap suffices).
        HAS_Y, PARTIAL: switches.
        BLOCK_H: LR rows per program; BLOCK_W: LR pixels per chunk.
    """
    nc, i, i_ok, x_img, y_img, r_rows = _plane_rows(C, HL, WL, sx_n, sx_c, sy_n, sy_c, BLOCK_H)
    offs = tl.arange(0, BLOCK_W)
    part = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
    for j0 in range(0, WL, BLOCK_W):
        j = j0 + offs
        ok = i_ok[:, None] & (j < WL)[None, :]
        acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
        for a in tl.static_range(KH):
            # + H keeps the operand of % non-negative (a row index ≥ −KH//2 > −H): no signed-modulo subtleties.
            xr = ((i * S + a - KH // 2 + H) % H).to(tl.int64) * sx_h
            for b in tl.static_range(KW):
                xc = ((j * S + b - KW // 2 + W) % W).to(tl.int64) * sx_w
                kv = tl.load(k_ptr + a * KW + b).to(tl.float32)
                xv = tl.load(x_ptr + x_img + xr[:, None] + xc[None, :], mask=ok, other=0.0)
                acc += kv * xv.to(tl.float32)
        part = _store_residual(acc, part, i, j, ok, y_ptr, y_img, sy_h, sy_w, r_ptr, rs_ptr, r_rows, HAS_Y, PARTIAL)
    if PARTIAL:
        tl.store(part_ptr + nc.to(tl.int64) * HL + i, tl.sum(part, axis=1), mask=i_ok)


@triton.autotune(configs=_SR_CONFIGS, key=["H", "W", "S", "KH", "KW"],
                 prune_configs_by={"early_config_prune": _prune_rows("W")})
@triton.jit
def _sr_update_kernel(
    x_ptr, r_ptr, k_ptr, rho_ptr, z_ptr,
    C, H, W, HL, WL,
    sx_n, sx_c, sx_h, sx_w,
    sz_n, sz_c, sz_h, sz_w,
    S: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """SR pass 2: ``z = x − ρ·Aᵀ r`` with ``Aᵀ r`` = correlation of the zero-filled upsampled r with flip(k).

    ``(Aᵀ r)[p, q] = Σ_{a,b} k[a, b]·up[(p + KH//2 − a) mod H, (q + KW//2 − b) mod W]``; up is non-zero only on
    multiples of S, so only the taps a ≡ p + KH//2, b ≡ q + KW//2 (mod S) contribute (polyphase): a = a0 + S·t
    (t < TH), b = b0 + S·u (u < TW), masked where a ≥ KH or b ≥ KW.

    Grid: (N·C·⌈H / BLOCK_H⌉,); a program owns BLOCK_H whole HR rows of one (n, c) plane, in BLOCK_W chunks.

    Args:
        x_ptr: HR image (N, C, H, W), strides ``sx_*``.
        r_ptr: fp32 residual (N, C, HL, WL), contiguous (from pass 1).
        k_ptr: blur kernel (KH, KW), contiguous, in x's dtype.
        rho_ptr: ρ, one element (read as fp32).
        z_ptr: output (N, C, H, W), strides ``sz_*``.
        C, H, W, HL, WL: channels, HR and LR sizes.
        sx_*, sz_*: element strides.
        S: scale; KH, KW: kernel size; TH = ⌈KH/S⌉, TW = ⌈KW/S⌉: taps per output pixel and axis.
        BLOCK_H: HR rows per program; BLOCK_W: HR pixels per chunk.
    """
    nc, p, p_ok, x_img, z_img, _ = _plane_rows(C, H, W, sx_n, sx_c, sz_n, sz_c, BLOCK_H)
    r_img = nc.to(tl.int64) * HL * WL
    rho = tl.load(rho_ptr).to(tl.float32)
    a0 = (p + KH // 2) % S
    offs = tl.arange(0, BLOCK_W)
    for q0 in range(0, W, BLOCK_W):
        q = q0 + offs
        ok = p_ok[:, None] & (q < W)[None, :]
        b0 = (q + KW // 2) % S
        acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
        for t in tl.static_range(TH):
            a = a0 + S * t                                          # (BLOCK_H,)
            # a < KH ⇒ p + KH//2 − a ≥ −KH//2 > −H: the operand of % stays non-negative where it matters.
            i = ((p + KH // 2 - a + H) % H) // S
            for u in tl.static_range(TW):
                b = b0 + S * u                                      # (BLOCK_W,)
                tap_ok = ok & (a < KH)[:, None] & (b < KW)[None, :]
                jj = ((q + KW // 2 - b + W) % W) // S
                kv = tl.load(k_ptr + a[:, None] * KW + b[None, :], mask=tap_ok, other=0.0).to(tl.float32)
                rv = tl.load(r_ptr + r_img + i.to(tl.int64)[:, None] * WL + jj[None, :], mask=tap_ok, other=0.0)
                acc += kv * rv
        _store_update(acc, rho, p, q, ok, x_ptr, x_img, sx_h, sx_w, z_ptr, z_img, sz_h, sz_w)


# --------------------------------------------------------------------------------------------------------------------
# Launcher (no autograd, no validation)
# --------------------------------------------------------------------------------------------------------------------

def _sr_launch(x, y, kernel_c, rho, scale, write_z, r_saved):
    """Returns ``(z, r, part)``: z if ``write_z``, fp32 residual (N, C, H/s, W/s) always, per-LR-row
    ``Σ r·r_saved`` if ``r_saved`` is given."""
    nb, c, h, w = x.shape
    hl, wl = h // scale, w // scale
    kh, kw = kernel_c.shape
    partial = r_saved is not None
    z = _empty(x.shape, x) if write_z else _nothing(x)
    r = _empty((nb, c, hl, wl), x, torch.float32)
    part = _empty((nb * c * hl,), x, torch.float32) if partial else _nothing(x, torch.float32)
    if r.numel() == 0:
        return z, r, part
    _check_runnable(x)
    has_y = y is not None
    ysrc = y if has_y else x
    ystr = y.stride() if has_y else (0, 0, 0, 0)
    grid = lambda meta: (nb * c * triton.cdiv(hl, meta["BLOCK_H"]),)  # noqa: E731
    _sr_residual_kernel[grid](
        x, ysrc, kernel_c, r, r_saved if partial else r, part if partial else r,
        c, h, w, hl, wl,
        *x.stride(), *ystr,
        S=scale, KH=kh, KW=kw, HAS_Y=has_y, PARTIAL=partial,
    )
    if write_z:
        grid = lambda meta: (nb * c * triton.cdiv(h, meta["BLOCK_H"]),)  # noqa: E731
        _sr_update_kernel[grid](
            x, r, kernel_c, rho, z,
            c, h, w, hl, wl,
            *x.stride(), *z.stride(),
            S=scale, KH=kh, KW=kw, TH=triton.cdiv(kh, scale), TW=triton.cdiv(kw, scale),
        )
    return z, r, part


def _kernel_for(kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return kernel.detach().to(dtype).contiguous()


def sr_forward(x, y, kernel, rho, scale):
    """Launch the SR step (two kernels). Returns ``(z, r)`` with r the fp32 residual ``A x − y`` (N, C, H/s, W/s)."""
    z, r, _ = _sr_launch(x, y, _kernel_for(kernel, x.dtype), rho, scale, True, None)
    return z, r


def sr_backward(grad, kernel, rho, residual, scale, need_x, need_y, need_rho):
    """``(dx, dy, dρ)`` of the SR step; see ``GDStepSRFunction``."""
    dx, ag, part = _sr_launch(grad, None, _kernel_for(kernel, grad.dtype), rho, scale, need_x,
                              residual if need_rho else None)
    dy, drho = _finish_backward(ag, part, rho, grad.dtype, need_y, need_rho)
    return dx, dy, drho


# --------------------------------------------------------------------------------------------------------------------
# Custom op and autograd
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lorun_fast::gd_step_sr", mutates_args=())
def _gd_step_sr_op(x: torch.Tensor, y: torch.Tensor, kernel: torch.Tensor, rho: torch.Tensor,
                   scale: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """SR step: ``(z, r)``, r = fp32 ``A x − y`` (N, C, H/s, W/s)."""
    return sr_forward(x, y, kernel, rho, scale)


@_gd_step_sr_op.register_fake
def _(x, y, kernel, rho, scale):
    return _forward_fakes(x, y)


@torch.library.custom_op("lorun_fast::gd_step_sr_backward", mutates_args=())
def _gd_step_sr_backward_op(grad: torch.Tensor, kernel: torch.Tensor, rho: torch.Tensor,
                            residual: Optional[torch.Tensor], scale: int, need_x: bool, need_y: bool,
                            need_rho: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``lorun_fast::gd_step_sr``: ``(dx, dy, dρ)``, empty where not needed."""
    return sr_backward(grad, kernel, rho, residual, scale, need_x, need_y, need_rho)


@_gd_step_sr_backward_op.register_fake
def _(grad, kernel, rho, residual, scale, need_x, need_y, need_rho):
    nb, c, h, w = grad.shape
    return _backward_fakes(grad, (nb, c, h // scale, w // scale), rho, need_x, need_y, need_rho)


class GDStepSRFunction(torch.autograd.Function):
    """Autograd of the SR step (also registered as ``lorun_fast::gd_step_sr``'s autograd).

    Inputs ``(x, y, k, ρ, s)``, outputs ``(z, r)``, with ``A x = correlate(circpad(x), k)[::s, ::s]`` and
    ``Aᵀ r = correlate(circpad(upsample₀(r)), flip(k))``:

        r = A x − y                 (fp32, pass 1; pass 2 reads it)
        z = x − ρ·Aᵀ r

    Backward, with ``G = ∂L/∂z``:

        dx = G − ρ·AᵀA G            (the two forward kernels on G with y = 0)
        dy = ρ·A G                  (pass 1's output)
        dρ = −⟨A G, r⟩              (per-LR-row partial sums in pass 1, then a fixed-order torch sum)

    The blur kernel gets no gradient.
    """

    @staticmethod
    def forward(x, y, kernel, rho, scale):
        return sr_forward(x, y, kernel, rho, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_step(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_z, grad_r=None):
        return _step_backward(ctx, grad_z, torch.ops.lorun_fast.gd_step_sr_backward)


torch.library.register_autograd("lorun_fast::gd_step_sr", GDStepSRFunction.backward,
                                setup_context=GDStepSRFunction.setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------

def gd_step_sr(x: torch.Tensor, y: torch.Tensor, kernel: torch.Tensor, rho, *, scale: int) -> torch.Tensor:
    """Super-resolution gradient step ``z = x − ρ·Aᵀ(A x − y)``, ``A x = (k ⋆ x)↓s`` with circular boundaries.

    Two launches (residual at LR resolution, then the polyphase update; see the module docstring for why two).

    Args:
        x: HR image (N, C, H, W), float32 / bfloat16 / float16, H and W multiples of ``scale`` and larger than
            half the kernel.
        y: LR measurement (N, C, H/s, W/s), x's dtype.
        kernel: blur kernel (kh, kw), odd sizes, any float dtype (rounded to x's dtype); no gradient.
        rho: step size: a Python number or a scalar tensor on x's device (gets a gradient).
        scale: the integer decimation factor s ≥ 1.

    Registered as ``torch.ops.lorun_fast.gd_step_sr``; autograd for x, y and ρ.
    """
    _check_x(x, "(N, C, H, W) image")
    _check_int("scale", scale, 1)
    _check_tensor("kernel", kernel)
    if kernel.dim() != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel: expected a 2-D blur kernel with odd sizes, got shape {tuple(kernel.shape)}")
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"x: image {h}×{w} is not a multiple of the scale {scale}; crop it first")
    kh, kw = kernel.shape
    if h <= kh // 2 or w <= kw // 2:
        raise ValueError(f"x: image {h}×{w} is too small for a {kh}×{kw} kernel")
    _check_y(y, x, (x.shape[0], x.shape[1], h // scale, w // scale), "(N, C, H/s, W/s)")
    _check_device(x, y=y, kernel=kernel)
    _check_fixed("kernel", kernel)
    rho_t = _as_rho(rho, x)
    z, _ = torch.ops.lorun_fast.gd_step_sr(x, y, kernel, rho_t, scale)
    return z

"""What the fused gradient-step modules (``gd_step_cs``, ``gd_step_cassi``, ``gd_step_sr``, ``gd_step_bicubic``)
share: the choice of tuning configs, the row-kernel configs and width pruner, output allocation (with the NaN-poisoning
test switch), the backward's last step, the fake tensors and autograd pieces of the custom ops, and argument checks.

Every step is ``z = x − ρ·Aᵀ(A x − y)`` (docs/design.md, §3). Its backward, with ``G = ∂L/∂z``, is the same for all
operators: ``dx = G − ρ·AᵀA G`` (the forward kernels applied to G with y = 0), ``dy = ρ·A G`` (the residual the same
launch writes), ``dρ = −⟨G, Aᵀ(A x − y)⟩ = −⟨A G, A x − y⟩``: the forward saves its fp32 residual r, and the backward
launch forms per-block / per-row partial sums of ``(A G)·r`` into a buffer that a torch sum reduces (fixed order:
deterministic, no atomics; ``_finish_backward``).

Precision: float32, bfloat16 and float16 inputs; all accumulation, the residual and the update in float32, z rounded
once to the input dtype. Φ, the mask and the blur kernel are first rounded to the input dtype, as the reference does
(``phi.to(x.dtype)``).

Running without a GPU: set ``TRITON_INTERPRET=1`` before importing the kernel modules (see ``lora_conv``); kernels
call only Triton builtins (``tl.full``, not ``tl.zeros``/``tl.cdiv``), and bfloat16 dots are upcast in the
interpreter.
"""
import math

import torch
import triton
import triton.language as tl

from lorun_fast.kernels.settings import check_runnable, full_tuning, interpreting

# Read once, like triton itself does when it decorates the kernels.
_INTERPRET = interpreting()
# LORUN_FAST_TUNE=0 (the GPU test run) keeps two configs per kernel, one of them at 8 warps, so tests compile in
# seconds (as in lora_conv); the interpreter ignores it.
_TUNE = full_tuning()

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Test switch, the only one: when true, every buffer the launchers of all four steps allocate starts as NaN, so a test
# can prove that the kernels write every element of what they return. Read at every allocation (``_poison``).
POISON_OUTPUTS = False


def _poison(t: torch.Tensor) -> torch.Tensor:
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


# --------------------------------------------------------------------------------------------------------------------
# Tuning configurations
# --------------------------------------------------------------------------------------------------------------------

def _tuning(*, interpret, quick, full):
    """The config list a kernel is autotuned over in this process.

    ``interpret``: one config (autotuning in the interpreter would run every config), with large tiles: the
    interpreter's cost is per operation, not per element. ``quick`` (``LORUN_FAST_TUNE=0``): two configs, one at 8
    warps. ``full``: short lists, since autotuning compiles and times every entry once per key; for the pruned
    kernels the last entry is the smallest footprint, the pruners' fallback."""
    if _INTERPRET:
        return interpret
    return full if _TUNE else quick


def _row_cfg(bh, bw, warps):
    return triton.Config({"BLOCK_H": bh, "BLOCK_W": bw}, num_warps=warps, num_stages=1)


# The row kernels of both SR steps (Gaussian blur and bicubic). Small BLOCK_H / BLOCK_W in the interpreter make the
# test images span several row tiles and chunks; the 8-warp quick entry has BLOCK_W = 64, which the width pruner always
# keeps.
_SR_CONFIGS = _tuning(
    interpret=[_row_cfg(4, 32, 4)],
    quick=[_row_cfg(1, 128, 4), _row_cfg(4, 64, 8)],
    full=[_row_cfg(bh, bw, w) for bh, bw, w in
          ((1, 128, 4), (2, 128, 4), (4, 64, 4), (1, 256, 4), (4, 128, 8), (8, 32, 4))],
)


def _args(named_args, kwargs):
    # Autotuner pruners get the positional launch arguments as named_args and the keyword ones (our constexprs)
    # as kwargs.
    return {**named_args, **kwargs}


def _prune_rows(width_arg):
    def prune(configs, named_args, **kwargs):
        a = _args(named_args, kwargs)
        wmax = max(64, triton.next_power_of_2(int(a[width_arg])))
        kept = [c for c in configs if c.kwargs["BLOCK_W"] <= wmax]
        return kept or configs[:1]
    return prune


# --------------------------------------------------------------------------------------------------------------------
# Kernel code shared by the SR steps (Gaussian and bicubic): the row prologue, the residual and update stores
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _plane_rows(C, ROWS, ROW_LEN, sa_n, sa_c, sb_n, sb_c, BLOCK_H: tl.constexpr):
    """The plane and rows a row program owns (grid: N·C·⌈ROWS / BLOCK_H⌉): ``(nc, rows, rows_ok, a_img, b_img,
    row_offsets)`` — plane index, row indices and mask, the plane offsets of two (N, C, ·, ·) tensors with strides
    ``sa_*`` and ``sb_*``, and the rows' offsets in a contiguous (N, C, ROWS, ROW_LEN) one (the residual)."""
    pid = tl.program_id(0)
    tiles_h = (ROWS + BLOCK_H - 1) // BLOCK_H
    nc = pid // tiles_h
    rows = (pid % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    a_img = (nc // C).to(tl.int64) * sa_n + (nc % C).to(tl.int64) * sa_c
    b_img = (nc // C).to(tl.int64) * sb_n + (nc % C).to(tl.int64) * sb_c
    return nc, rows, rows < ROWS, a_img, b_img, (nc.to(tl.int64) * ROWS + rows) * ROW_LEN


@triton.jit
def _store_residual(acc, part, i, j, ok, y_ptr, y_img, sy_h, sy_w, r_ptr, rs_ptr, r_rows,
                    HAS_Y: tl.constexpr, PARTIAL: tl.constexpr):
    """``r = acc − y`` stored for the chunk (rows ``i`` × columns ``j``); with ``PARTIAL`` returns ``part`` plus
    ``r·r_saved`` (the dρ partial sums), else ``part`` unchanged."""
    if HAS_Y:
        acc -= tl.load(y_ptr + y_img + i.to(tl.int64)[:, None] * sy_h + j.to(tl.int64)[None, :] * sy_w,
                       mask=ok, other=0.0).to(tl.float32)
    tl.store(r_ptr + r_rows[:, None] + j[None, :], acc, mask=ok)
    if PARTIAL:
        part += acc * tl.load(rs_ptr + r_rows[:, None] + j[None, :], mask=ok, other=0.0)
    return part


@triton.jit
def _store_update(acc, rho, p, q, ok, x_ptr, x_img, sx_h, sx_w, z_ptr, z_img, sz_h, sz_w):
    """``z = x − ρ·acc`` (``acc`` = Aᵀr on the chunk of rows ``p`` × columns ``q``) in fp32, stored in z's dtype."""
    xv = tl.load(x_ptr + x_img + p.to(tl.int64)[:, None] * sx_h + q.to(tl.int64)[None, :] * sx_w,
                 mask=ok, other=0.0)
    z = xv.to(tl.float32) - rho * acc
    tl.store(z_ptr + z_img + p.to(tl.int64)[:, None] * sz_h + q.to(tl.int64)[None, :] * sz_w,
             z.to(z_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------------------
# Launching (no autograd, no validation)
# --------------------------------------------------------------------------------------------------------------------

def _check_runnable(t: torch.Tensor) -> None:
    check_runnable(t, "lorun_fast.kernels.gd_step_*")


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return _poison(torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device))


def _nothing(like: torch.Tensor, dtype=None) -> torch.Tensor:
    # Distinct empties: outputs of a custom op must not alias one another.
    return torch.empty(0, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _finish_backward(ag, part, rho, y_dtype, need_y, need_rho):
    """``dy = ρ·A G`` (in y's dtype) and ``dρ = −Σ part`` (fixed-order torch sum, in ρ's dtype and shape)."""
    dy = (rho.reshape(()).float() * ag).to(y_dtype) if need_y else _nothing(ag, y_dtype)
    drho = (-part.sum()).to(rho.dtype).reshape(rho.shape) if need_rho else _nothing(ag, rho.dtype)
    return dy, drho


# --------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------------------------

def _backward_fakes(grad, y_shape, rho, need_x, need_y, need_rho):
    dx = torch.empty_like(grad, memory_format=torch.contiguous_format) if need_x else grad.new_empty(0)
    dy = grad.new_empty(y_shape) if need_y else grad.new_empty(0)
    drho = rho.new_empty(rho.shape) if need_rho else rho.new_empty(0)
    return dx, dy, drho


def _mark_residual(ctx, residual):
    # The residual output is a by-product saved for the backward, not something to differentiate.
    if hasattr(ctx, "mark_non_differentiable"):
        ctx.mark_non_differentiable(residual)


def _forward_fakes(x, y):
    """Fake ``(z, r)`` of a step whose residual r always has y's shape (CASSI, SR, bicubic SR)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(y.shape, dtype=torch.float32)


def _save_step(ctx, inputs, output):
    """``setup_context`` of a step with inputs ``(x, y, operand, ρ, param)`` and outputs ``(z, r)`` (CASSI: the mask
    and the dispersion step; SR: the blur kernel and the scale): saves the operand, ρ and r, and the int parameter."""
    _, _, operand, rho, param = inputs
    _, r = output
    ctx.save_for_backward(operand, rho, r)
    ctx.param = param
    _mark_residual(ctx, r)


def _step_backward(ctx, grad_z, backward_op):
    """``backward`` of such a step: ``backward_op(G, operand, ρ, r or None, param, need_x, need_y, need_ρ)`` gives
    ``(dx, dy, dρ)``; the operand and the parameter get no gradient."""
    operand, rho, r = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dy, drho = backward_op(grad_z, operand, rho, r if need[3] else None, ctx.param, need[0], need[1], need[3])
    return dx if need[0] else None, dy if need[1] else None, None, drho if need[3] else None, None


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------

def _check_tensor(name, t, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")


def _check_x(x, layout):
    _check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D {layout} tensor, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported; use float32, bfloat16 or float16")


def _check_y(y, x, expected, layout):
    _check_tensor("y", y)
    if tuple(y.shape) != tuple(expected):
        raise ValueError(f"y: expected the measurement shape {tuple(expected)} {layout} of x {tuple(x.shape)}, got "
                         f"{tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y: dtype {y.dtype} does not match x's dtype {x.dtype}")


def _check_device(x, **tensors):
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, but x is on {x.device}; all tensors must share a device")


def _check_fixed(name, t):
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: gradients with respect to {name} are not supported by the fused step; detach it "
                         "(or use the reference operator)")


def _as_rho(rho, x) -> torch.Tensor:
    """ρ as a one-element tensor on x's device: a Python number becomes a 0-dim fp32 tensor (torch.full launches a
    fill, no host-to-device copy); a tensor must be 0-dim or (1,), floating point, on x's device."""
    if isinstance(rho, torch.Tensor):
        if not rho.is_floating_point():
            raise TypeError(f"rho: expected a floating-point tensor, got dtype {rho.dtype}")
        if rho.dim() > 1 or rho.numel() != 1:
            raise ValueError(f"rho: expected a scalar (0-dim or shape (1,)) tensor, got shape {tuple(rho.shape)}")
        if rho.device != x.device:
            raise ValueError(f"rho: on device {rho.device}, but x is on {x.device}; all tensors must share a device")
        return rho
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho: expected a Python float or a scalar tensor, got {type(rho).__name__}")
    if not math.isfinite(rho):
        raise ValueError(f"rho: expected a finite number, got {rho}")
    return torch.full((), float(rho), dtype=torch.float32, device=x.device)


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an int ≥ {low}, got {v!r}")

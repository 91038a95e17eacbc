"""Fused LoRA convolution (forward and backward) in Triton.

Math. Base weight ``W (Co, Ci, kh, kw)``, adapter ``A (r, Ci, kh, kw)``, ``B (Co, r)``, scale ``s``.
The merged weight is ``W_k = W + s·B·A`` (``A`` flattened to ``r × Ci·kh·kw``) and the layer computes

    pre = conv(x, W_k) + bias                       (stride 1, 'same' padding: 1 for 3×3, 0 for 1×1)
    y   = out_scale · act(pre) + residual           (act = ReLU or identity; this order, exactly)

Two designs (``settings.conv_kernel()``: ``LORUN_FAST_CONV_KERNEL`` or ``use_conv_kernel``; v2 by default); both are
implicit-GEMM convolutions (GEMM view: M = N·H·W output pixels, N = Co, K = taps·Ci) with bias, ReLU, out_scale and
the residual add fused into the epilogue (``_epilogue``), and nothing of rank r ever reaches memory.

- **v2** (``_conv_fwd_halo_kernel``, ``_conv_dw_taps_kernel``): ``W_k`` is merged once per launch in torch (fp32,
  rounded once; 2·r·Co·Ci·taps FLOPs). A program owns a BH × BW block of output pixels and, per BLOCK_K chunk of
  input channels, loads the haloed input block once and forms the nine tap operands on chip (``tl.gather``). The
  backward forms ``dpre = out_scale·G·[mask]`` inside the dx pass (the same kernel on G with the flipped,
  channel-swapped ``W_k``) and inside the dW kernel, which reduces all taps of a pixel step in one GEMM
  (N = tap slots × channels) and also sums ``dbias``.
- **v1** (``_lora_conv_fwd_kernel``, ``_conv_dw_kernel``): the taps are unrolled; within a tap the kernel walks Ci
  in BLOCK_K chunks and forms the *merged* weight tile in registers, ``W tile + s·(A tile @ B tile)``, loading a
  shifted x tile per tap. Backward: ``dpre`` formed by torch, dx with the forward kernel on the merged weight, and
  a dW kernel with one tap per program.

In both, ``dW_eff = Σ_pixels dY_pre ⊗ im2col(x)`` is written as per-chunk partial sums that a fixed-order torch sum
reduces (deterministic: no atomics), and ``dA``, ``dB`` are tiny torch matmuls on ``dW_eff``.

``fused_lora_conv2d_indexed`` gives each sample its own adapter (``index[n]`` of U, ranks may differ), v2 only: the
U merged weights are stacked and the v2 forward / dx kernel picks its image's one (``HAS_WIDX``), one launch per
batch; dW_eff is reduced per adapter on the samples that use it.

Running without a GPU: set ``TRITON_INTERPRET=1`` in the environment before this module is imported (the
``@triton.jit`` decorators read it at decoration time); the kernels then run in Triton's interpreter on CPU tensors,
with one fixed tile configuration instead of autotuning. The kernels call only Triton builtins (``tl.full``, not
``tl.zeros``/``tl.cdiv``): those two are ``@triton.jit`` helpers in recent Triton, decorated when ``triton.language``
is imported, so they stay compiled-mode functions, and break an interpreted kernel, whenever triton was imported
before the variable was set.

Why one module of ~1,550 lines: it holds both designs of the convolution (v1 and v2, ``settings.conv_kernel``) and
the per-sample-adapter variant of v2 (``fused_lora_conv2d_indexed``, the same kernel with ``HAS_WIDX``), with their
launchers, the autograd and the custom ops, so that they share the epilogue, the checks and the op registration;
v1 stays only until a GPU run has timed the two side by side, and leaves with ~350 lines.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from lorun_fast.kernels.mma import _mma
from lorun_fast.kernels.settings import (INPUT_PRECISIONS, check_index_range, check_runnable, check_sample_index,
                                         conv_kernel, device_limits, dot_precision, full_tuning, interpreting)

__all__ = [
    "fused_lora_conv2d",
    "fused_lora_conv2d_indexed",
    "fused_conv2d",
    "merge_weight",
    "FusedLoRAConv2dFunction",
    "lora_conv2d_forward",
    "lora_conv2d_backward",
    "lora_conv2d_indexed_forward",
    "lora_conv2d_indexed_backward",
    "conv_weight_grad",
    "INPUT_PRECISIONS",
]

# Read once, like triton itself does when it decorates the kernels below.
_INTERPRET = interpreting()

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------------
# Tuning configurations
# --------------------------------------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# LORUN_FAST_TUNE=0 (the GPU test run) keeps two configs, one of them at 8 warps, so tests compile in seconds.
_TUNE = full_tuning()

# Config lists per dot precision, because the precision changes what a tile costs in registers: "tf32" (also what
# 16-bit inputs get, see settings.dot_precision) becomes tensor-core MMAs; "tf32x3" runs three MMAs per product on
# split operands, three times the operand registers; "ieee" becomes FMA loops with the whole accumulator and both
# operand fragments in registers. Tiles tuned for tf32 spill at 255 registers in the other two (ptxas, sm_90,
# bench/compile_report.py). The autotuner holds one list, the union; the pruner keeps the precision's own entries.
def _dw_cfg(bco, bci, warps, stages):
    return triton.Config({"BLOCK_CO": bco, "BLOCK_CI": bci}, num_warps=warps, num_stages=stages)


def _halo_cfg(bh, bw, bn, bk, warps, stages):
    # HALO: the haloed tile of a 3×3 kernel, (BH + 2)·(BW + 2) pixels, rounded up to a power of two (a 1×1 kernel
    # needs no halo and uses BH·BW).
    halo = triton.next_power_of_2((bh + 2) * (bw + 2))
    return triton.Config({"BH": bh, "BW": bw, "HALO": halo, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                         num_stages=stages)


if _INTERPRET:
    # Autotuning in the interpreter would run every config; 16-wide N/K tiles make the small test channel counts
    # (24, 32) span several tiles, so the tail masks are exercised.
    _FWD_BY_PRECISION = {"tf32": [_cfg(64, 16, 16, 4, 1)]}
    # 4×8 pixel tiles: the test images (e.g. 17×23) span several tiles with partial ones at both borders.
    _HALO_BY_PRECISION = {"tf32": [_halo_cfg(4, 8, 16, 16, 4, 1)]}
    _DW_CONFIGS = [triton.Config({"BLOCK_CO": 16, "BLOCK_CI": 16}, num_warps=4, num_stages=1)]
    _DW_TAPS_CONFIGS = [_dw_cfg(16, 16, 4, 1)]
elif not _TUNE:
    _FWD_BY_PRECISION = {
        "tf32": [_cfg(64, 16, 16, 4, 2), _cfg(128, 64, 32, 8, 3)],
        "tf32x3": [_cfg(64, 16, 16, 4, 2), _cfg(128, 64, 32, 8, 3)],
        "ieee": [_cfg(64, 16, 16, 8, 2), _cfg(64, 64, 16, 8, 2)],
    }
    _DW_CONFIGS = [triton.Config({"BLOCK_CO": 16, "BLOCK_CI": 16}, num_warps=4, num_stages=2),
                   triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64}, num_warps=8, num_stages=3)]
    _DW_TAPS_CONFIGS = [_dw_cfg(16, 16, 4, 3), _dw_cfg(64, 16, 8, 2)]
    _HALO_BY_PRECISION = {
        "tf32": [_halo_cfg(4, 16, 16, 16, 4, 2), _halo_cfg(8, 8, 64, 16, 4, 2)],
        "tf32x3": [_halo_cfg(4, 16, 16, 16, 4, 2), _halo_cfg(8, 8, 32, 16, 4, 2)],
        "ieee": [_halo_cfg(4, 16, 16, 16, 4, 2), _halo_cfg(8, 8, 32, 16, 8, 2)],
    }
else:
    # Short lists: autotuning compiles and times every entry once per key. Each list ends with a 16-wide tile, which
    # the channel pruner keeps for 16 channels. Every entry compiles without spills for C = 16–64, 3×3 and 1×1, with
    # and without the epilogue (ptxas, sm_90), except where noted in bench/NOTES.md.
    _FWD_BY_PRECISION = {
        "tf32": [
            _cfg(128, 64, 32, 8, 3),
            _cfg(128, 64, 16, 4, 4),
            _cfg(128, 32, 32, 4, 3),
            _cfg(128, 32, 16, 4, 4),
            _cfg(128, 16, 32, 4, 3),
            _cfg(64, 64, 32, 4, 3),
            _cfg(64, 64, 16, 4, 4),
            _cfg(64, 32, 32, 4, 2),
            _cfg(128, 64, 32, 8, 4),
            _cfg(64, 16, 16, 4, 2),
        ],
        "tf32x3": [
            _cfg(128, 64, 32, 8, 3),
            _cfg(64, 64, 32, 4, 3),
            _cfg(64, 32, 32, 4, 2),
            _cfg(64, 16, 16, 4, 2),
        ],
        # FMA: at most 16 accumulators per thread and BLOCK_K = 16 (128-row tiles spilled a few bytes at 1×1 and
        # in the dx pass).
        "ieee": [
            _cfg(64, 64, 16, 8, 2),
            _cfg(64, 32, 16, 4, 2),
            _cfg(32, 64, 16, 4, 2),
            _cfg(32, 32, 16, 4, 2),
            _cfg(64, 16, 16, 8, 2),
        ],
    }
    _DW_CONFIGS = [
        triton.Config({"BLOCK_CO": bco, "BLOCK_CI": bci}, num_warps=w, num_stages=s)
        # (32, 64) at 4 warps spilled in tf32 for 1×1 at 64 channels; at 8 it does not.
        for (bco, bci, w, s) in [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (32, 64, 8, 3), (32, 32, 4, 2),
                                 (16, 32, 4, 3), (32, 16, 4, 3), (16, 16, 4, 2), (64, 64, 4, 4)]
    ]
    # The all-taps dW kernel's N is TAPS_PAD·BLOCK_CI (16·BLOCK_CI for 3×3: nine taps padded to 16), so 3×3 keeps
    # BLOCK_CI = 16 (N = 256) and only 1×1 uses the wider ones; the pruner drops N > 256. No (32, 16) tile: at 4 and
    # at 8 warps triton 3.6's ptxas spilled 4–8 B with it on sm_90 (tf32 with the ReLU mask, ieee).
    _DW_TAPS_CONFIGS = [_dw_cfg(bco, bci, w, st) for (bco, bci, w, st) in
                        [(64, 16, 8, 2), (16, 16, 4, 3), (64, 64, 8, 2),
                         (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)]]

if not _INTERPRET and _TUNE:
    # The haloed-tile forward (v2): pixel tiles of BH × BW image rows/columns (BLOCK_M = BH·BW). The halo is
    # (BH + 2)·(BW + 2) pixels for 3×3, padded to a power of two: 8×16 → 180 of 256 rows, 8×8 → 100 of 128,
    # 4×16 → 108 of 128. The K loop runs once per Ci chunk (not per tap), so it pipelines at C = 32 too. The halo,
    # its gather indices and the gathered operand all live in registers: BLOCK_K = 32 chunks and 8×16 tiles (256
    # halo rows, even at 8 warps) ran out of registers (255, spilling; ptxas, sm_90), so the tiles are 64 pixels and
    # the chunks 16 channels.
    _HALO_BY_PRECISION = {
        "tf32": [
            _halo_cfg(8, 8, 64, 16, 4, 2),
            _halo_cfg(8, 8, 32, 16, 4, 3),
            _halo_cfg(4, 16, 64, 16, 4, 2),
            _halo_cfg(4, 16, 16, 16, 4, 2),
        ],
        "tf32x3": [
            _halo_cfg(8, 8, 32, 16, 4, 2),
            _halo_cfg(4, 16, 16, 16, 4, 2),
        ],
        "ieee": [
            _halo_cfg(8, 8, 32, 16, 8, 2),
            _halo_cfg(4, 16, 32, 16, 8, 2),
            _halo_cfg(4, 16, 16, 16, 4, 2),
        ],
    }

_FWD_CONFIGS = [c for configs in _FWD_BY_PRECISION.values() for c in configs]
_HALO_CONFIGS = [c for configs in _HALO_BY_PRECISION.values() for c in configs]


def _pow2_at_least_16(n):
    return max(16, triton.next_power_of_2(int(n)))


def _precision_configs(configs, input_precision):
    """The entries of ``configs`` (the autotuner's list, i.e. the same objects) that belong to the precision."""
    own = _FWD_BY_PRECISION.get(input_precision, _FWD_BY_PRECISION["tf32"])
    return [c for c in configs if any(c is o for o in own)] or own


def _capability(named_args):
    x = named_args.get("x_ptr")
    return device_limits(getattr(x, "device", None))[0]


def _fits_mma_sync(c):
    # Before sm_90 the MMA is mma.sync, whose A and B fragments both live in registers (wgmma reads B from shared
    # memory): there, tiles holding more than 48 fragment values per thread spilled (ptxas, sm_80, 255 registers).
    return c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]) <= 48 * 32 * c.num_warps


def _prune_fwd(configs, named_args, **kwargs):
    precision = kwargs.get("INPUT_PRECISION", "tf32")
    configs = _precision_configs(configs, precision)
    if precision != "ieee" and _capability(named_args)[0] < 9:
        configs = [c for c in configs if _fits_mma_sync(c)] or configs[-1:]
    # Tiles wider than the (power-of-two rounded) channel count only load masked zeros.
    kmax, nmax = _pow2_at_least_16(named_args["Ci"]), _pow2_at_least_16(named_args["Co"])
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= kmax and c.kwargs["BLOCK_N"] <= nmax]
    return kept or configs[-1:]


def _prune_halo(configs, named_args, **kwargs):
    precision = kwargs.get("INPUT_PRECISION", "tf32")
    own = _HALO_BY_PRECISION.get(precision, _HALO_BY_PRECISION["tf32"])
    configs = [c for c in configs if any(c is o for o in own)] or own
    kmax, nmax = _pow2_at_least_16(named_args["Ci"]), _pow2_at_least_16(named_args["Co"])
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= kmax and c.kwargs["BLOCK_N"] <= nmax]
    return kept or configs[-1:]


def _prune_dw_taps(configs, named_args, **kwargs):
    taps_pad = kwargs.get("TAPS_PAD", 16)
    cimax, comax = _pow2_at_least_16(named_args["Ci"]), _pow2_at_least_16(named_args["Co"])
    kept = [c for c in configs if c.kwargs["BLOCK_CI"] * taps_pad <= 256
            and c.kwargs["BLOCK_CI"] <= cimax and c.kwargs["BLOCK_CO"] <= comax]
    if kwargs.get("INPUT_PRECISION") == "ieee":
        # FMA dots hold the whole accumulator and both operands in registers: at most 32 accumulators per thread.
        kept = [c for c in kept if c.kwargs["BLOCK_CO"] * c.kwargs["BLOCK_CI"] * taps_pad <= 32 * 32 * c.num_warps]
    return kept or [c for c in configs if c.kwargs["BLOCK_CI"] * taps_pad <= 256][-1:] or configs[-1:]


def _prune_dw(configs, named_args, **kwargs):
    if kwargs.get("INPUT_PRECISION") == "ieee" and _capability(named_args)[0] < 9:
        # The FMA dot keeps the whole accumulator in registers before sm_90 (ptxas, sm_80: 64-wide tiles spilled at
        # 255 registers): at most 8 accumulators per thread there.
        configs = [c for c in configs if c.kwargs["BLOCK_CO"] * c.kwargs["BLOCK_CI"] <= 8 * 32 * c.num_warps] \
            or configs[-1:]
    cimax, comax = _pow2_at_least_16(named_args["Ci"]), _pow2_at_least_16(named_args["Co"])
    kept = [c for c in configs if c.kwargs["BLOCK_CI"] <= cimax and c.kwargs["BLOCK_CO"] <= comax]
    return kept or configs[-1:]


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------



@triton.jit
def _epilogue(acc, pix_ok, img, oh, ow, offs_n, n_ok, bias_ptr, res_ptr, y_ptr, mask_ptr, out_scale,
              sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w,
              HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr, WRITE_MASK: tl.constexpr):
    """``y = out_scale·act(acc + bias) + residual`` stored for the tile's pixels × channels (and the ReLU mask
    ``acc + bias > 0`` when ``WRITE_MASK``): the forward kernels' shared epilogue."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_ok = pix_ok[:, None] & n_ok[None, :]
    y_off = (img.to(tl.int64) * sy_n + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None] \
        + offs_n[None, :].to(tl.int64) * sy_c
    if WRITE_MASK:
        tl.store(mask_ptr + y_off, (acc > 0).to(tl.uint8), mask=out_ok)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = acc * out_scale
    if HAS_RES:
        r_off = (img.to(tl.int64) * sr_n + oh.to(tl.int64) * sr_h + ow.to(tl.int64) * sr_w)[:, None] \
            + offs_n[None, :].to(tl.int64) * sr_c
        acc = acc + tl.load(res_ptr + r_off, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _pixels(offs_m, M, H, W):
    """Output pixel indices → (in range, image, row, column) of an (NB, ·, H, W) tensor."""
    hw = offs_m % (H * W)
    return offs_m < M, offs_m // (H * W), hw // W, hw % W


@triton.jit
def _select_scale(tile, mask_ptrs, ok, scale, IN_MASK: tl.constexpr, SCALE_IN: tl.constexpr):
    """``tile`` times ``scale`` (if ``SCALE_IN``) where the mask tensor at ``mask_ptrs`` selects it (``IN_MASK``
    1: > 0, 2: < 0, 3: non-zero), 0 elsewhere; in fp32, rounded once to the tile's dtype."""
    value = tile.to(tl.float32)
    if SCALE_IN:
        value = value * scale
    if IN_MASK > 0:
        sel = tl.load(mask_ptrs, mask=ok, other=0)
        if IN_MASK == 1:
            keep = sel > 0
        elif IN_MASK == 2:
            keep = sel < 0
        else:
            keep = sel != 0
        value = tl.where(keep, value, 0.0)
    return value.to(tile.dtype)


# The precision and the epilogue switches are keys: they change the code (FMA vs MMA, extra loads and stores), so a
# config timed for one must not be reused for another.
@triton.autotune(configs=_FWD_CONFIGS,
                 key=["NB", "H", "W", "Ci", "Co", "sx_c", "KH", "HAS_LORA", "R_PAD", "INPUT_PRECISION", "HAS_BIAS",
                      "RELU", "HAS_RES", "WRITE_MASK", "IN_MASK", "SCALE_IN"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _lora_conv_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, res_ptr, y_ptr, mask_ptr, in_mask_ptr,
    NB, H, W, Ci, Co, R,
    scaling, out_scale, in_scale,
    sx_n, sx_c, sx_h, sx_w,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    sm_n, sm_c, sm_h, sm_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
    WRITE_MASK: tl.constexpr, R_PAD: tl.constexpr, IN_MASK: tl.constexpr, SCALE_IN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM 'same' convolution with a merged-in-registers LoRA weight and a fused epilogue.

    Each program computes a BLOCK_M (output pixels) × BLOCK_N (output channels) tile of ``y``.

    Args:
        x_ptr: input image (NB, Ci, H, W), any strides (channels_last, i.e. ``sx_c == 1``, loads coalesced).
        w_ptr: base weight pre-arranged as (KH·KW, Ci, Co), contiguous; when ``HAS_LORA`` is false this is the
            complete (already merged) weight.
        a_ptr: LoRA A pre-arranged as (KH·KW, Ci, R), contiguous. Ignored unless ``HAS_LORA``.
        b_ptr: LoRA B transposed to (R, Co), contiguous. Ignored unless ``HAS_LORA``.
        bias_ptr: bias (Co,). Ignored unless ``HAS_BIAS``.
        res_ptr: residual (NB, Co, H, W) with strides ``sr_*``. Ignored unless ``HAS_RES``.
        y_ptr: output (NB, Co, H, W) with strides ``sy_*``; every element is written.
        mask_ptr: uint8 (NB, Co, H, W) with the strides of ``y``: ``pre > 0``. Written only if ``WRITE_MASK``.
        in_mask_ptr: (NB, Ci, H, W) with strides ``sm_*``: what selects the input elements that count (the dx pass of
            the backward: x is ∂L/∂y and this is the saved output or ReLU mask). Read only if ``IN_MASK`` > 0.
        NB, H, W: batch size and image size (input and output share H×W).
        Ci, Co: input and output channels; any value, tails are masked.
        R: LoRA rank (≤ R_PAD).
        scaling: the LoRA scale s in ``W + s·B·A``.
        out_scale: the factor applied after the activation, before the residual.
        in_scale: the factor every loaded x element is multiplied by when ``SCALE_IN``.
        sx_*, sr_*, sy_*, sm_*: element strides (batch, channel, row, column) of x, residual, y and the input mask.
        KH, KW: kernel size, 3×3 (padding 1) or 1×1 (padding 0).
        HAS_LORA: form the merged weight tile ``W + s·(A @ B)`` in registers.
        HAS_BIAS, RELU, HAS_RES: epilogue switches.
        WRITE_MASK: store the ReLU mask (the backward needs it when a residual hides the sign of the activation).
        IN_MASK: keep only the x elements whose ``in_mask`` entry is 1: > 0, 2: < 0, 3: non-zero (uint8); 0: all.
            So the dx pass reads ∂L/∂pre = in_scale·∂L/∂y·[mask] without that tensor ever being written.
        SCALE_IN: multiply x by ``in_scale`` as it is loaded (in fp32, rounded once to x's dtype).
        R_PAD: rank padded to max(16, next power of two): tl.dot needs every dimension ≥ 16; rows ≥ R are masked.
        INPUT_PRECISION: tl.dot precision for float32 operands ("ieee", "tf32", "tf32x3"); no effect on 16-bit ones.
        UPCAST: multiply in float32 (interpreter + bfloat16 only, see ``_mma``).
        BLOCK_M, BLOCK_N, BLOCK_K: tile sizes over pixels, output channels and input channels.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HW = H * W
    M = NB * HW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    img = offs_m // HW
    hw = offs_m % HW
    oh = hw // W
    ow = hw % W
    # int64 so that batch·stride never wraps for large activations.
    x_img = img.to(tl.int64) * sx_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Co
    offs_k = tl.arange(0, BLOCK_K)

    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        # B does not depend on the tap or the Ci chunk: load it once per program.
        b_tile = tl.load(b_ptr + offs_r[:, None] * Co + offs_n[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # Taps unrolled at compile time: a flattened dynamic tap loop miscompiles at 8 warps in a similar template, and
    # unrolling makes every tap offset a constant.
    for t in tl.static_range(KH * KW):
        ih = oh + (t // KW - KH // 2)
        iw = ow + (t % KW - KW // 2)
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = x_img + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        if IN_MASK > 0 or SCALE_IN:
            m_row = img.to(tl.int64) * sm_n + ih.to(tl.int64) * sm_h + iw.to(tl.int64) * sm_w
        for k0 in range(0, Ci, BLOCK_K):
            ci = k0 + offs_k
            ci_ok = ci < Ci
            # Out-of-image neighbours and the channel tail read as zero: that is the zero padding.
            x_tile = tl.load(x_ptr + x_row[:, None] + ci[None, :] * sx_c,
                             mask=pix_ok[:, None] & ci_ok[None, :], other=0.0)
            if IN_MASK > 0 or SCALE_IN:
                x_tile = _select_scale(x_tile, in_mask_ptr + m_row[:, None] + ci[None, :] * sm_c,
                                       pix_ok[:, None] & ci_ok[None, :], in_scale, IN_MASK, SCALE_IN)
            w_tile = tl.load(w_ptr + (t * Ci + ci[:, None]) * Co + offs_n[None, :],
                             mask=ci_ok[:, None] & n_ok[None, :], other=0.0)
            if HAS_LORA:
                a_tile = tl.load(a_ptr + (t * Ci + ci[:, None]) * R + offs_r[None, :],
                                 mask=ci_ok[:, None] & r_ok[None, :], other=0.0)
                delta = _mma(a_tile, b_tile, tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32),
                             INPUT_PRECISION, UPCAST)
                # Merge in fp32, round once to the input dtype: the same rounding as merging in torch.
                w_tile = (w_tile.to(tl.float32) + scaling * delta).to(x_tile.dtype)
            acc = _mma(x_tile, w_tile, acc, INPUT_PRECISION, UPCAST)

    _epilogue(acc, m_ok, img, oh, ow, offs_n, n_ok, bias_ptr, res_ptr, y_ptr, mask_ptr, out_scale,
              sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, HAS_BIAS, RELU, HAS_RES, WRITE_MASK)


@triton.autotune(configs=_HALO_CONFIGS,
                 key=["NB", "H", "W", "Ci", "Co", "sx_c", "KH", "INPUT_PRECISION", "HAS_BIAS", "RELU", "HAS_RES",
                      "WRITE_MASK", "IN_MASK", "SCALE_IN", "HAS_WIDX"],
                 prune_configs_by={"early_config_prune": _prune_halo})
@triton.jit
def _conv_fwd_halo_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, mask_ptr, in_mask_ptr, widx_ptr,
    NB, H, W, Ci, Co,
    out_scale, in_scale,
    sx_n, sx_c, sx_h, sx_w,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    sm_n, sm_c, sm_h, sm_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr, WRITE_MASK: tl.constexpr,
    IN_MASK: tl.constexpr, SCALE_IN: tl.constexpr, HAS_WIDX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """'Same' convolution with an already merged weight, reading each x tile once (the v2 forward and dx kernel).

    Each program computes a BH × BW block of output pixels of one image (BLOCK_M = BH·BW GEMM rows) × BLOCK_N
    output channels. Per BLOCK_K chunk of input channels it loads the *haloed* input block — the
    (BH + KH − 1) × (BW + KW − 1) pixels all KH·KW taps read, padded to HALO rows — once, and forms each tap's
    (BLOCK_M × BLOCK_K) operand from it on chip with ``tl.gather`` (an index into the halo rows; the compiler stages
    the tile in shared memory), instead of loading nine shifted, mostly overlapping tiles from L2. The K loop runs
    over Ci chunks only, so at C ≤ BLOCK_K it is one iteration of nine MMAs.

    Args:
        x_ptr: input image (NB, Ci, H, W), any strides (channels_last, i.e. ``sx_c == 1``, loads coalesced).
        w_ptr: merged weight pre-arranged as (KH·KW, Ci, Co), contiguous; with ``HAS_WIDX`` a stack of U such
            weights, (U, KH·KW, Ci, Co), contiguous.
        bias_ptr: bias (Co,). Ignored unless ``HAS_BIAS``.
        res_ptr: residual (NB, Co, H, W) with strides ``sr_*``. Ignored unless ``HAS_RES``.
        y_ptr: output (NB, Co, H, W) with strides ``sy_*``; every element is written.
        mask_ptr: uint8 (NB, Co, H, W) with the strides of ``y``: ``pre > 0``. Written only if ``WRITE_MASK``.
        in_mask_ptr: (NB, Ci, H, W) with strides ``sm_*``: the saved output or uint8 ReLU mask that selects the x
            elements (the dx pass: x is ∂L/∂y). Read only if ``IN_MASK`` > 0.
        widx_ptr: int64 (NB,), contiguous, values in [0, U): image n is convolved with weight ``widx[n]`` of the
            stack. Read only if ``HAS_WIDX`` (nothing checks the range here: the caller does).
        NB, H, W: batch size and image size (input and output share H×W).
        Ci, Co: input and output channels; any value, tails are masked.
        out_scale: the factor applied after the activation, before the residual.
        in_scale: the factor every loaded x element is multiplied by when ``SCALE_IN``.
        sx_*, sr_*, sy_*, sm_*: element strides (batch, channel, row, column) of x, residual, y and the input mask.
        KH, KW: kernel size, 3×3 (padding 1) or 1×1 (padding 0).
        HAS_BIAS, RELU, HAS_RES, WRITE_MASK: epilogue switches, as in ``_lora_conv_fwd_kernel``.
        IN_MASK, SCALE_IN: how x is selected and scaled as it is loaded (``_select_scale``).
        HAS_WIDX: a weight per image, chosen by ``widx`` (one launch for a batch whose images use different
            weights); when false ``widx_ptr`` is never read and ``w_ptr`` is the one weight.
        INPUT_PRECISION: tl.dot precision for float32 operands; UPCAST: multiply in float32 (interpreter + bf16).
        BH, BW: output pixel block (powers of two); HALO: ≥ (BH + 2)·(BW + 2), a power of two (1×1: unused).
        BLOCK_N, BLOCK_K: tiles over output and input channels.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_w = (W + BW - 1) // BW
    tiles_h = (H + BH - 1) // BH
    img = pid_m // (tiles_h * tiles_w)
    t_hw = pid_m % (tiles_h * tiles_w)
    h0 = (t_hw // tiles_w) * BH
    w0 = (t_hw % tiles_w) * BW

    # Output pixels of the block, row-major.
    offs_p = tl.arange(0, BH * BW)
    oh = h0 + offs_p // BW
    ow = w0 + offs_p % BW
    p_ok = (oh < H) & (ow < W)  # the grid holds exactly NB images of tiles: img < NB
    if HAS_WIDX:
        # A program covers one image, so one scalar load picks its weight for the whole K loop; int64 because
        # U·taps·Ci·Co elements may exceed 2³¹.
        w_ptr += tl.load(widx_ptr + img).to(tl.int64) * Ci * Co * (KH * KW)

    # Input rows of the haloed block: (BH + KH − 1) × (BW + KW − 1) pixels, row-major, padded to HALO.
    HW_: tl.constexpr = BW + KW - 1
    if KH * KW == 1:
        offs_q = offs_p
        ih = oh
        iw = ow
        q_ok = p_ok
    else:
        offs_q = tl.arange(0, HALO)
        ih = h0 + offs_q // HW_ - KH // 2
        iw = w0 + offs_q % HW_ - KW // 2
        q_ok = (offs_q < (BH + KH - 1) * HW_) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_row = img.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
    if IN_MASK > 0 or SCALE_IN:
        m_row = img.to(tl.int64) * sm_n + ih.to(tl.int64) * sm_h + iw.to(tl.int64) * sm_w

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Co
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.full((BH * BW, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, Ci, BLOCK_K):
        ci = k0 + offs_k
        ci_ok = ci < Ci
        # Off-image pixels, the halo padding and the channel tail read as zero: that is the zero padding.
        ok = q_ok[:, None] & ci_ok[None, :]
        halo = tl.load(x_ptr + x_row[:, None] + ci[None, :] * sx_c, mask=ok, other=0.0)
        if IN_MASK > 0 or SCALE_IN:
            halo = _select_scale(halo, in_mask_ptr + m_row[:, None] + ci[None, :] * sm_c, ok, in_scale, IN_MASK,
                                 SCALE_IN)
        for t in tl.static_range(KH * KW):
            if KH * KW == 1:
                x_tile = halo
            else:
                # Output pixel (r, c) of the block reads halo row (r + t // KW)·(BW + KW − 1) + c + t % KW.
                src = (offs_p // BW + t // KW) * HW_ + offs_p % BW + t % KW
                x_tile = tl.gather(halo, tl.broadcast_to(src[:, None], (BH * BW, BLOCK_K)), 0)
            w_tile = tl.load(w_ptr + (t * Ci + ci[:, None]) * Co + offs_n[None, :],
                             mask=ci_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(x_tile, w_tile, acc, INPUT_PRECISION, UPCAST)

    _epilogue(acc, p_ok, img, oh, ow, offs_n, n_ok, bias_ptr, res_ptr, y_ptr, mask_ptr, out_scale,
              sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, HAS_BIAS, RELU, HAS_RES, WRITE_MASK)


@triton.autotune(configs=_DW_CONFIGS,
                 key=["NB", "H", "W", "Ci", "Co", "sx_c", "sd_c", "KH", "CHUNK_M", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_dw})
@triton.jit
def _conv_dw_kernel(
    x_ptr, dy_ptr, part_ptr,
    NB, H, W, Ci, Co, CHUNK_M,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_c, sd_h, sd_w,
    KH: tl.constexpr, KW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """Per-chunk weight gradient of a 'same' convolution:

        part[c, co, ci, t] = Σ_{m ∈ chunk c} dy[m, co]·x[m+t, ci]   (m+t: pixel m shifted by tap t, 0 off-image)


    Grid: (number of pixel chunks, Co tiles × Ci tiles, KH·KW taps). Every program overwrites its whole
    (BLOCK_CO × BLOCK_CI) slice of ``part`` for its chunk and tap, so ``part`` may start uninitialised and
    re-running the kernel (autotuning does) is harmless; summing ``part`` over chunks in a fixed order gives a
    run-to-run bitwise-reproducible dW.

    Args:
        x_ptr: forward input (NB, Ci, H, W), any strides.
        dy_ptr: gradient of the pre-activation (NB, Co, H, W), any strides (0 allowed).
        part_ptr: float32 (num_chunks, Co, Ci, KH·KW), contiguous.
        NB, H, W, Ci, Co: shapes as in the forward.
        CHUNK_M: output pixels per chunk; a multiple of BLOCK_M.
        sx_*, sd_*: element strides (batch, channel, row, column) of x and dy.
        KH, KW: kernel size (3×3 with padding 1 or 1×1 with padding 0).
        INPUT_PRECISION: tl.dot precision for float32 operands.
        UPCAST: multiply in float32 (interpreter + bfloat16 only).
        BLOCK_M: pixels per reduction step; fixed (not tuned) so the summation order does not depend on the config.
        BLOCK_CO, BLOCK_CI: tile over output and input channels.
    """
    pid_chunk = tl.program_id(0)
    pid_tile = tl.program_id(1)
    tap = tl.program_id(2)
    # Plain arithmetic, not tl.cdiv (see the note on tl.full in the module docstring).
    n_ci_tiles = (Ci + BLOCK_CI - 1) // BLOCK_CI
    pid_co = pid_tile // n_ci_tiles
    pid_ci = pid_tile % n_ci_tiles
    # A runtime tap is fine here: it is a grid index, not a loop.
    dh = tap // KW - KH // 2
    dw = tap % KW - KW // 2

    HW = H * W
    M = NB * HW
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < Co
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = offs_ci < Ci

    acc = tl.full((BLOCK_CO, BLOCK_CI), 0.0, tl.float32)
    m_start = pid_chunk * CHUNK_M
    for m0 in range(0, CHUNK_M, BLOCK_M):
        m_ok, img, oh, ow = _pixels(m_start + m0 + tl.arange(0, BLOCK_M), M, H, W)
        d_off = img.to(tl.int64) * sd_n + oh.to(tl.int64) * sd_h + ow.to(tl.int64) * sd_w
        # Loaded already transposed (Co × pixels) so the reduction dimension is the dot's inner one.
        dy_t = tl.load(dy_ptr + d_off[None, :] + offs_co[:, None].to(tl.int64) * sd_c,
                       mask=co_ok[:, None] & m_ok[None, :], other=0.0)
        ih = oh + dh
        iw = ow + dw
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = img.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        x_tile = tl.load(x_ptr + x_off[:, None] + offs_ci[None, :] * sx_c,
                         mask=pix_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = _mma(dy_t, x_tile, acc, INPUT_PRECISION, UPCAST)

    taps = KH * KW
    p_off = ((pid_chunk.to(tl.int64) * Co + offs_co[:, None]) * Ci + offs_ci[None, :]) * taps + tap
    tl.store(part_ptr + p_off, acc, mask=co_ok[:, None] & ci_ok[None, :])


@triton.autotune(configs=_DW_TAPS_CONFIGS,
                 key=["NB", "H", "W", "Ci", "Co", "sx_c", "sd_c", "KH", "CHUNK_M", "INPUT_PRECISION", "IN_MASK",
                      "SCALE_IN", "BIAS_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_dw_taps})
@triton.jit
def _conv_dw_taps_kernel(
    x_ptr, dy_ptr, m_ptr, part_ptr, bpart_ptr,
    NB, H, W, Ci, Co, CHUNK_M, in_scale,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_c, sd_h, sd_w,
    sm_n, sm_c, sm_h, sm_w,
    KH: tl.constexpr, KW: tl.constexpr, TAPS_PAD: tl.constexpr,
    IN_MASK: tl.constexpr, SCALE_IN: tl.constexpr, BIAS_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """Per-chunk weight gradient of a 'same' convolution, all taps in one program (the v2 design):

        part[c, co, ci, t] = Σ_{m ∈ chunk c} dpre[m, co]·x[m+t, ci]      dpre = in_scale·dy·[mask]
        bpart[c, co]       = Σ_{m ∈ chunk c} dpre[m, co]                  (only if BIAS_GRAD)

    Grid: (number of pixel chunks, Co tiles × Ci tiles). One GEMM per pixel step with K = BLOCK_M pixels and
    N = TAPS_PAD·BLOCK_CI columns, column j holding tap j // BLOCK_CI of channel j mod BLOCK_CI: the dy tile is
    loaded (and masked) once for all taps, and the nine shifted x windows of one pixel step are gathered by the same
    program, so their overlap is served by L1 instead of nine programs each reading x and dy. Columns of the
    padding taps (t ≥ KH·KW) are masked to zero and never stored. Every program overwrites its whole slice of
    ``part`` (and of ``bpart`` when it owns Ci tile 0); a fixed-order torch sum over chunks makes dW deterministic.

    Args:
        x_ptr: forward input (NB, Ci, H, W), any strides.
        dy_ptr: ∂L/∂y (NB, Co, H, W), any strides (0 allowed).
        m_ptr: the saved output or uint8 ReLU mask (NB, Co, H, W), strides ``sm_*``. Read only if ``IN_MASK`` > 0.
        part_ptr: float32 (num_chunks, Co, Ci, KH·KW), contiguous.
        bpart_ptr: float32 (num_chunks, Co), contiguous. Written only if ``BIAS_GRAD``.
        NB, H, W, Ci, Co: shapes as in the forward.
        CHUNK_M: output pixels per chunk; a multiple of BLOCK_M.
        in_scale: the factor of ``dpre`` (the forward's out_scale). Used only if ``SCALE_IN``.
        sx_*, sd_*, sm_*: element strides (batch, channel, row, column) of x, dy and the mask tensor.
        KH, KW: kernel size (3×3 with padding 1 or 1×1 with padding 0); TAPS_PAD: KH·KW rounded up to a power of 2.
        IN_MASK, SCALE_IN: how dpre is made from dy (see ``_select_scale``).
        BIAS_GRAD: also write the per-chunk sums of dpre.
        INPUT_PRECISION: tl.dot precision for float32 operands.
        UPCAST: multiply in float32 (interpreter + bfloat16 only).
        BLOCK_M: pixels per reduction step; fixed (not tuned) so the summation order does not depend on the config.
        BLOCK_CO, BLOCK_CI: tile over output and input channels.
    """
    pid_chunk = tl.program_id(0)
    pid_tile = tl.program_id(1)
    n_ci_tiles = (Ci + BLOCK_CI - 1) // BLOCK_CI
    pid_co = pid_tile // n_ci_tiles
    pid_ci = pid_tile % n_ci_tiles

    HW = H * W
    M = NB * HW
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < Co
    cols = tl.arange(0, TAPS_PAD * BLOCK_CI)
    tap = cols // BLOCK_CI
    ci = pid_ci * BLOCK_CI + cols % BLOCK_CI
    col_ok = (tap < KH * KW) & (ci < Ci)
    dh = tap // KW - KH // 2
    dw = tap % KW - KW // 2

    acc = tl.full((BLOCK_CO, TAPS_PAD * BLOCK_CI), 0.0, tl.float32)
    bacc = tl.full((BLOCK_CO,), 0.0, tl.float32)
    m_start = pid_chunk * CHUNK_M
    for m0 in range(0, CHUNK_M, BLOCK_M):
        m_ok, img, oh, ow = _pixels(m_start + m0 + tl.arange(0, BLOCK_M), M, H, W)
        d_off = img.to(tl.int64) * sd_n + oh.to(tl.int64) * sd_h + ow.to(tl.int64) * sd_w
        d_ok = co_ok[:, None] & m_ok[None, :]
        # Loaded already transposed (Co × pixels) so the reduction dimension is the dot's inner one.
        dy_t = tl.load(dy_ptr + d_off[None, :] + offs_co[:, None].to(tl.int64) * sd_c, mask=d_ok, other=0.0)
        if IN_MASK > 0 or SCALE_IN:
            s_off = img.to(tl.int64) * sm_n + oh.to(tl.int64) * sm_h + ow.to(tl.int64) * sm_w
            dy_t = _select_scale(dy_t, m_ptr + s_off[None, :] + offs_co[:, None].to(tl.int64) * sm_c, d_ok,
                                 in_scale, IN_MASK, SCALE_IN)
        if BIAS_GRAD:
            bacc += tl.sum(dy_t.to(tl.float32), axis=1)
        ih = oh[:, None] + dh[None, :]
        iw = ow[:, None] + dw[None, :]
        x_ok = m_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = img.to(tl.int64)[:, None] * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w \
            + ci.to(tl.int64)[None, :] * sx_c
        x_tile = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)
        acc = _mma(dy_t, x_tile, acc, INPUT_PRECISION, UPCAST)

    taps = KH * KW
    p_off = ((pid_chunk.to(tl.int64) * Co + offs_co[:, None]) * Ci + ci[None, :]) * taps + tap[None, :]
    tl.store(part_ptr + p_off, acc, mask=co_ok[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        if pid_ci == 0:
            tl.store(bpart_ptr + pid_chunk.to(tl.int64) * Co + offs_co, bacc, mask=co_ok)


# --------------------------------------------------------------------------------------------------------------------
# Launchers (no autograd here)
# --------------------------------------------------------------------------------------------------------------------

_DW_BLOCK_M = 64          # reduction step of the dW kernel (see _conv_dw_kernel)
_DW_CHUNK_ALIGN = 128     # chunks are whole multiples of this many pixels
_DW_TARGET_PROGRAMS = 1024
_DW_PARTIAL_BUDGET = 64 * 2 ** 20  # bytes of float32 partial sums we accept


# Test hook: when true, every buffer the launchers allocate starts as NaN (uint8 masks as 2), so a test can prove
# that the kernels write every element of what they return.
POISON_OUTPUTS = False


def _poison(t: torch.Tensor) -> torch.Tensor:
    if POISON_OUTPUTS:
        t.fill_(float("nan") if t.is_floating_point() else 2)
    return t


def _wants_channels_last(t: torch.Tensor) -> bool:
    # Outputs follow the input's layout, as torch's own conv does; a tensor that is both (C == 1 or H == W == 1)
    # counts as NCHW.
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _empty_image(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _taps_arrangement(w: torch.Tensor) -> torch.Tensor:
    """(O, I, kh, kw) → (kh·kw, I, O) contiguous: per tap, an (I × O) GEMM operand with O contiguous."""
    o, i, kh, kw = w.shape
    return w.permute(2, 3, 1, 0).reshape(kh * kw, i, o).contiguous()


def _check_runnable(t: torch.Tensor) -> None:
    check_runnable(t, "lorun_fast.kernels.lora_conv")


def _dot_precision(dtype: torch.dtype, input_precision: str) -> str:
    return dot_precision(dtype, input_precision)


def _launch_conv(x, w_arr, a_arr, b_arr, scaling, bias, residual, relu, out_scale, input_precision, write_mask,
                 ksize, co, channels_last, in_mask=None, in_mask_mode=0, in_scale=1.0):
    """Run the forward kernel; returns (y, mask) (mask empty unless ``write_mask``). ``in_mask`` /
    ``in_mask_mode`` / ``in_scale``: how x is selected and scaled as it is loaded (``_select_scale``)."""
    nb, ci, h, w = x.shape
    y = _poison(_empty_image((nb, co, h, w), x, channels_last))
    mask = (_poison(torch.empty_strided(y.shape, y.stride(), dtype=torch.uint8, device=y.device)) if write_mask
            else torch.empty(0, dtype=torch.uint8, device=y.device))
    m = nb * h * w
    if m == 0 or co == 0:
        return y, mask
    _check_runnable(x)
    has_lora = a_arr is not None
    rank = b_arr.shape[0] if has_lora else 1
    res = residual if residual is not None else y
    sel = in_mask if in_mask_mode else x
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(co, meta["BLOCK_N"]))  # noqa: E731
    _lora_conv_fwd_kernel[grid](
        x, w_arr, a_arr if has_lora else w_arr, b_arr if has_lora else w_arr,
        bias if bias is not None else w_arr, res, y, mask if write_mask else y, sel,
        nb, h, w, ci, co, rank,
        float(scaling), float(out_scale), float(in_scale),
        *x.stride(), *res.stride(), *y.stride(), *sel.stride(),
        KH=ksize, KW=ksize,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, RELU=bool(relu), HAS_RES=residual is not None,
        WRITE_MASK=bool(write_mask), R_PAD=_pow2_at_least_16(rank), IN_MASK=int(in_mask_mode),
        SCALE_IN=float(in_scale) != 1.0,
        INPUT_PRECISION=_dot_precision(x.dtype, input_precision),
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
    )
    return y, mask


def _launch_conv_halo(x, w_arr, bias, residual, relu, out_scale, input_precision, write_mask, ksize, co,
                      channels_last, in_mask=None, in_mask_mode=0, in_scale=1.0, widx=None):
    """Run the haloed-tile kernel (v2) with an already merged, tap-arranged weight; returns (y, mask).
    ``widx``: an int64 (N,) index into a stack of such weights, ``w_arr`` (U, taps, Ci, Co): image n uses
    ``w_arr[widx[n]]`` (values not checked here)."""
    nb, ci, h, w = x.shape
    y = _poison(_empty_image((nb, co, h, w), x, channels_last))
    mask = (_poison(torch.empty_strided(y.shape, y.stride(), dtype=torch.uint8, device=y.device)) if write_mask
            else torch.empty(0, dtype=torch.uint8, device=y.device))
    if nb * h * w == 0 or co == 0:
        return y, mask
    _check_runnable(x)
    res = residual if residual is not None else y
    sel = in_mask if in_mask_mode else x
    if widx is not None:
        widx = widx.contiguous()
    grid = lambda meta: (nb * triton.cdiv(h, meta["BH"]) * triton.cdiv(w, meta["BW"]),  # noqa: E731
                         triton.cdiv(co, meta["BLOCK_N"]))
    _conv_fwd_halo_kernel[grid](
        x, w_arr, bias if bias is not None else w_arr, res, y, mask if write_mask else y, sel,
        widx if widx is not None else w_arr,
        nb, h, w, ci, co,
        float(out_scale), float(in_scale),
        *x.stride(), *res.stride(), *y.stride(), *sel.stride(),
        KH=ksize, KW=ksize,
        HAS_BIAS=bias is not None, RELU=bool(relu), HAS_RES=residual is not None, WRITE_MASK=bool(write_mask),
        IN_MASK=int(in_mask_mode), SCALE_IN=float(in_scale) != 1.0, HAS_WIDX=widx is not None,
        INPUT_PRECISION=_dot_precision(x.dtype, input_precision),
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
    )
    return y, mask


def _dw_chunk(m: int, co: int, ci: int, taps: int, tap_programs: bool = True) -> Tuple[int, int]:
    """Pixels per chunk and number of chunks: depends on the shape only, never on the tuned config.
    ``tap_programs``: the taps are a grid axis (v1) rather than a loop inside each program (v2)."""
    tiles = triton.cdiv(co, 64) * triton.cdiv(ci, 64) * (taps if tap_programs else 1)
    want = max(1, triton.cdiv(_DW_TARGET_PROGRAMS, tiles))
    cap = max(1, _DW_PARTIAL_BUDGET // (4 * co * ci * taps))
    chunks = min(want, cap, triton.cdiv(m, _DW_CHUNK_ALIGN))
    chunk_m = triton.cdiv(triton.cdiv(m, chunks), _DW_CHUNK_ALIGN) * _DW_CHUNK_ALIGN
    return chunk_m, triton.cdiv(m, chunk_m)


def conv_weight_grad(x: torch.Tensor, dy: torch.Tensor, ksize: int, input_precision: str = "tf32") -> torch.Tensor:
    """float32 ``dW (Co, Ci, k, k)`` of the 'same' stride-1 convolution ``y = conv(x, W)`` for ``dy = ∂L/∂y``."""
    nb, ci, h, w = x.shape
    co = dy.shape[1]
    taps = ksize * ksize
    m = nb * h * w
    if m == 0:
        return torch.zeros((co, ci, ksize, ksize), dtype=torch.float32, device=x.device)
    _check_runnable(x)
    chunk_m, chunks = _dw_chunk(m, co, ci, taps)
    part = _poison(torch.empty((chunks, co, ci, taps), dtype=torch.float32, device=x.device))
    grid = lambda meta: (chunks, triton.cdiv(co, meta["BLOCK_CO"]) * triton.cdiv(ci, meta["BLOCK_CI"]),  # noqa: E731
                         taps)
    _conv_dw_kernel[grid](
        x, dy, part, nb, h, w, ci, co, chunk_m,
        *x.stride(), *dy.stride(),
        KH=ksize, KW=ksize,
        INPUT_PRECISION=_dot_precision(x.dtype, input_precision),
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=_DW_BLOCK_M,
    )
    # Fixed-order reduction over chunks (torch's dense sum uses no atomics).
    return part.sum(0).view(co, ci, ksize, ksize)


_DW_TAPS_BLOCK_M = 32     # reduction step of the all-taps dW kernel: its x operand is BLOCK_M × TAPS_PAD·BLOCK_CI


def conv_weight_grad_taps(x: torch.Tensor, dy: torch.Tensor, ksize: int, input_precision: str = "tf32",
                          selector: Optional[torch.Tensor] = None, selector_mode: int = 0, scale: float = 1.0,
                          bias_grad: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """float32 ``(dW (Co, Ci, k, k), dbias (Co,) or None)`` of the 'same' stride-1 convolution for
    ``dpre = scale·dy·[selector]`` (``_select_scale``'s modes), all taps reduced in one program (v2)."""
    nb, ci, h, w = x.shape
    co = dy.shape[1]
    taps = ksize * ksize
    m = nb * h * w
    if m == 0:
        zeros = torch.zeros((co, ci, ksize, ksize), dtype=torch.float32, device=x.device)
        return zeros, (torch.zeros(co, dtype=torch.float32, device=x.device) if bias_grad else None)
    _check_runnable(x)
    chunk_m, chunks = _dw_chunk(m, co, ci, taps, tap_programs=False)
    part = _poison(torch.empty((chunks, co, ci, taps), dtype=torch.float32, device=x.device))
    bpart = _poison(torch.empty((chunks, co), dtype=torch.float32, device=x.device)) if bias_grad else part
    sel = selector if selector_mode else dy
    grid = lambda meta: (chunks, triton.cdiv(co, meta["BLOCK_CO"]) * triton.cdiv(ci, meta["BLOCK_CI"]))  # noqa: E731
    _conv_dw_taps_kernel[grid](
        x, dy, sel, part, bpart, nb, h, w, ci, co, chunk_m, float(scale),
        *x.stride(), *dy.stride(), *sel.stride(),
        KH=ksize, KW=ksize, TAPS_PAD=triton.next_power_of_2(taps),
        IN_MASK=int(selector_mode), SCALE_IN=float(scale) != 1.0, BIAS_GRAD=bool(bias_grad),
        INPUT_PRECISION=_dot_precision(x.dtype, input_precision),
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=_DW_TAPS_BLOCK_M,
    )
    return part.sum(0).view(co, ci, ksize, ksize), (bpart.sum(0) if bias_grad else None)


def lora_conv2d_forward(x, weight, lora_a, lora_b, scaling, bias=None, residual=None, relu=False, out_scale=1.0,
                        input_precision="tf32", write_mask=False):
    """Launch the fused forward (no autograd, no validation). Returns ``(y, relu_mask)``.

    ``lora_b`` may be (Co, r) or peft's (Co, r, 1, 1). ``relu_mask`` is uint8 ``pre > 0`` in ``y``'s layout when
    ``write_mask`` is true, else an empty uint8 tensor.
    """
    co, _, k, _ = weight.shape
    if conv_kernel() == "v2":
        # Merge once per launch (Co·Ci·k² values, 2·r FLOPs each), then a plain convolution.
        return conv2d_forward(x, _merged_weight(weight, lora_a, lora_b, scaling), bias, residual, relu, out_scale,
                              input_precision, write_mask)
    rank = lora_a.shape[0]
    w_arr = _taps_arrangement(weight)
    a_arr = _taps_arrangement(lora_a)                 # (taps, Ci, r)
    b_arr = lora_b.reshape(co, rank).t().contiguous()  # (r, Co)
    return _launch_conv(x, w_arr, a_arr, b_arr, scaling, bias, residual, relu, out_scale, input_precision,
                        write_mask, k, co, _wants_channels_last(x))


def conv2d_forward(x, weight, bias=None, residual=None, relu=False, out_scale=1.0, input_precision="tf32",
                   write_mask=False):
    """The forward kernel with an already merged weight (Co, Ci, k, k): ``(y, relu_mask)`` as
    ``lora_conv2d_forward``. No autograd, no validation."""
    co, _, k, _ = weight.shape
    return _launch_conv_halo(x, _taps_arrangement(weight), bias, residual, relu, out_scale, input_precision,
                             write_mask, k, co, _wants_channels_last(x))


def merge_weight(weight, lora_a, lora_b, scaling):
    """``W + s·B·A`` merged in float32 and rounded once to the weight dtype: the weight the v2 kernels convolve
    with (v1 forms the same values tile by tile). Callers that reuse it across forwards may cache it."""
    return _merged_weight(weight, lora_a, lora_b, scaling)


def _merged_weight(weight, lora_a, lora_b, scaling):
    """``W + s·B·A`` merged in float32 and rounded once to the weight dtype (as the forward kernel does per tile)."""
    co, rank = weight.shape[0], lora_a.shape[0]
    delta = lora_b.reshape(co, rank).float() @ lora_a.reshape(rank, -1).float()
    return (weight.float() + scaling * delta.view(weight.shape)).to(weight.dtype)


def _relu_grad_input(grad_y, saved, relu, mask_from_output, out_scale):
    """``∂L/∂pre`` from ``∂L/∂y``: chain rule through ``out_scale·relu(pre)``."""
    g = grad_y if out_scale == 1.0 else grad_y * out_scale
    if relu:
        if mask_from_output:
            # No residual: sign(y) = sign(out_scale)·[pre > 0]; with out_scale == 0 g is already zero.
            keep = saved > 0 if out_scale >= 0 else saved < 0
        else:
            keep = saved.bool()
        g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g


def lora_conv2d_backward(grad_y, x, weight, lora_a, lora_b, saved, scaling, relu, mask_from_output, out_scale,
                         input_precision, need_x, need_w, need_a, need_b, need_bias, version=None):
    """All input gradients of the fused op; entries not asked for are empty tensors. See FusedLoRAConv2dFunction.
    ``version``: the design that ran the forward ("v1" / "v2"; default: ``settings.conv_kernel()``)."""
    if (version or conv_kernel()) == "v2":
        return _lora_conv2d_backward_v2(grad_y, x, weight, lora_a, lora_b, saved, scaling, relu, mask_from_output,
                                        out_scale, input_precision, need_x, need_w, need_a, need_b, need_bias)
    co, ci, k, _ = weight.shape
    rank = lora_a.shape[0]
    g = _relu_grad_input(grad_y, saved, relu, mask_from_output, out_scale)
    # Distinct empties: outputs of a custom op must not alias one another.
    dx, dw, da, db, dbias = (x.new_empty(0) for _ in range(5))
    if need_bias:
        dbias = g.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
    if need_w or need_a or need_b:
        dw_eff = conv_weight_grad(x, g, k, input_precision)  # float32 (Co, Ci, k, k)
        flat = dw_eff.view(co, -1)
        if need_w:
            dw = dw_eff.to(weight.dtype)
        if need_a:
            da = (scaling * (lora_b.reshape(co, rank).float().t() @ flat)).view(lora_a.shape).to(lora_a.dtype)
        if need_b:
            db = (scaling * (flat @ lora_a.reshape(rank, -1).float().t())).view(lora_b.shape).to(lora_b.dtype)
    if need_x:
        wk = _merged_weight(weight, lora_a, lora_b, scaling)
        # Transposed 'same' conv = correlation with flipped taps and in/out channels swapped: arrange as
        # (taps, K = Co, N = Ci) for the forward kernel.
        w_arr = _taps_arrangement(wk.flip(2, 3).transpose(0, 1))
        dx, _ = _launch_conv(g, w_arr, None, None, 0.0, None, None, False, 1.0, input_precision, False, k, ci,
                             _wants_channels_last(x))
    return dx, dw, da, db, dbias


def _selector(saved, relu, mask_from_output, out_scale) -> Tuple[Optional[torch.Tensor], int]:
    """The ReLU selection of ``_relu_grad_input`` as (tensor, ``_select_scale`` mode), applied inside the kernels."""
    if not relu:
        return None, 0
    if mask_from_output:
        return saved, (1 if out_scale >= 0 else 2)
    return saved, 3


def _lora_conv2d_backward_v2(grad_y, x, weight, lora_a, lora_b, saved, scaling, relu, mask_from_output, out_scale,
                             input_precision, need_x, need_w, need_a, need_b, need_bias):
    """v2 backward: ``dpre = out_scale·G·[mask]`` is formed inside the dx and dW kernels as they load G (never
    written), dW (and dbias with it) reduces all taps in one program, and the merged weight of dx is formed once."""
    co, ci, k, _ = weight.shape
    rank = lora_a.shape[0]
    selector, mode = _selector(saved, relu, mask_from_output, out_scale)
    dx, dw, da, db, dbias = (x.new_empty(0) for _ in range(5))
    if need_w or need_a or need_b:
        dw_eff, dbias_f = conv_weight_grad_taps(x, grad_y, k, input_precision, selector, mode, out_scale,
                                                bias_grad=need_bias)
        flat = dw_eff.view(co, -1)
        if need_bias:
            dbias = dbias_f.to(weight.dtype)
        if need_w:
            dw = dw_eff.to(weight.dtype)
        if need_a:
            da = (scaling * (lora_b.reshape(co, rank).float().t() @ flat)).view(lora_a.shape).to(lora_a.dtype)
        if need_b:
            db = (scaling * (flat @ lora_a.reshape(rank, -1).float().t())).view(lora_b.shape).to(lora_b.dtype)
    elif need_bias:
        g = _relu_grad_input(grad_y, saved, relu, mask_from_output, out_scale)
        dbias = g.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
    if need_x:
        wk = _merged_weight(weight, lora_a, lora_b, scaling)
        w_arr = _taps_arrangement(wk.flip(2, 3).transpose(0, 1))
        dx, _ = _launch_conv_halo(grad_y, w_arr, None, None, False, 1.0, input_precision, False, k, ci,
                                  _wants_channels_last(x), in_mask=selector, in_mask_mode=mode, in_scale=out_scale)
    return dx, dw, da, db, dbias


def _stacked_taps(weight, lora_a, lora_b, scaling, transposed=False):
    """The merged weights ``W + s·B_u·A_u`` of all U adapters, each tap-arranged, stacked: (U, taps, Ci, Co),
    contiguous (``transposed``: flipped and channel-swapped for the dx pass, (U, taps, Co, Ci)). Each is merged
    exactly as ``_merged_weight`` merges the single adapter of ``lora_conv2d_forward``."""
    arrs = []
    for a, b in zip(lora_a, lora_b):
        wk = _merged_weight(weight, a, b, scaling)
        arrs.append(_taps_arrangement(wk.flip(2, 3).transpose(0, 1) if transposed else wk))
    return torch.stack(arrs)


def lora_conv2d_indexed_forward(x, weight, lora_a, lora_b, scaling, index, bias=None, residual=None, relu=False,
                                out_scale=1.0, input_precision="tf32", write_mask=False):
    """Launch the per-sample-adapter forward (v2 kernel; no autograd, no validation): ``(y, relu_mask)`` as
    ``lora_conv2d_forward``, sample n convolved with ``W + s·B_{index[n]}·A_{index[n]}``. ``lora_a``, ``lora_b``:
    sequences of U adapters; ``index``: int64 (N,) with values in [0, U) (not checked here)."""
    co, _, k, _ = weight.shape
    # All U merged weights stacked, one launch: each program reads the weight of its image's adapter.
    w_arr = _stacked_taps(weight, lora_a, lora_b, scaling)
    return _launch_conv_halo(x, w_arr, bias, residual, relu, out_scale, input_precision, write_mask, k, co,
                             _wants_channels_last(x), widx=index)


def lora_conv2d_indexed_backward(grad_y, x, weight, lora_a, lora_b, index, saved, scaling, relu, mask_from_output,
                                 out_scale, input_precision, need_x, need_w, need_a, need_b, need_bias):
    """All input gradients of the per-sample-adapter op: ``(dx, dW, [dA_u], [dB_u], dbias)``; entries not asked
    for are empty tensors (``need_a`` / ``need_b``: every adapter's). See ``fused_lora_conv2d_indexed``.

    dx is one launch of the dx pass over the whole batch (the stacked flipped weights, the same index). dW_eff is
    reduced per adapter by the v2 dW kernel over the samples that use it (gathered; a sample set that is the whole
    batch is used in place), so dW_eff_u, dA_u and dB_u are those of ``lora_conv2d_backward`` on that sub-batch;
    an adapter no sample uses gets zero gradients. ``dW = Σ_u dW_eff_u`` and ``dbias`` sum in adapter order.
    """
    co, ci, k, _ = weight.shape
    nb = x.shape[0]
    n_adapters = len(lora_a)
    selector, mode = _selector(saved, relu, mask_from_output, out_scale)
    # Distinct empties: outputs of a custom op must not alias one another.
    dx, dw, dbias = (x.new_empty(0) for _ in range(3))
    da = [x.new_empty(0) for _ in range(n_adapters)]
    db = [x.new_empty(0) for _ in range(n_adapters)]
    if need_w or need_a or need_b:
        # One host sync for the group sizes; a stable sort lists each adapter's samples in batch order.
        counts = torch.bincount(index, minlength=n_adapters).tolist() if nb else [0] * n_adapters
        order = torch.argsort(index, stable=True)
        dw_sum, dbias_sum, start = None, None, 0
        for u, (a, b) in enumerate(zip(lora_a, lora_b)):
            count = counts[u]
            if count == 0:
                if need_a:
                    da[u] = torch.zeros_like(a)
                if need_b:
                    db[u] = torch.zeros_like(b)
                continue
            if count == nb:
                x_u, g_u, sel_u = x, grad_y, selector
            else:
                rows = order[start:start + count]
                x_u, g_u = x.index_select(0, rows), grad_y.index_select(0, rows)
                sel_u = selector.index_select(0, rows) if selector is not None else None
            start += count
            dw_u, dbias_u = conv_weight_grad_taps(x_u, g_u, k, input_precision, sel_u, mode, out_scale,
                                                  bias_grad=need_bias)
            rank = a.shape[0]
            flat = dw_u.view(co, -1)
            if need_a:
                da[u] = (scaling * (b.reshape(co, rank).float().t() @ flat)).view(a.shape).to(a.dtype)
            if need_b:
                db[u] = (scaling * (flat @ a.reshape(rank, -1).float().t())).view(b.shape).to(b.dtype)
            dw_sum = dw_u if dw_sum is None else dw_sum + dw_u
            if need_bias:
                dbias_sum = dbias_u if dbias_sum is None else dbias_sum + dbias_u
        if dw_sum is None:  # empty batch
            dw_sum = torch.zeros((co, ci, k, k), dtype=torch.float32, device=x.device)
            dbias_sum = torch.zeros(co, dtype=torch.float32, device=x.device)
        if need_w:
            dw = dw_sum.to(weight.dtype)
        if need_bias:
            dbias = dbias_sum.to(weight.dtype)
    elif need_bias:
        g = _relu_grad_input(grad_y, saved, relu, mask_from_output, out_scale)
        dbias = g.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
    if need_x:
        w_arr = _stacked_taps(weight, lora_a, lora_b, scaling, transposed=True)
        dx, _ = _launch_conv_halo(grad_y, w_arr, None, None, False, 1.0, input_precision, False, k, ci,
                                  _wants_channels_last(x), in_mask=selector, in_mask_mode=mode, in_scale=out_scale,
                                  widx=index)
    return dx, dw, da, db, dbias


# --------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lorun_fast::lora_conv2d", mutates_args=())
def _lora_conv2d_op(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], scaling: float, relu: bool,
                    out_scale: float, input_precision: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the fused LoRA conv: ``(y, relu_mask)``; the mask is non-empty only for relu with a residual."""
    return lora_conv2d_forward(x, weight, lora_a, lora_b, scaling, bias, residual, relu, out_scale,
                               input_precision, write_mask=_needs_mask(relu, residual))


def _needs_mask(relu, residual) -> bool:
    # Without a residual the sign of y gives the ReLU mask for free; with one it does not.
    return bool(relu) and residual is not None


def _fake_outputs(x, weight, relu, residual):
    """The (y, relu_mask) a forward op returns, as empty tensors of the right shapes, strides and dtypes."""
    nb, _, h, w = x.shape
    y = _empty_image((nb, weight.shape[0], h, w), x, _wants_channels_last(x))
    if _needs_mask(relu, residual):
        mask = torch.empty_strided(y.shape, y.stride(), dtype=torch.uint8, device=y.device)
    else:
        mask = torch.empty(0, dtype=torch.uint8, device=y.device)
    return y, mask


@_lora_conv2d_op.register_fake
def _(x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale, input_precision):
    return _fake_outputs(x, weight, relu, residual)


@torch.library.custom_op("lorun_fast::conv2d_merged", mutates_args=())
def _conv2d_merged_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], relu: bool, out_scale: float,
                      input_precision: str) -> torch.Tensor:
    """Forward only: ``out_scale·act(conv(x, W) + bias) + residual`` with an already merged W (no autograd)."""
    y, _ = conv2d_forward(x, weight, bias, residual, relu, out_scale, input_precision, write_mask=False)
    return y


@_conv2d_merged_op.register_fake
def _(x, weight, bias, residual, relu, out_scale, input_precision):
    nb, _, h, w = x.shape
    return _empty_image((nb, weight.shape[0], h, w), x, _wants_channels_last(x))


@torch.library.custom_op("lorun_fast::lora_conv2d_backward", mutates_args=())
def _lora_conv2d_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, saved: Optional[torch.Tensor], scaling: float, relu: bool,
                             mask_from_output: bool, out_scale: float, input_precision: str, version: str,
                             need_x: bool, need_w: bool, need_a: bool, need_b: bool, need_bias: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``lorun_fast::lora_conv2d``: ``(dx, dW, dA, dB, dbias)``, empty where not needed; ``version``
    is the design ("v1" / "v2") that ran the forward."""
    return lora_conv2d_backward(grad_y, x, weight, lora_a, lora_b, saved, scaling, relu, mask_from_output,
                                out_scale, input_precision, need_x, need_w, need_a, need_b, need_bias, version)


@_lora_conv2d_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, saved, scaling, relu, mask_from_output, out_scale, input_precision,
      version, need_x, need_w, need_a, need_b, need_bias):
    dx = _empty_image(x.shape, x, _wants_channels_last(x)) if need_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_w else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_a else x.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_b else x.new_empty(0)
    dbias = weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0)
    return dx, dw, da, db, dbias


class FusedLoRAConv2dFunction(torch.autograd.Function):
    """Autograd of the fused LoRA convolution (also registered as ``lorun_fast::lora_conv2d``'s autograd).

    Inputs ``(x, W, A, B, bias, residual, s, relu, out_scale, input_precision)``, outputs ``(y, relu_mask)``:

        W_k  = W + s·B·A                           (A as r × Ci·kh·kw, B as Co × r)
        pre  = conv(x, W_k) + bias                 ('same' padding p = (k-1)/2, stride 1)
        y    = out_scale·relu(pre) + residual      (relu optional, residual optional)

    Backward, with ``G = ∂L/∂y``:

        dpre      = out_scale · G · [pre > 0]        (mask: sign of y when there is no residual — exact unless
                                                      out_scale·pre underflows to 0 in y's dtype — else the uint8
                                                      mask saved by the forward; no mask without relu)
        dbias     = Σ_{n,h,w} dpre
        dresidual = G
        dW_eff    = Σ_{n,h,w} dpre[n,:,h,w] ⊗ im2col(x)[n,:,h,w]     (Co × Ci·kh·kw, float32, deterministic)
        dW        = dW_eff                                          (only if W requires grad)
        dA        = s · Bᵀ · dW_eff                                 (r × Ci·kh·kw)
        dB        = s · dW_eff · Aᵀ                                 (Co × r)
        dx        = conv_transpose(dpre, W_k) = conv(dpre, flip_{h,w}(W_k) with in/out channels swapped)

    Saved: x, W, A, B and y (or the uint8 mask); nothing of rank r. ``s``, ``out_scale`` are constants (no grad).

    Two designs compute this (``settings.conv_kernel()`` at the forward, remembered for the backward). v1: W_k is
    formed tile by tile inside every forward program; ``dpre`` is written by torch; dW_eff is reduced one tap per
    program. v2: W_k is formed once per launch (torch, fp32, rounded once); the forward and dx kernels read a haloed
    x tile once per Ci chunk; ``dpre`` is formed inside the dx and dW kernels as they load G; dW_eff (and dbias)
    reduce all taps in one program.
    """

    @staticmethod
    def forward(x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale, input_precision):
        return lora_conv2d_forward(x, weight, lora_a, lora_b, scaling, bias, residual, relu, out_scale,
                                   input_precision, write_mask=_needs_mask(relu, residual))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale, input_precision = inputs
        y, mask = output
        ctx.mask_from_output = not _needs_mask(relu, residual)
        saved = (y if ctx.mask_from_output else mask) if relu else None
        ctx.save_for_backward(x, weight, lora_a, lora_b, saved)
        ctx.scaling, ctx.relu, ctx.out_scale, ctx.input_precision = scaling, relu, out_scale, input_precision
        ctx.version = conv_kernel()
        if hasattr(ctx, "mark_non_differentiable"):
            ctx.mark_non_differentiable(mask)

    @staticmethod
    def backward(ctx, grad_y, grad_mask=None):
        x, weight, lora_a, lora_b, saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, da, db, dbias = torch.ops.lorun_fast.lora_conv2d_backward(
            grad_y, x, weight, lora_a, lora_b, saved, ctx.scaling, ctx.relu, ctx.mask_from_output, ctx.out_scale,
            ctx.input_precision, ctx.version, need[0], need[1], need[2], need[3], need[4])
        return (dx if need[0] else None, dw if need[1] else None, da if need[2] else None, db if need[3] else None,
                dbias if need[4] else None, grad_y if need[5] else None, None, None, None, None)


torch.library.register_autograd("lorun_fast::lora_conv2d", FusedLoRAConv2dFunction.backward,
                                setup_context=FusedLoRAConv2dFunction.setup_context)


@torch.library.custom_op("lorun_fast::lora_conv2d_indexed", mutates_args=())
def _lora_conv2d_indexed_op(x: torch.Tensor, weight: torch.Tensor, lora_a: List[torch.Tensor],
                            lora_b: List[torch.Tensor], index: torch.Tensor, bias: Optional[torch.Tensor],
                            residual: Optional[torch.Tensor], scaling: float, relu: bool, out_scale: float,
                            input_precision: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the per-sample-adapter fused LoRA conv: ``(y, relu_mask)`` as ``lorun_fast::lora_conv2d``.
    The range of ``index`` is checked here, in the op's body, which runs eagerly also under torch.compile."""
    check_index_range(index, len(lora_a), "adapters")
    return lora_conv2d_indexed_forward(x, weight, lora_a, lora_b, scaling, index, bias, residual, relu, out_scale,
                                       input_precision, write_mask=_needs_mask(relu, residual))


@_lora_conv2d_indexed_op.register_fake
def _(x, weight, lora_a, lora_b, index, bias, residual, scaling, relu, out_scale, input_precision):
    return _fake_outputs(x, weight, relu, residual)


@torch.library.custom_op("lorun_fast::lora_conv2d_indexed_backward", mutates_args=())
def _lora_conv2d_indexed_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     lora_a: List[torch.Tensor], lora_b: List[torch.Tensor], index: torch.Tensor,
                                     saved: Optional[torch.Tensor], scaling: float, relu: bool,
                                     mask_from_output: bool, out_scale: float, input_precision: str, need_x: bool,
                                     need_w: bool, need_a: bool, need_b: bool, need_bias: bool
                                     ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor],
                                                torch.Tensor]:
    """Backward of ``lorun_fast::lora_conv2d_indexed``: ``(dx, dW, [dA_u], [dB_u], dbias)``, empty where not
    needed."""
    return lora_conv2d_indexed_backward(grad_y, x, weight, lora_a, lora_b, index, saved, scaling, relu,
                                        mask_from_output, out_scale, input_precision, need_x, need_w, need_a, need_b,
                                        need_bias)


@_lora_conv2d_indexed_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, index, saved, scaling, relu, mask_from_output, out_scale, input_precision,
      need_x, need_w, need_a, need_b, need_bias):
    dx = _empty_image(x.shape, x, _wants_channels_last(x)) if need_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_w else x.new_empty(0)
    da = [a.new_empty(a.shape) if need_a else x.new_empty(0) for a in lora_a]
    db = [b.new_empty(b.shape) if need_b else x.new_empty(0) for b in lora_b]
    dbias = weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0)
    return dx, dw, da, db, dbias


def _lora_conv2d_indexed_setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, index, bias, residual, scaling, relu, out_scale, input_precision = inputs
    y, mask = output
    ctx.mask_from_output = not _needs_mask(relu, residual)
    saved = (y if ctx.mask_from_output else mask) if relu else None
    ctx.n_adapters = len(lora_a)
    ctx.save_for_backward(x, weight, index, saved, *lora_a, *lora_b)
    ctx.scaling, ctx.relu, ctx.out_scale, ctx.input_precision = scaling, relu, out_scale, input_precision
    if hasattr(ctx, "mark_non_differentiable"):
        ctx.mark_non_differentiable(mask)


def _lora_conv2d_indexed_backward(ctx, grad_y, grad_mask=None):
    """Autograd of ``lorun_fast::lora_conv2d_indexed`` (inputs ``(x, W, [A_u], [B_u], index, bias, residual, s,
    relu, out_scale, input_precision)``, outputs ``(y, relu_mask)``). Per sample n, with ``u = index[n]``:

        W_u  = W + s·B_u·A_u
        pre  = conv(x, W_u) + bias ;  y = out_scale·relu(pre) + residual     (as FusedLoRAConv2dFunction)

    Backward, with ``G = ∂L/∂y`` and ``S_u = {n : index[n] = u}``:

        dpre        = out_scale · G · [pre > 0]                     (the mask as in FusedLoRAConv2dFunction)
        dbias       = Σ_{n,h,w} dpre ;  dresidual = G
        dW_eff_u    = Σ_{n∈S_u, h,w} dpre[n,:,h,w] ⊗ im2col(x)[n,:,h,w]    (0 when S_u is empty)
        dW          = Σ_u dW_eff_u
        dA_u        = s · B_uᵀ · dW_eff_u ;   dB_u = s · dW_eff_u · A_uᵀ
        dx[n]       = conv(dpre[n], flip_{h,w}(W_u) with in/out channels swapped)

    ``index`` is not differentiable; ``s``, ``out_scale`` are constants. Always the v2 design.
    """
    x, weight, index, saved, *adapters = ctx.saved_tensors
    lora_a, lora_b = adapters[:ctx.n_adapters], adapters[ctx.n_adapters:]
    # A list input has a list of flags (one per tensor).
    need = ctx.needs_input_grad
    need_a, need_b = [bool(n) for n in need[2]], [bool(n) for n in need[3]]
    dx, dw, da, db, dbias = torch.ops.lorun_fast.lora_conv2d_indexed_backward(
        grad_y, x, weight, lora_a, lora_b, index, saved, ctx.scaling, ctx.relu, ctx.mask_from_output, ctx.out_scale,
        ctx.input_precision, need[0], need[1], any(need_a), any(need_b), need[5])
    return (dx if need[0] else None, dw if need[1] else None,
            [d if n else None for d, n in zip(da, need_a)], [d if n else None for d, n in zip(db, need_b)],
            None, dbias if need[5] else None, grad_y if need[6] else None, None, None, None, None)


torch.library.register_autograd("lorun_fast::lora_conv2d_indexed", _lora_conv2d_indexed_backward,
                                setup_context=_lora_conv2d_indexed_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------

def _check_float_tensor(name, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_matches_x(name, t, x) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: on device {t.device}, but x is on {x.device}; all tensors must share a device")


def _check_inputs(x, weight, lora_a, lora_b, scaling, bias, padding, residual, out_scale, input_precision,
                  has_lora=True):
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias, "residual": residual}
    if not has_lora:
        del tensors["lora_a"], tensors["lora_b"]
    for name, t in tensors.items():
        if t is None and name in ("bias", "residual"):
            continue
        _check_float_tensor(name, t)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    for name, t in tensors.items():
        if t is not None:
            _check_matches_x(name, t, x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D (Co, Ci, kh, kw) tensor, got shape {tuple(weight.shape)}")
    co, ci, kh, kw = weight.shape
    if (kh, kw) not in ((1, 1), (3, 3)):
        raise ValueError(f"weight: kernel must be 1×1 or 3×3, got {kh}×{kw}")
    if co == 0 or ci == 0:
        raise ValueError(f"weight: needs at least one input and one output channel, got shape {tuple(weight.shape)}")
    if x.shape[1] != ci:
        raise ValueError(f"x: expected {ci} channels (weight is {tuple(weight.shape)}), got shape {tuple(x.shape)}")
    if has_lora:
        _check_lora(weight, lora_a, lora_b)
    _check_epilogue_and_options(x, weight, scaling, bias, padding, residual, out_scale, input_precision)


def _check_lora(weight, lora_a, lora_b, a_name="lora_a", b_name="lora_b"):
    co, ci, kh, kw = weight.shape
    if lora_a.dim() != 4 or lora_a.shape[1:] != weight.shape[1:] or lora_a.shape[0] < 1:
        raise ValueError(f"{a_name}: expected shape (r, {ci}, {kh}, {kw}) with r ≥ 1, got {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if lora_b.dim() == 4 and lora_b.shape[2:] == (1, 1):
        b2 = lora_b.shape[:2]
    elif lora_b.dim() == 2:
        b2 = lora_b.shape
    else:
        raise ValueError(f"{b_name}: expected shape ({co}, r) or ({co}, r, 1, 1), got {tuple(lora_b.shape)}")
    if b2[0] != co:
        raise ValueError(f"{b_name}: expected {co} output channels (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(lora_b.shape)}")
    if b2[1] != rank:
        raise ValueError(f"{b_name}: rank {b2[1]} does not match {a_name}'s rank {rank} "
                         f"({a_name} {tuple(lora_a.shape)}, {b_name} {tuple(lora_b.shape)})")


def _check_adapters(x, weight, lora_a, lora_b):
    """The U adapters of ``fused_lora_conv2d_indexed``: two equally long sequences of tensors, each pair checked as
    ``fused_lora_conv2d`` checks its one (names ``lora_a[u]``, ``lora_b[u]``)."""
    for name, seq in (("lora_a", lora_a), ("lora_b", lora_b)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}: expected a list or tuple of U tensors (one per adapter), got "
                            f"{type(seq).__name__}")
        if len(seq) == 0:
            raise ValueError(f"{name}: expected at least one adapter, got an empty {type(seq).__name__}")
    if len(lora_a) != len(lora_b):
        raise ValueError(f"lora_b: expected one B per A ({len(lora_a)} adapters in lora_a), got {len(lora_b)}")
    for u, (a, b) in enumerate(zip(lora_a, lora_b)):
        for name, t in ((f"lora_a[{u}]", a), (f"lora_b[{u}]", b)):
            _check_float_tensor(name, t)
            _check_matches_x(name, t, x)
        _check_lora(weight, a, b, f"lora_a[{u}]", f"lora_b[{u}]")


def _check_epilogue_and_options(x, weight, scaling, bias, padding, residual, out_scale, input_precision):
    co, ci, kh, kw = weight.shape
    if bias is not None and tuple(bias.shape) != (co,):
        raise ValueError(f"bias: expected shape ({co},), got {tuple(bias.shape)}")
    nb, _, h, w = x.shape
    if residual is not None and tuple(residual.shape) != (nb, co, h, w):
        raise ValueError(f"residual: expected the output's shape {(nb, co, h, w)}, got {tuple(residual.shape)}")
    want_pad = (kh - 1) // 2
    pad = padding
    if isinstance(pad, str):
        if pad != "same":
            raise ValueError(f"padding: expected {want_pad} or 'same', got {padding!r}")
        pad = want_pad
    if isinstance(pad, (tuple, list)):
        if len(pad) != 2 or pad[0] != pad[1]:
            raise ValueError(f"padding: expected {want_pad} ('same' for a {kh}×{kw} kernel), got {padding!r}")
        pad = pad[0]
    if isinstance(pad, bool) or not isinstance(pad, int) or pad != want_pad:
        raise ValueError(f"padding: only 'same' padding is supported: expected {want_pad} for a {kh}×{kw} kernel, "
                         f"got {padding!r}")
    for name, v in (("scaling", scaling), ("out_scale", out_scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a Python float, got {type(v).__name__}")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name}: expected a finite number, got {v}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")


def fused_lora_conv2d(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, bias: Optional[torch.Tensor] = None, *, padding, relu: bool = False,
                      residual: Optional[torch.Tensor] = None, out_scale: float = 1.0,
                      input_precision: str = "tf32") -> torch.Tensor:
    """``out_scale·act(conv(x, W + s·B·A) + bias) + residual`` in one fused Triton kernel (autograd-aware).

    Args:
        x: (N, Ci, H, W), float32 / float16 / bfloat16, any strides (channels_last is the fast layout; the output
            has x's layout).
        weight: base weight (Co, Ci, k, k) with k = 1 or 3.
        lora_a: (r, Ci, k, k); lora_b: (Co, r) or peft's (Co, r, 1, 1).
        scaling: s (peft's alpha / r), a Python number.
        bias: optional (Co,).
        padding: must be 'same': 1 (or (1, 1) or "same") for 3×3, 0 for 1×1. Stride is 1.
        relu: apply ReLU after the bias.
        residual: optional (N, Co, H, W) tensor added last.
        out_scale: multiplies the activation, before the residual.
        input_precision: "ieee", "tf32" or "tf32x3" for float32 inputs (ignored for 16-bit inputs, which
            multiply in their own precision with float32 accumulation).

    All tensors share one dtype and device. Registered as ``torch.ops.lorun_fast.lora_conv2d`` (returns
    ``(y, relu_mask)``), so it works under autograd and ``torch.compile(fullgraph=True)``.
    """
    _check_inputs(x, weight, lora_a, lora_b, scaling, bias, padding, residual, out_scale, input_precision)
    y, _ = torch.ops.lorun_fast.lora_conv2d(x, weight, lora_a, lora_b, bias, residual, float(scaling), bool(relu),
                                           float(out_scale), input_precision)
    return y


def fused_lora_conv2d_indexed(x: torch.Tensor, weight: torch.Tensor, lora_a: Sequence[torch.Tensor],
                              lora_b: Sequence[torch.Tensor], scaling: float, index: torch.Tensor,
                              bias: Optional[torch.Tensor] = None, padding=1, relu: bool = False,
                              residual: Optional[torch.Tensor] = None, out_scale: float = 1.0,
                              input_precision: str = "tf32") -> torch.Tensor:
    """``fused_lora_conv2d`` with an adapter per sample: sample n computes
    ``out_scale·act(conv(x[n], W + s·B_u·A_u) + bias) + residual[n]`` with ``u = index[n]``, the whole batch in one
    kernel launch (autograd-aware).

    Args:
        x, weight, scaling, bias, relu, residual, out_scale, input_precision: as ``fused_lora_conv2d``.
        lora_a: a list or tuple of U tensors, ``A_u`` (r_u, Ci, k, k); the ranks r_u may differ.
        lora_b: a list or tuple of U tensors, ``B_u`` (Co, r_u, 1, 1) or (Co, r_u).
        index: int64 (N,) on x's device, values in [0, U): the adapter of each sample. Adapters that no sample
            uses get zero gradients. Checking its range reads its min and max back to the host.
        padding: must be 'same': 1 (or (1, 1) or "same") for 3×3, 0 for 1×1.

    Always the v2 design (``settings.conv_kernel()`` is not consulted: v1 has no indexed kernel): the U merged
    weights are formed once per launch (fp32, rounded once to the weight dtype) and stacked, and each program of
    the v2 forward kernel reads the one of its image; with every ``index[n] = u`` the result equals v2's
    ``fused_lora_conv2d`` with adapter u bit for bit. Backward: dx in one launch of the dx pass with the same index;
    dW_eff per used adapter on the samples that use it (``lora_conv2d_indexed_backward``). Registered as
    ``torch.ops.lorun_fast.lora_conv2d_indexed`` (returns ``(y, relu_mask)``), so it works under autograd and
    ``torch.compile(fullgraph=True)``.
    """
    _check_inputs(x, weight, None, None, scaling, bias, padding, residual, out_scale, input_precision,
                  has_lora=False)
    _check_adapters(x, weight, lora_a, lora_b)
    check_sample_index(index, x, "the adapters")
    y, _ = torch.ops.lorun_fast.lora_conv2d_indexed(x, weight, list(lora_a), list(lora_b), index, bias, residual,
                                                   float(scaling), bool(relu), float(out_scale), input_precision)
    return y


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, padding,
                 relu: bool = False, residual: Optional[torch.Tensor] = None, out_scale: float = 1.0,
                 input_precision: str = "tf32") -> torch.Tensor:
    """``out_scale·act(conv(x, W) + bias) + residual`` with an already merged weight, for inference: the forward
    kernel without the LoRA prologue (``FusedLoRunConv`` calls it with its cached ``merge_weight``). No autograd:
    nothing may require a gradient. Arguments as ``fused_lora_conv2d``; registered as
    ``torch.ops.lorun_fast.conv2d_merged``."""
    _check_inputs(x, weight, None, None, 1.0, bias, padding, residual, out_scale, input_precision, has_lora=False)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        raise RuntimeError("fused_conv2d: has no backward; use fused_lora_conv2d where a gradient is needed")
    return torch.ops.lorun_fast.conv2d_merged(x, weight, bias, residual, bool(relu), float(out_scale),
                                              input_precision)

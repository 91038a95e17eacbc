"""Fused block-CS gradient step ``z = x − ρ·Φᵀ(Φ x_b − y_b)`` per block, in Triton (docs/design.md, §3.1).

The operator is ``BlockCS`` (``lorun_fast.reference.operators``): x (N, C, H, W), any H, W ≥ b (b = 33), implicitly
zero-padded at the right and bottom to whole b×b blocks; y (N, C, Hb, Wb, m); Φ (m, n = b²). Blocks are read straight
from the image layout (no unfold/fold copies); the n tail (1089 → 1152) and the pixels outside the image are masked
(read as 0, never written). The GEMM "M" dimension is a tile of BLOCK_M blocks. Two exact algorithms:

- ``"two_gemm"``: ``r_b = x_b Φᵀ − y_b`` (K = n), then ``z_b = x_b − ρ·r_b Φ`` (K = m): 4·n·m FLOPs per block,
  as two plain tiled GEMM launches with r (fp32, m floats per block: 1.1 MB at 256², batch 16, m = 272) passing
  through memory, mostly L2. Holding r on chip instead makes it the second GEMM's A operand whole: every warp
  then needs its rows × all m columns in registers (136 per thread at 16 rows, m = 272), which spilled in
  almost every tile config at m = 272 and left only 64-row tiles, i.e. 16 programs at batch 16 (ptxas, sm_90;
  bench/compile_report.py). At small batches the first GEMM's pixel reduction is split into ranges whose
  partial sums the second kernel adds in a fixed order (``_cs_ksplit``): more programs, still deterministic.
- ``"one_gemm"``: ``z_b = x_b − ρ·([x_b, −y_b] @ [G; Φ])`` with the cached Gram matrix ``G = ΦᵀΦ`` (n × n):
  one GEMM with K = n + m per output tile, 2·n·(n + m) FLOPs per block, fully parallel over (blocks, n).

``"auto"`` picks ``two_gemm`` when m < n/2 (fewer FLOPs), else ``one_gemm``. The padded Φ, Φᵀ and G are cached
per Φ (keyed on data_ptr, version, device, dtype).

``gd_step_cs_indexed``: a Φ_g (m_g rows, which may differ) and a ρ per sample, g = index[n], the batch in one
launch per pass of the same kernels (``INDEXED``). Each image gets ⌈C·Hb·Wb / BLOCK_M⌉ block tiles of its own, so
that a program reads one Φ number and one ρ and its GEMM B operand is one matrix of a stack of the G Φ's (and G's),
each zero-padded to the largest m; the stacks are cached per list of Φ's (the same keys, per Φ). y has m_max =
max m_g entries per block: those past an image's m_g are masked out (never read), its r is 0 there, and the
two-GEMM path skips the measurement tiles past m_g. ``"auto"`` decides on m_max.

Backward (``GDStepCSFunction``): ``dx = G − ρ·AᵀA G``, ``dy = ρ·A G``, ``dρ = −⟨A G, A x − y⟩``, by the same kernels
on G (``gd_step_common``). Precision: float32 (dots in "ieee", "tf32" or "tf32x3"), bfloat16 and float16 inputs,
fp32 accumulation; the launch functions, checks and the NaN-poisoning test switch are ``gd_step_common``'s.

Why one module of ~1,100 lines: the single-Φ and the per-sample-Φ steps are the same three kernels (``INDEXED``
off or on) with one launcher and one set of checks; split, each half would import the other's kernels back.
"""
import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from lorun_fast.kernels.gd_step_common import (_INTERPRET, _args, _as_rho, _backward_fakes, _check_device,
                                               _check_fixed, _check_int, _check_runnable, _check_tensor, _check_x,
                                               _check_y, _empty, _finish_backward, _mark_residual, _nothing,
                                               _tuning)
from lorun_fast.kernels.mma import _mma
from lorun_fast.kernels.settings import (INPUT_PRECISIONS, check_index_range, check_sample_index, device_limits,
                                         dot_precision)

__all__ = ["gd_step_cs", "gd_step_cs_indexed", "GDStepCSFunction", "cs_forward", "cs_backward",
           "cs_indexed_forward", "cs_indexed_backward", "resolve_cs_algorithm", "clear_cache", "ALGORITHMS",
           "INPUT_PRECISIONS"]

ALGORITHMS = ("auto", "one_gemm", "two_gemm")


# --------------------------------------------------------------------------------------------------------------------
# Tuning configurations
# --------------------------------------------------------------------------------------------------------------------

def _csr_cfg(bm, bp, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _csz_cfg(bm, bn, bq, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_Q": bq}, num_warps=warps, num_stages=stages)


def _cs1_cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# In the interpreter (one config each, see ``_tuning``): BLOCK_P = 128 leaves a masked measurement tail for every test
# m but 128·k, and a batch of > 32 blocks exercises the block-tail masks. The quick entries come from the full lists,
# the smallest footprint last (the pruners' fallback). The two-GEMM kernels are plain tiled GEMMs (the residual goes
# through memory between them), so their footprints do not depend on m: every full entry compiles without spills in
# tf32 and bf16 (ptxas, sm_90 and sm_80; tiles under 64 rows take BLOCK_K = 32 because at 64 ptxas spills a few
# bytes in tf32 for some m, and 64-row tiles 8 warps because at 4 they run at 240–255 registers).
_CSR_CONFIGS = _tuning(
    interpret=[_csr_cfg(32, 128, 128, 4, 1)],
    quick=[_csr_cfg(64, 64, 64, 8, 3), _csr_cfg(16, 16, 32, 4, 3)],
    full=[
        _csr_cfg(64, 64, 64, 8, 3),
        _csr_cfg(64, 32, 64, 8, 3),
        _csr_cfg(32, 64, 32, 4, 3),
        _csr_cfg(32, 32, 32, 4, 3),
        _csr_cfg(32, 16, 32, 4, 3),
        _csr_cfg(16, 64, 32, 4, 3),
        _csr_cfg(16, 32, 32, 4, 3),
        _csr_cfg(16, 16, 32, 4, 3),
    ],
)
# The second kernel's shared memory grows with KSPLIT (the partial sums are pipelined tiles too); its pruner drops
# what does not fit (_cs_update_smem).
_CSZ_CONFIGS = _tuning(
    interpret=[_csz_cfg(32, 128, 64, 4, 1)],
    quick=[_csz_cfg(64, 128, 32, 8, 3), _csz_cfg(16, 32, 32, 4, 3)],
    full=[
        _csz_cfg(64, 128, 32, 8, 3),
        _csz_cfg(64, 64, 32, 8, 3),
        _csz_cfg(64, 128, 16, 8, 3),
        _csz_cfg(128, 64, 32, 8, 3),
        _csz_cfg(32, 128, 32, 8, 3),
        _csz_cfg(32, 64, 32, 8, 3),
        _csz_cfg(16, 128, 32, 4, 3),
        _csz_cfg(16, 32, 32, 4, 3),
    ],
)
# At most 32 accumulators per thread and BLOCK_K = 32 at BLOCK_M ≥ 32: the block-gather epilogue (x load, z store,
# masks) and the gathered x tiles need the rest of the registers (ptxas, sm_90: none of these spills in tf32 or
# bf16; a 128 × 64 tile at 8 warps did, in tf32).
_CS1_CONFIGS = _tuning(
    interpret=[_cs1_cfg(32, 128, 128, 4, 1)],
    quick=[_cs1_cfg(64, 128, 32, 8, 3), _cs1_cfg(16, 64, 32, 4, 2)],
    full=[
        _cs1_cfg(64, 64, 32, 4, 3),
        _cs1_cfg(64, 128, 32, 8, 3),
        _cs1_cfg(32, 128, 32, 4, 3),
        _cs1_cfg(32, 64, 32, 4, 3),
        _cs1_cfg(16, 128, 64, 4, 3),
        _cs1_cfg(16, 64, 32, 4, 2),
    ],
)


def _block_rows_max(nblk):
    # Tiles much taller than the number of blocks (of the batch, or of one image when each image has tiles of its
    # own: the launchers pass that as BPI) only compute masked rows.
    return max(16, triton.next_power_of_2(int(nblk)))


def _prune_csr(configs, named_args, **kwargs):
    a = _args(named_args, kwargs)
    m = int(a["M"])
    bm_max = _block_rows_max(a["BPI"])
    # The measurement tiles cover ⌈m / BLOCK_P⌉·BLOCK_P columns: keep the widths that waste at most 32 columns
    # beyond the 16-aligned minimum (m = 272: 16 and 32 wide, not 64 = 320 or 128 = 384).
    least = -(-m // 16) * 16
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bm_max
            and -(-m // c.kwargs["BLOCK_P"]) * c.kwargs["BLOCK_P"] <= least + 32]
    return kept or configs[-1:]


def _cs_update_smem(c, ksplit: int, esize: int, write_z: bool, capability) -> int:
    """Shared memory of ``_cs_update_kernel`` in bytes, as Triton allocates it (checked against every compiled
    config by bench/compile_report.py and its test): the K loop's loads are software-pipelined with num_stages − 1
    buffers each — KSPLIT fp32 partial-sum tiles (BLOCK_M × BLOCK_Q) and the Φ tile (BLOCK_Q × BLOCK_N) — and a
    wgmma B operand (sm_90, 64-row tiles) holds one buffer more. The epilogue needs no shared memory of its own.
    Exact with ``write_z`` on sm_90; without it only the per-block pass runs, unpipelined (inside a branch), and the
    figure is an upper bound (the actual need is a reduction scratch of a few KB)."""
    bm, bn, bq = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_Q"]
    bufs = max(1, c.num_stages - 1)
    wgmma = capability[0] == 9 and bm >= 64 and c.num_warps % 4 == 0
    # Before sm_90 some tiles (16-deep fp32 ones) stage the Φ tile once more for the mma.sync operand layout; counted
    # for all there, so the figure is an upper bound off sm_90.
    extra = 1 if wgmma or capability[0] < 9 else 0
    parts = bufs * ksplit * bm * bq * 4
    phi = (bufs + extra) * bq * bn * esize if write_z else 0
    return parts + phi


def _prune_csz(configs, named_args, **kwargs):
    a = _args(named_args, kwargs)
    bm_max = _block_rows_max(a["BPI"])
    capability, smem_limit = device_limits(a["x_ptr"].device)
    esize = a["phi_ptr"].element_size()
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bm_max
            and _cs_update_smem(c, a["KSPLIT"], esize, a["WRITE_Z"], capability) <= smem_limit]
    if not a["WRITE_Z"] and kept:
        # Only the residual pass over the measurements: the pixel tile is unused, one width is enough.
        kept = [c for c in kept if c.kwargs["BLOCK_N"] == kept[-1].kwargs["BLOCK_N"]]
    return kept or configs[-1:]


def _prune_cs1(configs, named_args, **kwargs):
    a = _args(named_args, kwargs)
    bm_max = _block_rows_max(a["BPI"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bm_max]
    return kept or configs[-1:]


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _cs_tile(pid, NBLK, BPI, M, index_ptr, ms_ptr, BLOCK_M: tl.constexpr, INDEXED: tl.constexpr):
    """The BLOCK_M blocks of program ``pid``: ``(block indices, their mask, image n, Φ number g, m_g)``.

    Without INDEXED the tiles run through the whole batch (tile i: blocks [i·BLOCK_M, (i+1)·BLOCK_M) of NBLK) and
    one Φ serves every block: n = g = 0, m_g = M. With INDEXED every image has ⌈BPI / BLOCK_M⌉ tiles of its own
    (a tile never straddles two images), so the program reads one Φ number ``g = index[n]`` and one
    ``m_g = ms[g]``: its GEMM B operand is that one Φ."""
    if INDEXED:
        tiles = (BPI + BLOCK_M - 1) // BLOCK_M
        img = pid // tiles
        local = (pid % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_b = img * BPI + local
        b_ok = local < BPI
        gi = tl.load(index_ptr + img)
        mg = tl.load(ms_ptr + gi)
    else:
        img = 0
        gi = 0
        mg = M
        offs_b = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        b_ok = offs_b < NBLK
    return offs_b, b_ok, img, gi, mg


@triton.jit
def _cs_blocks(offs_b, b_ok, H, W, HB, WB, BS: tl.constexpr):
    """Of the blocks ``offs_b`` (mask ``b_ok``, from ``_cs_tile``): int64 offset of each block's image plane, int32
    offset of its top-left pixel inside the plane, and how many of its rows / columns lie inside the image (0 for
    masked blocks, so that one comparison masks the image border, the n tail and the block tail)."""
    plane = offs_b // (HB * WB)
    rem = offs_b % (HB * WB)
    row0 = (rem // WB) * BS
    col0 = (rem % WB) * BS
    plane_off = plane.to(tl.int64) * H * W
    blk_off = row0 * W + col0
    rows_in = tl.where(b_ok, tl.minimum(H - row0, BS), 0)
    cols_in = tl.where(b_ok, tl.minimum(W - col0, BS), 0)
    return plane_off, blk_off, rows_in, cols_in


@triton.jit
def _cs_pixels(k, W, BS: tl.constexpr):
    """Block pixel indices k (row-major within the block) → (row in block, column in block, in-plane offset)."""
    ki = k // BS
    kj = k % BS
    return ki, kj, ki * W + kj


@triton.autotune(configs=_CSR_CONFIGS,
                 key=["NBLK", "BPI", "M", "PS", "KSPLIT", "HAS_Y", "INDEXED", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_csr})
@triton.jit
def _cs_residual_kernel(
    x_ptr, y_ptr, phit_ptr, part_ptr, index_ptr, ms_ptr,
    NBLK, BPI, H, W, HB, WB, M, PS,
    BS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, KSPLIT: tl.constexpr,
    HAS_Y: tl.constexpr, INDEXED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """First GEMM of the two-GEMM CS step: ``part[s] = x_b Φᵀ`` over the s-th of KSPLIT pixel ranges, minus y in
    range 0, so that ``r = A x − y = Σ_s part[s]`` (summed in order s = 0, 1, … by the consumer).

    Grid: (T, ⌈M / BLOCK_P⌉, KSPLIT) with T block tiles (``_cs_tile``: ⌈NBLK / BLOCK_M⌉, or N·⌈BPI / BLOCK_M⌉ with
    INDEXED). Program (i, j, s) owns tile i's blocks, measurements [j·BLOCK_P, (j+1)·BLOCK_P) and pixels
    [s·NP/KSPLIT, (s+1)·NP/KSPLIT) (block index = (plane·HB + bh)·WB + bw, plane = n·C + c). Every element of
    ``part`` (in-range blocks and measurements) is written by exactly one program, each a fixed-order K loop: no
    atomics, the result does not depend on scheduling. With INDEXED, measurements from m_g on are written as 0.

    Args:
        x_ptr: image (N·C planes of H × W), contiguous; pixels of a block beyond H or W read as zero.
        y_ptr: measurements (NBLK, M), contiguous (the (N, C, HB, WB, M) layout). Ignored unless ``HAS_Y``; with
            INDEXED only the first m_g of each block's M are read.
        phit_ptr: Φᵀ zero-padded to (NP, MP), contiguous, in the compute dtype (x's dtype); with INDEXED the
            G matrices Φ_gᵀ stacked (G, NP, MP), each zero beyond its m_g columns.
        part_ptr: fp32 (KSPLIT, NBLK, PS) with row stride PS ≥ M; with KSPLIT = 1 and PS = M this is r itself.
        index_ptr: int64 (N,): the Φ number g of each image, in [0, G). Read only if ``INDEXED``.
        ms_ptr: int32 (G,): m_g, the rows of each Φ_g (≤ M). Read only if ``INDEXED``.
        NBLK: number of blocks N·C·HB·WB; BPI: blocks per image C·HB·WB (the tiling unit with INDEXED);
        H, W: image size (H·W < 2³¹: in-plane offsets are int32);
        HB, WB: blocks per column / row; M: measurements per block (rows of Φ; with INDEXED the largest m_g).
        PS: row stride of ``part`` (a multiple of 16 for scratch buffers: aligned rows let the consumer's KSPLIT
            loads per element vectorise instead of each needing its own address registers).
        BS: block side (33); the block's pixel k is (k // BS, k % BS), row-major as in the reference.
        NP: n = BS² rounded up to a multiple of 128; MP: m rounded up to a multiple of 128 (Φᵀ's padded width).
        KSPLIT: pixel ranges the reduction is split into (divides NP / 128, so every range is whole 128-chunks).
        HAS_Y: subtract y (false for the backward, which applies the step to G with y = 0).
        INDEXED: a Φ per image (``index_ptr``, ``ms_ptr``); otherwise one Φ for the whole batch.
        INPUT_PRECISION: tl.dot precision for float32 operands ("ieee", "tf32", "tf32x3").
        UPCAST: multiply in float32 (interpreter + bfloat16 only, see ``_mma``).
        BLOCK_M: blocks per program; BLOCK_P: measurements per program; BLOCK_K: pixel chunk of the K loop.
    """
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b, b_ok, img, gi, mg = _cs_tile(pid, NBLK, BPI, M, index_ptr, ms_ptr, BLOCK_M, INDEXED)
    plane_off, blk_off, rows_in, cols_in = _cs_blocks(offs_b, b_ok, H, W, HB, WB, BS)
    # Addresses: an int64 plane base per block (1-D) plus int32 in-plane offsets (2-D).
    x_blk = x_ptr + plane_off
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < M
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_s * (NP // KSPLIT)
    k_hi = k_lo + NP // KSPLIT
    if INDEXED:
        phit_ptr += gi * (NP * MP)
        # A measurement tile wholly at or past m_g meets only Φ_gᵀ's zero columns: its product is 0, skip it.
        k_hi = tl.where(pid_p * BLOCK_P < mg, k_hi, k_lo)

    acc = tl.full((BLOCK_M, BLOCK_P), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        ki, kj, k_off = _cs_pixels(k, W, BS)
        # Rows beyond the block (k ≥ BS², the pad to NP) or the image, columns beyond the image: zero padding.
        ok = (ki[None, :] < rows_in[:, None]) & (kj[None, :] < cols_in[:, None])
        xt = tl.load(x_blk[:, None] + (blk_off[:, None] + k_off[None, :]), mask=ok, other=0.0)
        # Φᵀ is padded to MP ≥ ⌈M / BLOCK_P⌉·BLOCK_P columns: no mask.
        pt = tl.load(phit_ptr + k[:, None] * MP + offs_p[None, :])
        acc = _mma(xt, pt, acc, INPUT_PRECISION, UPCAST)

    m_row = offs_b.to(tl.int64) * M
    out_ok = b_ok[:, None] & p_ok[None, :]
    if HAS_Y:
        # y goes into range 0 only. A vector condition, not a scalar: the interpreter turns `bool tensor & bool
        # scalar` into int32, which it then rejects as a mask.
        first = (offs_p * 0 + pid_s) == 0
        y_ok = out_ok & first[None, :]
        if INDEXED:
            # What lies past m_g in y is not this image's measurement (it may hold anything, NaN included).
            y_ok = y_ok & (offs_p < mg)[None, :]
        yv = tl.load(y_ptr + m_row[:, None] + offs_p[None, :], mask=y_ok, other=0.0)
        acc = acc - yv.to(tl.float32)
    part_row = (pid_s * NBLK + offs_b).to(tl.int64) * PS
    tl.store(part_ptr + part_row[:, None] + offs_p[None, :], acc, mask=out_ok)


@triton.autotune(configs=_CSZ_CONFIGS,
                 key=["NBLK", "BPI", "M", "PS", "KSPLIT", "WRITE_Z", "WRITE_R", "PARTIAL", "INDEXED",
                      "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_csz})
@triton.jit
def _cs_update_kernel(
    x_ptr, part_ptr, phi_ptr, rho_ptr, z_ptr, r_ptr, rs_ptr, dot_ptr, index_ptr, ms_ptr,
    NBLK, BPI, H, W, HB, WB, M, PS, RHO_STRIDE,
    BS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, KSPLIT: tl.constexpr,
    WRITE_Z: tl.constexpr, WRITE_R: tl.constexpr, PARTIAL: tl.constexpr, INDEXED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Second GEMM of the two-GEMM CS step: ``z_b = x_b − ρ·r Φ`` with ``r = Σ_s part[s]`` (s in order).

    Grid: (T, NP / BLOCK_N if WRITE_Z else 1), T block tiles as in ``_cs_residual_kernel``. Program (i, j) owns tile
    i's blocks and block pixels [j·BLOCK_N, (j+1)·BLOCK_N); its K loop walks the measurements (the first m_g with
    INDEXED: Φ_g is zero beyond) in BLOCK_Q chunks, forming each chunk of r from the partial sums (fixed order) as
    the GEMM's A operand, so r never has to fit in registers whole. Programs with j = 0 first make a separate pass
    over r that writes it (``WRITE_R``) and the per-block ``Σ_p r·rs`` (``PARTIAL``): kept out of the GEMM loop,
    those stores and loads cost it no registers.

    Args:
        x_ptr: image, contiguous like x of ``_cs_residual_kernel``. Read only if ``WRITE_Z``.
        part_ptr: fp32 (KSPLIT, NBLK, PS) with row stride PS, from ``_cs_residual_kernel``.
        phi_ptr: Φ zero-padded to (MP, NP), contiguous, in the compute dtype (MP ≥ ⌈M / BLOCK_Q⌉·BLOCK_Q); with
            INDEXED the G matrices Φ_g stacked (G, MP, NP), each zero beyond its m_g rows.
        rho_ptr: the step ρ, one element of any float dtype (read as fp32; a pointer, so no host sync); with
            INDEXED image n's step is ``rho_ptr[n·RHO_STRIDE]``.
        z_ptr: output image, contiguous like x; only pixels inside the image are written. Ignored unless
            ``WRITE_Z``.
        r_ptr: fp32 (NBLK, M) contiguous: r. Written only if ``WRITE_R``.
        rs_ptr: fp32 (NBLK, M) contiguous: a saved residual. Read only if ``PARTIAL``.
        dot_ptr: fp32 (NBLK,): ``dot[b] = Σ_p r[b, p]·rs[b, p]``. Written only if ``PARTIAL``.
        index_ptr, ms_ptr: as in ``_cs_residual_kernel`` (read only if ``INDEXED``).
        NBLK, BPI, H, W, HB, WB, M, PS, BS, NP, MP: as in ``_cs_residual_kernel``; KSPLIT: number of partial sums.
        RHO_STRIDE: element stride of the per-image steps (0: one ρ for all). Used only if ``INDEXED``.
        WRITE_Z, WRITE_R, PARTIAL: which outputs to produce.
        INDEXED: a Φ and a ρ per image; otherwise one of each for the whole batch.
        INPUT_PRECISION, UPCAST: as in ``_mma``.
        BLOCK_M: blocks per program; BLOCK_N: block pixels per program; BLOCK_Q: measurement chunk of the K loop.
    """
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b, b_ok, img, gi, mg = _cs_tile(pid, NBLK, BPI, M, index_ptr, ms_ptr, BLOCK_M, INDEXED)
    plane_off, blk_off, rows_in, cols_in = _cs_blocks(offs_b, b_ok, H, W, HB, WB, BS)
    offs_q = tl.arange(0, BLOCK_Q)

    if WRITE_R or PARTIAL:
        if pid_n == 0:
            m_row = offs_b.to(tl.int64) * M
            dot = tl.full((BLOCK_M,), 0.0, tl.float32)
            for q0 in range(0, M, BLOCK_Q):
                q = q0 + offs_q
                q_ok = b_ok[:, None] & (q < M)[None, :]
                rq = tl.full((BLOCK_M, BLOCK_Q), 0.0, tl.float32)
                for s in tl.static_range(KSPLIT):
                    p_row = (s * NBLK + offs_b).to(tl.int64) * PS
                    rq += tl.load(part_ptr + p_row[:, None] + q[None, :], mask=q_ok, other=0.0)
                if WRITE_R:
                    tl.store(r_ptr + m_row[:, None] + q[None, :], rq, mask=q_ok)
                if PARTIAL:
                    rs = tl.load(rs_ptr + m_row[:, None] + q[None, :], mask=q_ok, other=0.0)
                    dot += tl.sum(rq * rs, axis=1)
            if PARTIAL:
                tl.store(dot_ptr + offs_b, dot, mask=b_ok)

    if WRITE_Z:
        if INDEXED:
            phi_ptr += gi * (MP * NP)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        # Up to m_g (= M without INDEXED): past it r and Φ_g's rows are zero.
        for q0 in range(0, mg, BLOCK_Q):
            q = q0 + offs_q
            q_ok = b_ok[:, None] & (q < M)[None, :]
            rq = tl.full((BLOCK_M, BLOCK_Q), 0.0, tl.float32)
            for s in tl.static_range(KSPLIT):
                p_row = (s * NBLK + offs_b).to(tl.int64) * PS
                rq += tl.load(part_ptr + p_row[:, None] + q[None, :], mask=q_ok, other=0.0)
            ph = tl.load(phi_ptr + q[:, None] * NP + n[None, :])
            acc = _mma(rq.to(phi_ptr.dtype.element_ty), ph, acc, INPUT_PRECISION, UPCAST)
        if INDEXED:
            rho = tl.load(rho_ptr + img * RHO_STRIDE).to(tl.float32)
        else:
            rho = tl.load(rho_ptr).to(tl.float32)
        ni, nj, n_off = _cs_pixels(n, W, BS)
        ok = (ni[None, :] < rows_in[:, None]) & (nj[None, :] < cols_in[:, None])
        off = blk_off[:, None] + n_off[None, :]
        xt = tl.load((x_ptr + plane_off)[:, None] + off, mask=ok, other=0.0)
        z = xt.to(tl.float32) - rho * acc
        tl.store((z_ptr + plane_off)[:, None] + off, z.to(z_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CS1_CONFIGS, key=["NBLK", "BPI", "M", "HAS_Y", "INDEXED", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_cs1})
@triton.jit
def _cs_one_gemm_kernel(
    x_ptr, y_ptr, gram_ptr, nphi_ptr, rho_ptr, z_ptr, index_ptr, ms_ptr,
    NBLK, BPI, H, W, HB, WB, M, RHO_STRIDE,
    BS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
    HAS_Y: tl.constexpr, INDEXED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Block-CS GD step with the Gram matrix: ``z_b = x_b − ρ·(x_b G + y_b (−Φ))``, one GEMM with K = n + m.

    Grid: (T, NP / BLOCK_N), T block tiles as in ``_cs_residual_kernel``. Program (i, j) computes the
    BLOCK_M × BLOCK_N tile of z for tile i's blocks and block pixels [j·BLOCK_N, (j+1)·BLOCK_N).

    Args:
        x_ptr: image (N·C planes of H × W), contiguous; pixels beyond the image read as zero.
        y_ptr: measurements (NBLK, M), contiguous. Ignored unless ``HAS_Y``; with INDEXED only the first m_g of
            each block's M are read.
        gram_ptr: G = ΦᵀΦ zero-padded to (NP, NP), contiguous, in the compute dtype; with INDEXED the G_g = Φ_gᵀΦ_g
            stacked (G, NP, NP).
        nphi_ptr: −Φ zero-padded to (MP ≥ M, NP), contiguous, in the compute dtype (negated once in torch:
            exact, and the interpreter cannot negate bfloat16 tiles, whose raw bits it operates on); with INDEXED
            the −Φ_g stacked (G, MP, NP).
        rho_ptr: the step ρ, one element (read as fp32); with INDEXED image n's is ``rho_ptr[n·RHO_STRIDE]``.
        z_ptr: output image, contiguous like x; only pixels inside the image are written.
        index_ptr, ms_ptr: as in ``_cs_residual_kernel`` (read only if ``INDEXED``).
        NBLK, BPI, H, W, HB, WB, M: as in ``_cs_residual_kernel``; RHO_STRIDE: as in ``_cs_update_kernel``.
        BS: block side; NP: padded n (a multiple of 128, so of BLOCK_N and BLOCK_K); MP: padded M (the stride of
            the stacked −Φ_g).
        HAS_Y: include the ``− y_b Φ`` term (false in the backward).
        INDEXED: a Φ and a ρ per image; otherwise one of each for the whole batch.
        INPUT_PRECISION, UPCAST: as in ``_mma``.
        BLOCK_M, BLOCK_N, BLOCK_K: blocks per tile, output pixels per tile, reduction chunk.
    """
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b, b_ok, img, gi, mg = _cs_tile(pid, NBLK, BPI, M, index_ptr, ms_ptr, BLOCK_M, INDEXED)
    plane_off, blk_off, rows_in, cols_in = _cs_blocks(offs_b, b_ok, H, W, HB, WB, BS)
    x_blk = x_ptr + plane_off
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INDEXED:
        gram_ptr += gi * (NP * NP)
        nphi_ptr += gi * (MP * NP)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, NP, BLOCK_K):
        k = k0 + offs_k
        ki, kj, k_off = _cs_pixels(k, W, BS)
        ok = (ki[None, :] < rows_in[:, None]) & (kj[None, :] < cols_in[:, None])
        xt = tl.load(x_blk[:, None] + (blk_off[:, None] + k_off[None, :]), mask=ok, other=0.0)
        g = tl.load(gram_ptr + k[:, None] * NP + n[None, :])
        acc = _mma(xt, g, acc, INPUT_PRECISION, UPCAST)
    if HAS_Y:
        m_row = offs_b.to(tl.int64) * M
        # The first m_g measurements (= M without INDEXED): what lies past them in y is not this image's.
        for p0 in range(0, mg, BLOCK_K):
            p = p0 + offs_k
            p_ok = p < mg
            yt = tl.load(y_ptr + m_row[:, None] + p[None, :], mask=b_ok[:, None] & p_ok[None, :], other=0.0)
            ph = tl.load(nphi_ptr + p[:, None] * NP + n[None, :], mask=p_ok[:, None], other=0.0)
            acc = _mma(yt, ph, acc, INPUT_PRECISION, UPCAST)

    if INDEXED:
        rho = tl.load(rho_ptr + img * RHO_STRIDE).to(tl.float32)
    else:
        rho = tl.load(rho_ptr).to(tl.float32)
    ni, nj, n_off = _cs_pixels(n, W, BS)
    ok = (ni[None, :] < rows_in[:, None]) & (nj[None, :] < cols_in[:, None])
    off = blk_off[:, None] + n_off[None, :]
    xt = tl.load(x_blk[:, None] + off, mask=ok, other=0.0)
    z = xt.to(tl.float32) - rho * acc
    tl.store((z_ptr + plane_off)[:, None] + off, z.to(z_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------------------
# Launchers (no autograd, no validation)
# --------------------------------------------------------------------------------------------------------------------

def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


class _CSPrepared:
    """Φ in the compute dtype, zero-padded, in the arrangements the kernels read; G = ΦᵀΦ when asked for."""

    def __init__(self, phi: torch.Tensor, dtype: torch.dtype, block_size: int):
        m, n = phi.shape
        self.m, self.n, self.block_size = m, n, block_size
        self.np_ = triton.cdiv(n, 128) * 128
        # Padded to whole 128s in both directions, so that no tile width of the kernels needs a mask on Φ.
        self.mp = triton.cdiv(m, 128) * 128
        phi_c = phi.detach().to(dtype)  # rounded to x's dtype first, as the reference's phi.to(x.dtype)
        self.phi_c = phi_c
        self.dtype = dtype
        pad = torch.zeros(self.mp, self.np_, dtype=dtype, device=phi.device)
        pad[:m, :n] = phi_c
        self.phi = pad
        self.phit = pad.t().contiguous()
        self.gram = None
        self.neg_phi = None

    def gram_matrix(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(G, −Φ), padded, for the one-GEMM kernel."""
        if self.gram is None:
            # Formed in float64 from the rounded Φ, rounded once to the compute dtype.
            p = self.phi_c.double()
            g = torch.zeros(self.np_, self.np_, dtype=self.dtype, device=p.device)
            g[:self.n, :self.n] = (p.t() @ p).to(self.dtype)
            self.gram = g
            self.neg_phi = -self.phi
        return self.gram, self.neg_phi


class _CSStacked:
    """The G matrices Φ_g of an indexed batch in the compute dtype, each zero-padded to (MP, NP) (MP from the
    largest m_g: rows past m_g are zero, so they add nothing to a product) and stacked in the arrangements the
    kernels read, with m_g per Φ; the stacked G_g = Φ_gᵀΦ_g when asked for. The attributes the launcher shares with
    ``_CSPrepared`` (m = the largest m_g, n, np_, mp, block_size, phi, phit) mean the same for the stack."""

    def __init__(self, phis, dtype: torch.dtype, block_size: int):
        ms = [int(p.shape[0]) for p in phis]
        n = int(phis[0].shape[1])
        device = phis[0].device
        self.m, self.n, self.block_size, self.dtype = max(ms), n, block_size, dtype
        self.np_ = triton.cdiv(n, 128) * 128
        self.mp = triton.cdiv(self.m, 128) * 128
        # Rounded to x's dtype first, as the reference's phi.to(x.dtype), and exactly as _CSPrepared does.
        self.phi_c = [p.detach().to(dtype) for p in phis]
        pad = torch.zeros(len(phis), self.mp, self.np_, dtype=dtype, device=device)
        for g, phi_c in enumerate(self.phi_c):
            pad[g, :ms[g], :n] = phi_c
        self.phi = pad
        self.phit = pad.transpose(1, 2).contiguous()
        self.ms = torch.tensor(ms, dtype=torch.int32, device=device)
        self.gram = None
        self.neg_phi = None

    def gram_matrix(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(G_g, −Φ_g) stacked and padded, for the one-GEMM kernel."""
        if self.gram is None:
            g = torch.zeros(len(self.phi_c), self.np_, self.np_, dtype=self.dtype, device=self.phi.device)
            for i, phi_c in enumerate(self.phi_c):
                # As _CSPrepared: formed in float64 from the rounded Φ_g, rounded once to the compute dtype.
                p = phi_c.double()
                g[i, :self.n, :self.n] = (p.t() @ p).to(self.dtype)
            self.gram = g
            self.neg_phi = -self.phi
        return self.gram, self.neg_phi


_CS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CS_CACHE_SIZE = 8
# Stacks are G times the size of one entry: fewer of them.
_CS_STACK_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CS_STACK_CACHE_SIZE = 4


def clear_cache() -> None:
    """Forget every cached padded Φ / Gram matrix (single and stacked)."""
    _CS_CACHE.clear()
    _CS_STACK_CACHE.clear()


def _phi_key(phi: torch.Tensor) -> tuple:
    """What identifies one Φ's values for the caches: data_ptr, version counter, device, dtype, shape, strides.
    Raises RuntimeError for an inference tensor (it has no version counter: not cached)."""
    return phi.data_ptr(), phi._version, str(phi.device), phi.dtype, tuple(phi.shape), tuple(phi.stride())


def _lru_cached(cache: OrderedDict, size: int, key: tuple, sources, build):
    """``cache``'s entry at ``key`` while every tensor in ``sources`` it was built from is alive (a freed tensor's
    address may be reused by another), else ``build()``, kept as the newest of at most ``size`` entries."""
    hit = cache.get(key)
    if hit is not None and all(ref() is not None for ref in hit[0]):
        cache.move_to_end(key)
        return hit[1]
    value = build()
    try:
        refs = tuple(weakref.ref(t) for t in sources)
    except TypeError:
        return value
    cache[key] = (refs, value)
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def _cs_prepared(phi: torch.Tensor, dtype: torch.dtype, block_size: int) -> _CSPrepared:
    """Cached per Φ (``_phi_key``) and compute dtype, while that Φ is alive."""
    try:
        key = (*_phi_key(phi), dtype, block_size)
    except RuntimeError:  # inference tensors have no version counter: do not cache them
        return _CSPrepared(phi, dtype, block_size)
    return _lru_cached(_CS_CACHE, _CS_CACHE_SIZE, key, (phi,), lambda: _CSPrepared(phi, dtype, block_size))


def _cs_stacked(phis, dtype: torch.dtype, block_size: int) -> _CSStacked:
    """Cached per list of Φ's: the key is the sequence of their ``_phi_key``s (in order: the position is the Φ
    number g) with the compute dtype and block size, while every Φ it was built from is alive."""
    try:
        key = (tuple(_phi_key(p) for p in phis), dtype, block_size)
    except RuntimeError:  # an inference tensor among them has no version counter: do not cache
        return _CSStacked(phis, dtype, block_size)
    return _lru_cached(_CS_STACK_CACHE, _CS_STACK_CACHE_SIZE, key, phis,
                       lambda: _CSStacked(phis, dtype, block_size))
    _CS_STACK_CACHE[key] = (refs, prep)
    while len(_CS_STACK_CACHE) > _CS_STACK_CACHE_SIZE:
        _CS_STACK_CACHE.popitem(last=False)
    return prep


# Programs the first GEMM of the two-GEMM step should have at least (two per SM of a 132-SM H100 / H200); below
# that its K loop over the pixels is split into ranges whose partial sums the second kernel adds.
_CS_TARGET_PROGRAMS = 264


def _cs_ksplit(nblk: int, m: int, np_: int) -> int:
    """How many pixel ranges the first GEMM's reduction is split into: a function of the shape only, never of the
    tuned tile config, so the order in which r is summed (and so its bits) is fixed for a shape. Ranges are whole
    128-pixel chunks (KSPLIT divides NP / 128). 256² at batch 1 (64 blocks, m = 272): 9 ranges, 4·5·9 = 180
    programs at 16 × 64 tiles instead of 20; batch 16: 1 (no split, r written once)."""
    chunks = np_ // 128
    programs = triton.cdiv(nblk, 16) * triton.cdiv(m, 64)
    want = triton.cdiv(_CS_TARGET_PROGRAMS, programs)
    return max(d for d in range(1, chunks + 1) if chunks % d == 0 and d <= want)


def resolve_cs_algorithm(algorithm: str, m: int, n: int) -> str:
    """``"auto"`` → ``"two_gemm"`` when m < n/2 (4·n·m FLOPs per block against 2·n·(n + m)), else
    ``"one_gemm"``."""
    if algorithm != "auto":
        return algorithm
    return "two_gemm" if 2 * m < n else "one_gemm"


def _cs_geometry(x: torch.Tensor, block_size: int):
    nb, c, h, w = x.shape
    hb, wb = triton.cdiv(h, block_size), triton.cdiv(w, block_size)
    return nb, c, h, w, hb, wb, nb * c * hb * wb


def _cs_launch(x, y, prep, rho, algorithm, input_precision, write_z, write_r, r_saved, index=None):
    """Run the CS kernels on x (with y, or y = 0 when ``y`` is None). Returns ``(z, r, part)``: z (x's shape and
    dtype, contiguous) if ``write_z``; fp32 ``r = A x − y`` (N, C, HB, WB, m) if ``write_r``; fp32 per-block
    ``Σ r·r_saved`` if ``r_saved`` is given; empty tensors otherwise.

    ``prep``: a ``_CSPrepared`` (one Φ and one ρ for the batch), or with ``index`` (int64 (N,), values in [0, G))
    a ``_CSStacked``: image n uses Φ_{index[n]} and ρ = rho[n] (rho of shape (N,), any stride) or the one element
    of rho; m is then the largest m_g, and r is 0 past each image's m_g."""
    bs = prep.block_size
    nb, c, h, w, hb, wb, nblk = _cs_geometry(x, bs)
    m = prep.m
    indexed = index is not None
    partial = r_saved is not None
    z = _empty(x.shape, x) if write_z else _nothing(x)
    r = _empty((nb, c, hb, wb, m), x, torch.float32) if write_r else _nothing(x, torch.float32)
    part = _empty((nblk,), x, torch.float32) if partial else _nothing(x, torch.float32)
    if nblk == 0:
        return z, r, part
    _check_runnable(x)
    if h * w >= 2 ** 31:
        raise ValueError(f"x: image {h}×{w} has ≥ 2³¹ pixels; the CS kernel uses 32-bit in-plane offsets")
    # The kernels address x, z, y and r as contiguous (in-plane offsets shared by the x load and the z store keep
    # the register count down); a non-contiguous input (a view, an expanded gradient) is copied once.
    x = x.contiguous()
    has_y = y is not None
    ysrc = y.contiguous() if has_y else x
    zdst = z if write_z else x
    prec = dot_precision(x.dtype, input_precision)
    up = _upcast(x.dtype)
    if indexed:
        # Each image has tiles of its own (``_cs_tile``), so that a program reads one Φ_g and one ρ.
        bpi = c * hb * wb
        idx, ms = index, prep.ms
        rho_stride = 0 if rho.numel() == 1 else rho.stride(0)
        tiles = lambda bm: nb * triton.cdiv(bpi, bm)  # noqa: E731
    else:
        # Never read (INDEXED is off); any pointer will do.
        bpi, idx, ms, rho_stride = nblk, rho, rho, 0
        tiles = lambda bm: triton.cdiv(nblk, bm)  # noqa: E731
    if algorithm == "one_gemm" and write_z:
        gram, neg_phi = prep.gram_matrix()
        grid = lambda meta: (tiles(meta["BLOCK_M"]), prep.np_ // meta["BLOCK_N"])  # noqa: E731
        _cs_one_gemm_kernel[grid](
            x, ysrc, gram, neg_phi, rho, zdst, idx, ms,
            nblk, bpi, h, w, hb, wb, m, rho_stride,
            BS=bs, NP=prep.np_, MP=prep.mp, HAS_Y=has_y, INDEXED=indexed, INPUT_PRECISION=prec, UPCAST=up,
        )
        write_z = False  # done; the two-GEMM kernels below only have to produce r / the partial sums
    if write_z or write_r or partial:
        ksplit = _cs_ksplit(nblk, m, prep.np_)
        # With one range the partial sum is r itself: the first kernel writes it straight into r when r is wanted.
        direct = ksplit == 1 and write_r
        ps = m if direct else triton.cdiv(m, 16) * 16
        parts = r if direct else _empty((ksplit, nblk, ps), x, torch.float32)
        grid = lambda meta: (tiles(meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_P"]), ksplit)  # noqa: E731
        _cs_residual_kernel[grid](
            x, ysrc, prep.phit, parts, idx, ms,
            nblk, bpi, h, w, hb, wb, m, ps,
            BS=bs, NP=prep.np_, MP=prep.mp, KSPLIT=ksplit, HAS_Y=has_y, INDEXED=indexed, INPUT_PRECISION=prec,
            UPCAST=up,
        )
        copy_r = write_r and not direct
        if write_z or copy_r or partial:
            grid = lambda meta: (tiles(meta["BLOCK_M"]),  # noqa: E731
                                 prep.np_ // meta["BLOCK_N"] if write_z else 1)
            _cs_update_kernel[grid](
                x, parts, prep.phi, rho, zdst, r if copy_r else parts, r_saved if partial else parts,
                part if partial else parts, idx, ms,
                nblk, bpi, h, w, hb, wb, m, ps, rho_stride,
                BS=bs, NP=prep.np_, MP=prep.mp, KSPLIT=ksplit, WRITE_Z=write_z, WRITE_R=copy_r, PARTIAL=partial,
                INDEXED=indexed, INPUT_PRECISION=prec, UPCAST=up,
            )
    return z, r, part


def cs_forward(x, y, phi, rho, block_size=33, algorithm="auto", input_precision="tf32", save_residual=False):
    """Launch the CS step (no autograd, no validation). Returns ``(z, r)``, r = fp32 ``A x − y`` if
    ``save_residual`` else empty."""
    prep = _cs_prepared(phi, x.dtype, block_size)
    algorithm = resolve_cs_algorithm(algorithm, prep.m, prep.n)
    z, r, _ = _cs_launch(x, y, prep, rho, algorithm, input_precision, True, save_residual, None)
    return z, r


def cs_backward(grad, phi, rho, residual, block_size, algorithm, input_precision, need_x, need_y, need_rho):
    """``(dx, dy, dρ)`` of the CS step, empty where not needed; see ``GDStepCSFunction``."""
    prep = _cs_prepared(phi, grad.dtype, block_size)
    algorithm = resolve_cs_algorithm(algorithm, prep.m, prep.n)
    dx, ag, part = _cs_launch(grad, None, prep, rho, algorithm, input_precision, need_x, need_y or need_rho,
                              residual if need_rho else None)
    dy, drho = _finish_backward(ag, part, rho, grad.dtype, need_y, need_rho)
    return dx, dy, drho


def cs_indexed_forward(x, y, phis, index, rho, block_size=33, algorithm="auto", input_precision="tf32",
                       save_residual=False):
    """Launch the indexed CS step (no autograd, no validation; ``index`` must lie in [0, len(phis))). Returns
    ``(z, r)``, r = fp32 ``A x − y`` (N, C, Hb, Wb, m_max), 0 past each image's m_g, if ``save_residual`` else
    empty. The algorithm's ``"auto"`` is decided on m_max."""
    prep = _cs_stacked(phis, x.dtype, block_size)
    algorithm = resolve_cs_algorithm(algorithm, prep.m, prep.n)
    z, r, _ = _cs_launch(x, y, prep, rho, algorithm, input_precision, True, save_residual, None, index)
    return z, r


def cs_indexed_backward(grad, phis, index, rho, residual, block_size, algorithm, input_precision, need_x, need_y,
                        need_rho):
    """``(dx, dy, dρ)`` of the indexed CS step, empty where not needed; see ``_gd_step_cs_indexed_backward``."""
    prep = _cs_stacked(phis, grad.dtype, block_size)
    algorithm = resolve_cs_algorithm(algorithm, prep.m, prep.n)
    dx, ag, part = _cs_launch(grad, None, prep, rho, algorithm, input_precision, need_x, need_y or need_rho,
                              residual if need_rho else None, index)
    if rho.numel() == 1:
        # One ρ for the batch: as gd_step_cs (dρ is the sum over every block).
        dy, drho = _finish_backward(ag, part, rho, grad.dtype, need_y, need_rho)
        return dx, dy, drho
    nb, c, h, w, hb, wb, _ = _cs_geometry(grad, block_size)
    # ρ_n per image; A G is exactly 0 past each m_g, and so is dy there.
    dy = (rho.float().reshape(nb, 1, 1, 1, 1) * ag).to(grad.dtype) if need_y else _nothing(ag, grad.dtype)
    if need_rho:
        # dρ_n = −Σ of the partial sums of image n's C·Hb·Wb blocks (a fixed-order torch sum, as _finish_backward).
        drho = (-part.reshape(nb, c * hb * wb).sum(1)).to(rho.dtype).reshape(rho.shape)
    else:
        drho = _nothing(ag, rho.dtype)
    return dx, dy, drho


# --------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lorun_fast::gd_step_cs", mutates_args=())
def _gd_step_cs_op(x: torch.Tensor, y: torch.Tensor, phi: torch.Tensor, rho: torch.Tensor, block_size: int,
                   algorithm: str, input_precision: str, save_residual: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-CS step: ``(z, r)``, r = fp32 ``A x − y`` (N, C, Hb, Wb, m) if ``save_residual`` else empty."""
    return cs_forward(x, y, phi, rho, block_size, algorithm, input_precision, save_residual)


@_gd_step_cs_op.register_fake
def _(x, y, phi, rho, block_size, algorithm, input_precision, save_residual):
    z = torch.empty_like(x, memory_format=torch.contiguous_format)
    r = x.new_empty(y.shape, dtype=torch.float32) if save_residual else x.new_empty(0, dtype=torch.float32)
    return z, r


@torch.library.custom_op("lorun_fast::gd_step_cs_backward", mutates_args=())
def _gd_step_cs_backward_op(grad: torch.Tensor, phi: torch.Tensor, rho: torch.Tensor,
                            residual: Optional[torch.Tensor], block_size: int, algorithm: str, input_precision: str,
                            need_x: bool, need_y: bool, need_rho: bool
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``lorun_fast::gd_step_cs``: ``(dx, dy, dρ)``, empty where not needed."""
    return cs_backward(grad, phi, rho, residual, block_size, algorithm, input_precision, need_x, need_y, need_rho)


@_gd_step_cs_backward_op.register_fake
def _(grad, phi, rho, residual, block_size, algorithm, input_precision, need_x, need_y, need_rho):
    nb, c, h, w = grad.shape
    y_shape = (nb, c, -(-h // block_size), -(-w // block_size), phi.shape[0])
    return _backward_fakes(grad, y_shape, rho, need_x, need_y, need_rho)


class GDStepCSFunction(torch.autograd.Function):
    """Autograd of the block-CS step (also registered as ``lorun_fast::gd_step_cs``'s autograd).

    Inputs ``(x, y, Φ, ρ, block_size, algorithm, input_precision, save_residual)``, outputs ``(z, r)``:

        r = A x − y = to_blocks(x) Φᵀ − y          (fp32; saved when ρ needs a gradient)
        z = x − ρ·Aᵀ r = x − ρ·from_blocks(r Φ)    (cropped to H × W)

    Backward, with ``G = ∂L/∂z`` (the step is linear in x, y and ρ):

        dx = G − ρ·AᵀA G        (the forward kernel applied to G with y = 0, same algorithm)
        dy = ρ·A G              (A G is the "residual" that launch forms on chip and writes out)
        dρ = −⟨G, Aᵀ r⟩ = −⟨A G, r⟩   (per-block partial sums Σ_p (A G)·r in the kernel, then a fixed-order
                                        torch sum: deterministic, no atomics)

    Φ gets no gradient (it is a fixed sampling matrix; the public function refuses a Φ that requires grad).
    """

    @staticmethod
    def forward(x, y, phi, rho, block_size, algorithm, input_precision, save_residual):
        return cs_forward(x, y, phi, rho, block_size, algorithm, input_precision, save_residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, phi, rho, block_size, algorithm, input_precision, save_residual = inputs
        _, r = output
        ctx.save_for_backward(phi, rho, r)
        ctx.block_size, ctx.algorithm, ctx.input_precision = block_size, algorithm, input_precision
        ctx.has_residual = bool(save_residual)
        _mark_residual(ctx, r)

    @staticmethod
    def backward(ctx, grad_z, grad_r=None):
        phi, rho, r = ctx.saved_tensors
        need = ctx.needs_input_grad
        if need[3] and not ctx.has_residual:
            raise RuntimeError("lorun_fast::gd_step_cs: rho needs a gradient but the forward ran with "
                               "save_residual=False; call gd_step_cs(), which sets it")
        dx, dy, drho = torch.ops.lorun_fast.gd_step_cs_backward(
            grad_z, phi, rho, r if need[3] else None, ctx.block_size, ctx.algorithm, ctx.input_precision,
            need[0], need[1], need[3])
        return (dx if need[0] else None, dy if need[1] else None, None, drho if need[3] else None,
                None, None, None, None)


torch.library.register_autograd("lorun_fast::gd_step_cs", GDStepCSFunction.backward,
                                setup_context=GDStepCSFunction.setup_context)


@torch.library.custom_op("lorun_fast::gd_step_cs_indexed", mutates_args=())
def _gd_step_cs_indexed_op(x: torch.Tensor, y: torch.Tensor, phis: List[torch.Tensor], index: torch.Tensor,
                           rho: torch.Tensor, block_size: int, algorithm: str, input_precision: str,
                           save_residual: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-CS step with a Φ per sample: ``(z, r)``, r = fp32 ``A x − y`` (N, C, Hb, Wb, m_max) if
    ``save_residual`` else empty."""
    check_index_range(index, len(phis), "sampling matrices in phis")
    return cs_indexed_forward(x, y, phis, index, rho, block_size, algorithm, input_precision, save_residual)


@_gd_step_cs_indexed_op.register_fake
def _(x, y, phis, index, rho, block_size, algorithm, input_precision, save_residual):
    z = torch.empty_like(x, memory_format=torch.contiguous_format)
    r = x.new_empty(y.shape, dtype=torch.float32) if save_residual else x.new_empty(0, dtype=torch.float32)
    return z, r


@torch.library.custom_op("lorun_fast::gd_step_cs_indexed_backward", mutates_args=())
def _gd_step_cs_indexed_backward_op(grad: torch.Tensor, phis: List[torch.Tensor], index: torch.Tensor,
                                    rho: torch.Tensor, residual: Optional[torch.Tensor], block_size: int,
                                    algorithm: str, input_precision: str, need_x: bool, need_y: bool,
                                    need_rho: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``lorun_fast::gd_step_cs_indexed``: ``(dx, dy, dρ)``, empty where not needed. ``index`` is the
    forward's, whose range that op checked (no second host sync here)."""
    return cs_indexed_backward(grad, phis, index, rho, residual, block_size, algorithm, input_precision, need_x,
                               need_y, need_rho)


@_gd_step_cs_indexed_backward_op.register_fake
def _(grad, phis, index, rho, residual, block_size, algorithm, input_precision, need_x, need_y, need_rho):
    nb, c, h, w = grad.shape
    y_shape = (nb, c, -(-h // block_size), -(-w // block_size), max(p.shape[0] for p in phis))
    return _backward_fakes(grad, y_shape, rho, need_x, need_y, need_rho)


def _gd_step_cs_indexed_setup_context(ctx, inputs, output):
    x, y, phis, index, rho, block_size, algorithm, input_precision, save_residual = inputs
    _, r = output
    ctx.save_for_backward(index, rho, r, *phis)
    ctx.block_size, ctx.algorithm, ctx.input_precision = block_size, algorithm, input_precision
    ctx.has_residual = bool(save_residual)
    _mark_residual(ctx, r)


def _gd_step_cs_indexed_backward(ctx, grad_z, grad_r=None):
    """Autograd of ``lorun_fast::gd_step_cs_indexed`` (inputs ``(x, y, [Φ_g], index, ρ, block_size, algorithm,
    input_precision, save_residual)``, outputs ``(z, r)``). Per sample n, with ``g = index[n]``, A_g the block
    operator of Φ_g and ρ_n = ρ[n] (or the one ρ):

        r_n = A_g x_n − y_n[..., :m_g]          (fp32; saved when ρ needs a gradient; 0 past m_g)
        z_n = x_n − ρ_n·A_gᵀ r_n

    Backward, with ``G = ∂L/∂z`` (the step is linear in x, y and ρ):

        dx_n = G_n − ρ_n·A_gᵀA_g G_n      (the forward kernels on G with y = 0, same index)
        dy_n = ρ_n·A_g G_n                in the first m_g entries, exactly 0 past them (y there is not read)
        dρ_n = −⟨A_g G_n, r_n⟩            (per-block partial sums, then a fixed-order torch sum per sample; one
                                           shared ρ gets the sum over the batch, as in ``GDStepCSFunction``)

    ``index`` is not differentiable; the Φ_g get no gradient (the public function refuses one that requires grad).
    """
    index, rho, r, *phis = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[4] and not ctx.has_residual:
        raise RuntimeError("lorun_fast::gd_step_cs_indexed: rho needs a gradient but the forward ran with "
                           "save_residual=False; call gd_step_cs_indexed(), which sets it")
    dx, dy, drho = torch.ops.lorun_fast.gd_step_cs_indexed_backward(
        grad_z, phis, index, rho, r if need[4] else None, ctx.block_size, ctx.algorithm, ctx.input_precision,
        need[0], need[1], need[4])
    # A list input takes a list of gradients (one per tensor).
    return (dx if need[0] else None, dy if need[1] else None, [None] * len(phis), None, drho if need[4] else None,
            None, None, None, None)


torch.library.register_autograd("lorun_fast::gd_step_cs_indexed", _gd_step_cs_indexed_backward,
                                setup_context=_gd_step_cs_indexed_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------

def gd_step_cs(x: torch.Tensor, y: torch.Tensor, phi: torch.Tensor, rho, *, algorithm: str = "auto",
               input_precision: str = "tf32", block_size: int = 33) -> torch.Tensor:
    """Block-CS gradient step ``z = x − ρ·Φᵀ(Φ x_b − y_b)`` per block, fused (see the module docstring).

    Args:
        x: image (N, C, H, W), float32 / bfloat16 / float16, H, W ≥ block_size (zero-padded to whole blocks).
        y: block measurements (N, C, ⌈H/b⌉, ⌈W/b⌉, m), x's dtype.
        phi: sampling matrix (m, b²), any float dtype (rounded to x's dtype, like the reference); no gradient.
        rho: step size: a Python number or a scalar tensor (0-dim or (1,)) on x's device, e.g. a learnable
            per-stage parameter (it gets a gradient).
        algorithm: "auto" (two GEMMs through Φ when m < n/2, else one GEMM with G = ΦᵀΦ), "two_gemm" or "one_gemm".
        input_precision: "ieee", "tf32" or "tf32x3" for float32 inputs (ignored for 16-bit ones).
        block_size: block side b (33 in ISTA-Net).

    Returns z with x's shape and dtype (contiguous). Registered as ``torch.ops.lorun_fast.gd_step_cs`` (returns
    ``(z, residual)``), so it works under autograd (x, y, ρ) and ``torch.compile(fullgraph=True)``.
    """
    _check_x(x, "(N, C, H, W) image")
    _check_int("block_size", block_size, 1)
    h, w = x.shape[-2:]
    if h < block_size or w < block_size:
        raise ValueError(f"x: image {h}×{w} is smaller than one {block_size}×{block_size} block")
    _check_tensor("phi", phi)
    n = block_size * block_size
    if phi.dim() != 2 or phi.shape[1] != n:
        raise ValueError(f"phi: expected a 2-D matrix (m, {n}) for {block_size}×{block_size} blocks, got shape "
                         f"{tuple(phi.shape)}")
    if not 1 <= phi.shape[0] <= n:
        raise ValueError(f"phi: expected 1 to {n} rows, got {phi.shape[0]}")
    m = phi.shape[0]
    _check_y(y, x, (x.shape[0], x.shape[1], -(-h // block_size), -(-w // block_size), m),
             "(N, C, Hb, Wb, m)")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
    _check_device(x, y=y, phi=phi)
    _check_fixed("phi", phi)
    rho_t = _as_rho(rho, x)
    algorithm = resolve_cs_algorithm(algorithm, m, n)
    save = torch.is_grad_enabled() and rho_t.requires_grad
    z, _ = torch.ops.lorun_fast.gd_step_cs(x, y, phi, rho_t, block_size, algorithm, input_precision, save)
    return z


def _check_phis(phis, x, block_size: int) -> list:
    """The G sampling matrices of ``gd_step_cs_indexed``: a non-empty list or tuple of 2-D floating-point tensors
    (m_g, block_size²) on x's device, 1 ≤ m_g ≤ n, none requiring grad. Returns them as a list."""
    if isinstance(phis, torch.Tensor) or not isinstance(phis, (list, tuple)):
        raise TypeError(f"phis: expected a list or tuple of G sampling matrices (m_g, n), got {type(phis).__name__}")
    if len(phis) == 0:
        raise ValueError(f"phis: expected at least one sampling matrix, got an empty {type(phis).__name__}")
    n = block_size * block_size
    for g, phi in enumerate(phis):
        name = f"phis[{g}]"
        _check_tensor(name, phi)
        if phi.dim() != 2 or phi.shape[1] != n:
            raise ValueError(f"{name}: expected a 2-D matrix (m, {n}) for {block_size}×{block_size} blocks, got "
                             f"shape {tuple(phi.shape)}")
        if not 1 <= phi.shape[0] <= n:
            raise ValueError(f"{name}: expected 1 to {n} rows, got {phi.shape[0]}")
        if phi.device != x.device:
            raise ValueError(f"{name}: on device {phi.device}, but x is on {x.device}; all tensors must share a "
                             "device")
        _check_fixed(name, phi)
    return list(phis)


def _as_sample_rho(rho, x) -> torch.Tensor:
    """ρ of ``gd_step_cs_indexed``: a Python number or a one-element tensor (0-dim or (1,)) shared by the batch
    (``_as_rho``), or a floating-point tensor of shape (N,) on x's device, one step per sample (any stride)."""
    nb = x.shape[0]
    if isinstance(rho, torch.Tensor) and not (rho.dim() <= 1 and rho.numel() == 1):
        if not rho.is_floating_point():
            raise TypeError(f"rho: expected a floating-point tensor, got dtype {rho.dtype}")
        if rho.dim() != 1 or rho.shape[0] != nb:
            raise ValueError(f"rho: expected {nb} per-sample step sizes (shape ({nb},)) or one shared step (a Python "
                             f"float, or a 0-dim or (1,) tensor), got shape {tuple(rho.shape)}")
        if rho.device != x.device:
            raise ValueError(f"rho: on device {rho.device}, but x is on {x.device}; all tensors must share a device")
        return rho
    return _as_rho(rho, x)


def gd_step_cs_indexed(x: torch.Tensor, y: torch.Tensor, phis: Sequence[torch.Tensor], index: torch.Tensor, rho, *,
                       algorithm: str = "auto", input_precision: str = "tf32", block_size: int = 33) -> torch.Tensor:
    """``gd_step_cs`` with a sampling matrix and a step size per sample: for sample n, with ``g = index[n]``,
    ``z_n = x_n − ρ_n·Φ_gᵀ(Φ_g x_{n,b} − y_{n,b})`` per block, the whole batch in one launch per kernel pass.

    Args:
        x: image (N, C, H, W), float32 / bfloat16 / float16, H, W ≥ block_size (zero-padded to whole blocks).
        y: block measurements (N, C, ⌈H/b⌉, ⌈W/b⌉, m_max), x's dtype, m_max = max m_g: sample n's measurement is
            in the first m_g (g = index[n]) entries of each block; what lies past them is never read (it may hold
            anything) and gets a zero gradient.
        phis: a list or tuple of G sampling matrices Φ_g (m_g, b²), the m_g may differ; any float dtype (rounded to
            x's dtype, like the reference); no gradient. Stacked once per list (cached like ``gd_step_cs``'s Φ).
        index: int64 (N,) on x's device, values in [0, G): the sampling matrix of each sample (checking the range
            reads its min and max back to the host). Matrices no sample uses are allowed.
        rho: step sizes: a floating-point tensor (N,) on x's device, one per sample, or one step for the whole
            batch (a Python number, or a 0-dim or (1,) tensor). A tensor ρ gets a gradient of its own shape (for a
            shared ρ, the sum over the batch).
        algorithm: "auto" (decided on m_max by ``resolve_cs_algorithm``), "two_gemm" or "one_gemm".
        input_precision: "ieee", "tf32" or "tf32x3" for float32 inputs (ignored for 16-bit ones).
        block_size: block side b (33 in ISTA-Net).

    Each image's blocks are tiled on their own, so that every program reads one Φ_g (from the zero-padded stack)
    and one ρ_n; the two-GEMM path skips measurement tiles past m_g. With one Φ for the whole batch the result
    equals ``gd_step_cs``'s. Returns z with x's shape and dtype (contiguous). Registered as
    ``torch.ops.lorun_fast.gd_step_cs_indexed`` (returns ``(z, residual)``), so it works under autograd (x, y, ρ)
    and ``torch.compile(fullgraph=True)``.
    """
    _check_x(x, "(N, C, H, W) image")
    _check_int("block_size", block_size, 1)
    h, w = x.shape[-2:]
    if h < block_size or w < block_size:
        raise ValueError(f"x: image {h}×{w} is smaller than one {block_size}×{block_size} block")
    phis = _check_phis(phis, x, block_size)
    check_sample_index(index, x, "the sampling matrices in phis")
    m_max = max(p.shape[0] for p in phis)
    expected = (x.shape[0], x.shape[1], -(-h // block_size), -(-w // block_size), m_max)
    _check_tensor("y", y)
    if y.dim() == 5 and tuple(y.shape[:4]) == expected[:4] and y.shape[4] != m_max:
        raise ValueError(f"y: expected the last dimension m_max = {m_max} (the most rows of any Φ in phis: "
                         f"{[p.shape[0] for p in phis]}), got {y.shape[4]}")
    _check_y(y, x, expected, "(N, C, Hb, Wb, m_max)")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
    _check_device(x, y=y)
    rho_t = _as_sample_rho(rho, x)
    algorithm = resolve_cs_algorithm(algorithm, m_max, block_size * block_size)
    save = torch.is_grad_enabled() and rho_t.requires_grad
    z, _ = torch.ops.lorun_fast.gd_step_cs_indexed(x, y, phis, index, rho_t, block_size, algorithm,
                                                   input_precision, save)
    return z

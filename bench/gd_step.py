"""One gradient-descent step ``z = x − ρ·Aᵀ(A x − y)``, fused vs eager, for the four operators.

    python bench/gd_step.py                 # GPU: batch 1 and 16 × 256² and 512² × fp32/TF32 and bf16 (forward),
                                            #      forward+backward at batch 16, 256²
    python bench/gd_step.py --quick         # GPU: batch 16, 256², both dtypes, both passes (the NOTES.md shape)
    python bench/gd_step.py --out DIR       # also write DIR/results.json and DIR/report.md

On a CPU it runs the CPU-capable providers (eager, ista-mm) at reduced sizes (batch 1, CS 66×66 = 2×2 blocks,
CASSI and SR 64×64, float32) in seconds, with host-clock timings, and reports the fused rows as
"skipped: needs CUDA". ``run(device, quick)`` returns the rows for other scripts (``bench/run.py``).

Operators (``lorun_fast.reference``; the same ones ``bench/run.py`` builds):

- ``cs``: block CS, 33×33 blocks, ratio 25% (m = 272): Φ from the shared ``cs_sampling/phi_0_25_1089.mat``
  (``lorun_fast.io.data_root()``) when present, else ``BlockCS.gaussian(0.25)`` (orthonormal rows); C = 1.
  256² and 512² are not multiples of 33: the step works on zero-padded 264² / 528² blocks and crops.
- ``cassi``: single-disperser CASSI, 28 bands, step 2: the shared ``cassi/mask.mat`` (256²) cropped or tiled to the
  image size when present, else a seeded uniform random mask.
- ``sr``: super-resolution ×2, 7×7 Gaussian blur (σ = 1.6, ``gaussian_kernel(7, 1.6)``, as ``bench/run.py``),
  circular boundaries, C = 3 (RGB). One scale keeps the grid modest; ×4 only changes the LR side (1/16 of x).
- ``bicubic``: super-resolution ×2 with MATLAB's bicubic ``imresize`` (``BicubicSR``), C = 3.

Providers per op:

- ``eager``: the reference ``Operator.gd_step`` (CS: pad + unfold copy, two matmuls, fold copy; CASSI: a Python
  loop of 2·28 shifted band ops for A and 28 for Aᵀ, then a stack; SR: circular pad + depthwise conv + slice, then
  zero-fill upsampling + pad + conv; bicubic: four dense matrix products).
- ``ista-mm`` (CS only): ISTA-Net's formulation ``x_b − ρ·(x_b @ ΦᵀΦ) + ρ·(y_b @ Φ)`` on the (blocks × 1089)
  matrix, with ``PhiTPhi = ΦᵀΦ`` and ``PhiTb = y @ Φ`` formed inside every call (ISTA-Net forms them once per
  network forward and reuses them over its phases; here one call is one step), and the unfold/fold copies it needs
  (``ista_mm_step``).
- ``fused-two-gemm`` / ``fused-one-gemm`` (CS), ``fused`` (CASSI, SR, bicubic): ``lorun_fast.kernels.gd_step_cs``,
  ``gd_step_cassi``, ``gd_step_sr`` and ``gd_step_bicubic`` (CUDA only).
  One-GEMM's Gram matrix ΦᵀΦ is cached per Φ by the kernel module (formed on the first call, not timed).

Passes: ``forward`` (inference, under ``torch.no_grad()``) and ``forward+backward`` (training: ``torch.autograd.grad``
of z for x, y and ρ, as in a DUN whose step size is learned and whose y comes from earlier differentiable work,
given a random ``G = ∂L/∂z``). To keep the GPU grid modest, the full GPU preset times forward+backward only at the
quick shape (batch 16, 256²); ``--passes`` on the command line (or ``passes=`` to ``run``) times the named passes at
every shape.

float32 runs with TF32 allowed on a GPU (``harness.tf32_mode(True)`` for the eager matmuls and convolutions, fused CS
with ``input_precision="tf32"``) and is recorded as precision "tf32"; on a CPU float32 is IEEE ("fp32"). bfloat16
multiplies in bf16 with float32 accumulation ("bf16"). The operator (Φ, mask, kernel) and ρ are first rounded to
the run's dtype (as a model's ``.to(dtype)`` would), so every provider and the float64 reference see the same values.

Numerics before timing: each provider's z (and, for forward+backward, dx, dy and dρ) on the benchmark inputs is
compared with the float64 reference ``gd_step`` on the same (already rounded) inputs as ‖out − ref‖ / ‖ref‖ (the
largest over the tensors). Inputs: x, x_true ~ U(0, 1), y = A(x_true) (so the residual A x − y is not small),
G ~ N(0, 1), ρ = the operator's ``default_step()``. A provider over its tolerance (fp32 1e-4, tf32 5e-3, bf16 3e-2;
for the fused providers also "2× the error of eager", whichever is larger), or with a NaN, gets status
"failed numerics" and no timing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import driver
import harness
from lorun_fast.testing import BENCH_TOLERANCE
from lorun_fast.reference import CASSI, BicubicSR, BlockCS, SuperResolution, gaussian_kernel
from lorun_fast.reference.bicubic import imresize_matrix

REPO = Path(__file__).resolve().parents[1]
OPS = ("cs", "cassi", "sr", "bicubic")
OP_PROVIDERS = {"cs": ("eager", "ista-mm", "fused-two-gemm", "fused-one-gemm"),
                "cassi": ("eager", "fused"),
                "sr": ("eager", "fused"),
                "bicubic": ("eager", "fused")}
PROVIDERS = ("eager", "ista-mm", "fused-two-gemm", "fused-one-gemm", "fused")
CUDA_ONLY = ("fused-two-gemm", "fused-one-gemm", "fused")
PASSES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CS_RATIO = 0.25
CS_BLOCK = 33
CASSI_BANDS = 28
CASSI_STEP = 2
SR_SCALE = 2
SR_KSIZE = 7
SR_SIGMA = 1.6
SR_CHANNELS = 3


@dataclass(frozen=True)
class Sizes:
    hw: tuple[int, ...]              # image sides of CASSI and SR (and CS unless cs_hw is given)
    cs_hw: tuple[int, ...] | None    # image sides of CS (None: hw)
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    rounds: int
    warmup_ms: float
    rep_ms: float
    train_at: tuple[int, int] | None = None  # (side, batch): the only shape with forward+backward; None: every shape


GPU_FULL = Sizes((256, 512), None, (1, 16), ("float32", "bfloat16"), rounds=3, warmup_ms=25, rep_ms=50,
                 train_at=(256, 16))
GPU_QUICK = Sizes((256,), None, (16,), ("float32", "bfloat16"), rounds=3, warmup_ms=25, rep_ms=50)
CPU_FULL = Sizes((64,), (66,), (1, 4), ("float32",), rounds=3, warmup_ms=10, rep_ms=40)
CPU_QUICK = Sizes((64,), (66,), (1,), ("float32",), rounds=3, warmup_ms=5, rep_ms=15)


# --------------------------------------------------------------------------------------------------------------------
# Counting: minimal bytes and FLOPs
# --------------------------------------------------------------------------------------------------------------------

def element_counts(op: str, batch: int, side: int, *, m: int = 272, block: int = CS_BLOCK,
                   bands: int = CASSI_BANDS, step: int = CASSI_STEP, channels: int = SR_CHANNELS,
                   scale: int = SR_SCALE, ksize: int = SR_KSIZE) -> dict[str, int]:
    """Elements of the image x (= z, G, dx), the measurement y (= dy) and the operator ``a`` of one problem.

        cs:     x = N·H·W (C = 1);  y = N·⌈H/b⌉·⌈W/b⌉·m;        a = m·b² (Φ)
        cassi:  x = N·Λ·H·W;        y = N·H·(W + d·(Λ − 1));    a = H·W (the mask)
        sr:     x = N·C·H·W;        y = N·C·(H/s)·(W/s);         a = k² (the blur kernel)
        bicubic: as sr, a = 0 (the fused step's gather tables are a few KB per image size, L2-resident)
    """
    if op == "cs":
        hb = math.ceil(side / block)
        return {"x": batch * side * side, "y": batch * hb * hb * m, "a": m * block * block}
    if op == "cassi":
        return {"x": batch * bands * side * side, "y": batch * side * (side + step * (bands - 1)),
                "a": side * side}
    if op in ("sr", "bicubic"):
        return {"x": batch * channels * side * side, "y": batch * channels * (side // scale) ** 2,
                "a": ksize * ksize if op == "sr" else 0}
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def minimal_bytes(pass_: str, counts: dict[str, int], elem: int) -> int:
    """Fewest bytes the problem must move through device memory (each input read once, each output written once).

    With e = bytes per element and |x|, |y|, |a| from ``element_counts`` (a = Φ, the mask or the blur kernel; ρ is
    one scalar and not counted):

        forward:          e·(|x| [x read] + |y| [y read] + |a| [operator read] + |x| [z written])
                          = e·(2|x| + |y| + |a|)
        forward+backward: forward + e·(|x| [G read] + |x| [dx written] + |y| [dy written] + |a| [operator re-read]
                                       + min(|x| + |y|, 2|y|))

    The last term is what dρ = −⟨G, Aᵀ(A x − y)⟩ = −⟨A G, r⟩ needs of the forward: either x and y read again
    (|x| + |y|), or the residual r = A x − y (|y| elements) written by the forward and read back (2|y|). For all
    three operators |y| < |x| (CS 0.27|x|, CASSI 0.04|x|, SR ×2 0.25|x|), so the floor is the residual route:
    e·(4|x| + 4|y| + 2|a|). (Re-reading x and y, e·(5|x| + 3|y| + 2|a|), is not a floor: the fused kernels save an
    fp32 r and move less than that.)

    The same number for every provider of an op and pass (it is the problem's floor, not what a provider moves), so
    the achieved GB/s of each row is an effective bandwidth and rows compare directly.
    """
    fwd = 2 * counts["x"] + counts["y"] + counts["a"]
    if pass_ == "forward":
        return elem * fwd
    if pass_ != "forward+backward":
        raise ValueError(f"pass: expected one of {PASSES}, got {pass_!r}")
    keep = min(counts["x"] + counts["y"], 2 * counts["y"])
    return elem * (fwd + 2 * counts["x"] + counts["y"] + counts["a"] + keep)


def flop_count(op: str, provider: str, pass_: str, batch: int, side: int, *, m: int = 272, block: int = CS_BLOCK,
               bands: int = CASSI_BANDS, step: int = CASSI_STEP, channels: int = SR_CHANNELS,
               scale: int = SR_SCALE, ksize: int = SR_KSIZE) -> int:
    """FLOPs (a multiply-add is 2) of the provider's algorithm; elementwise ops count 1 per element.

    CS, with B = N·⌈H/b⌉·⌈W/b⌉ blocks, n = b², P = N·H·W pixels:

        eager, fused-two-gemm:  forward 4·B·n·m [x_b Φᵀ, r Φ] + B·m [− y] + 2·P [ρ·, x −]
        fused-one-gemm:         forward 2·B·n·(n + m) [[x_b, −y_b] @ [G; Φ]] + 2·P (G = ΦᵀΦ cached, not counted)
        ista-mm:                forward 2·n²·m [ΦᵀΦ, every call] + 2·B·n·m [y Φ] + 2·B·n² [x_b ΦᵀΦ] + 4·B·n

    CASSI (Λ bands, WY = W + d·(Λ − 1)), every provider: forward 2·N·Λ·H·W [A] + N·H·WY [− y] + 3·N·Λ·H·W [mask·r,
    ρ·, x −] = 5·N·Λ·H·W + N·H·WY.

    SR (P = N·C·H·W HR pixels, P/s² LR pixels, k×k kernel):

        eager:  forward 2·k²·P [full-resolution conv, then the ::s slice] + P/s² [− y]
                        + 2·k²·P [conv of the zero-filled upsampled r] + 2·P
        fused:  forward 2·k²·P/s² [residual at LR] + P/s² + 2·⌈k/s⌉²·P [polyphase Aᵀ] + 2·P

    Bicubic SR (MATLAB ``imresize``: per axis an (L × n) matrix M, L = n/s; T = taps per LR output, TA = LR outputs
    per HR pixel, from the fused step's gather tables):

        eager:  forward 2·L·H·W + 2·L·W·L [M_H x M_Wᵀ] + P/s² + 2·H·L·L + 2·H·L·W [M_Hᵀ r M_W] + 2·P, per plane
                (dense matrix products: every output sums over the whole axis)
        fused:  forward (2·T_W + 2)·T_H·P/s² [gathered residual] + P/s² + (2·TA_W + 2)·TA_H·P [gathered Aᵀ] + 2·P

    forward+backward = 2 × forward (the backward applies the same A and Aᵀ once more: dx = G − ρ·AᵀA G, and
    dy = ρ·A G, dρ = −⟨A G, r⟩ reuse its A G; their O(|y|) terms are not counted), except ista-mm, whose ΦᵀΦ is
    formed once per call: 2 × forward − 2·n²·m.
    """
    fwd_pass = pass_ == "forward"
    if pass_ not in PASSES:
        raise ValueError(f"pass: expected one of {PASSES}, got {pass_!r}")
    if op == "cs":
        n = block * block
        hb = math.ceil(side / block)
        b = batch * hb * hb
        p = batch * side * side
        if provider in ("eager", "fused-two-gemm"):
            fwd = 4 * b * n * m + b * m + 2 * p
        elif provider == "fused-one-gemm":
            fwd = 2 * b * n * (n + m) + 2 * p
        elif provider == "ista-mm":
            gram = 2 * n * n * m
            fwd = gram + 2 * b * n * m + 2 * b * n * n + 4 * b * n
            return fwd if fwd_pass else 2 * fwd - gram
        else:
            raise ValueError(f"provider: {provider!r} is not a CS provider")
        return fwd if fwd_pass else 2 * fwd
    if op == "cassi":
        if provider not in OP_PROVIDERS["cassi"]:
            raise ValueError(f"provider: {provider!r} is not a CASSI provider")
        pix = batch * bands * side * side
        fwd = 5 * pix + batch * side * (side + step * (bands - 1))
        return fwd if fwd_pass else 2 * fwd
    if op == "sr":
        p = batch * channels * side * side
        pl = p // (scale * scale)
        if provider == "eager":
            fwd = 4 * ksize * ksize * p + pl + 2 * p
        elif provider == "fused":
            taps = math.ceil(ksize / scale) ** 2
            fwd = 2 * ksize * ksize * pl + pl + 2 * taps * p + 2 * p
        else:
            raise ValueError(f"provider: {provider!r} is not an SR provider")
        return fwd if fwd_pass else 2 * fwd
    if op == "bicubic":
        planes = batch * channels
        p = planes * side * side
        lr = side // scale
        pl = planes * lr * lr
        if provider == "eager":
            fwd = planes * (2 * lr * side * side + 2 * lr * side * lr + 2 * side * lr * lr + 2 * side * lr * side)
            fwd += pl + 2 * p
        elif provider == "fused":
            taps, adjoint_taps = bicubic_taps(side, scale)
            fwd = (2 * taps + 2) * taps * pl + pl + (2 * adjoint_taps + 2) * adjoint_taps * p + 2 * p
        else:
            raise ValueError(f"provider: {provider!r} is not a bicubic provider")
        return fwd if fwd_pass else 2 * fwd
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def bicubic_taps(side: int, scale: int) -> tuple[int, int]:
    """(T, TA): the widest row and column support of the ×1/scale bicubic matrix of one axis (what the fused step's
    gather tables hold; counted from the matrix so that the import of the kernels is not needed)."""
    support = imresize_matrix(side, out_length=side // scale) != 0
    return int(support.sum(dim=1).max()), int(support.sum(dim=0).max())


# --------------------------------------------------------------------------------------------------------------------
# Operators, problems and providers
# --------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _base_cs() -> tuple[BlockCS, str]:
    from lorun_fast.io import data_root
    path = data_root() / "cs_sampling" / "phi_0_25_1089.mat"
    if path.is_file():
        return BlockCS.from_mat(path), f"Φ from {path.name}"
    return BlockCS.gaussian(CS_RATIO, seed=0), "Φ = BlockCS.gaussian(0.25, seed=0) (shared data not found)"


@functools.lru_cache(maxsize=None)
def _base_mask() -> tuple[torch.Tensor | None, str]:
    from lorun_fast.io import data_root
    path = data_root() / "cassi" / "mask.mat"
    if path.is_file():
        return CASSI.from_mat(path).mask, f"mask from {path.name}"
    return None, "random U(0, 1) mask (shared data not found)"


def make_operator(op: str, side: int):
    """The float64 CPU operator of one op at one image side, and a word on where its data came from."""
    if op == "cs":
        base, source = _base_cs()
        return copy.deepcopy(base), source
    if op == "cassi":
        mask, source = _base_mask()
        if mask is None:
            mask = torch.rand(side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        else:  # cropped, or tiled to the image size
            reps = math.ceil(side / mask.shape[0]), math.ceil(side / mask.shape[1])
            mask = mask.repeat(*reps)[:side, :side]
        return CASSI(mask, num_bands=CASSI_BANDS, step=CASSI_STEP), source
    if op == "sr":
        return (SuperResolution(gaussian_kernel(SR_KSIZE, SR_SIGMA), scale=SR_SCALE),
                f"{SR_KSIZE}×{SR_KSIZE} Gaussian σ={SR_SIGMA}, ×{SR_SCALE}")
    if op == "bicubic":
        return BicubicSR(SR_SCALE), f"MATLAB bicubic ×1/{SR_SCALE}"
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def op_channels(op: str) -> int:
    return {"cs": 1, "cassi": CASSI_BANDS, "sr": SR_CHANNELS, "bicubic": SR_CHANNELS}[op]


@dataclass
class Problem:
    op_name: str
    op: object            # the operator with its buffers in the run dtype, on the device
    ref_op: object        # the same rounded buffers in float64, on the device
    x: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor       # ∂L/∂z for the backward
    rho: torch.Tensor     # 0-dim, in the run dtype
    source: str


def make_problem(op_name: str, side: int, batch: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> Problem:
    """x, x_true ~ U(0, 1), y = A(x_true) (float64, then rounded), G ~ N(0, 1), ρ = default_step(); on the device."""
    base, source = make_operator(op_name, side)
    op = base.to(device=device, dtype=dtype)
    ref_op = copy.deepcopy(op).double()  # the rounded buffers, exactly, in float64
    shape = (batch, op_channels(op_name), side, side)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    x_true = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    with torch.no_grad():
        y = ref_op.A(x_true.double()).to(dtype)
    del x_true
    g = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    rho = torch.tensor(ref_op.default_step(), dtype=dtype, device=device)
    return Problem(op_name, op, ref_op, x, y.contiguous(), g, rho, source)


def ista_mm_step(op: BlockCS, x: torch.Tensor, y: torch.Tensor, rho) -> torch.Tensor:
    """ISTA-Net's gradient step on the (blocks × n) matrix: ``x_b − ρ·(x_b @ PhiTPhi) + ρ·PhiTb``.

    ``PhiTPhi = ΦᵀΦ`` (n × n) and ``PhiTb = y_b @ Φ`` are formed here, in every call, as ISTA-Net forms them per
    forward; the image is unfolded into blocks with the reference's layout (zero-padded at the right and bottom to
    whole blocks, each block row-major) and folded back and cropped afterwards. Equal to ``op.gd_step`` in exact
    arithmetic: x − ρ·Φᵀ(Φ x_b − y_b) = x_b − ρ·ΦᵀΦ x_b + ρ·Φᵀ y_b.
    """
    n = op.block_size * op.block_size
    blocks = op.to_blocks(x)                  # pad + unfold copy: (N, C, Hb, Wb, n)
    xb = blocks.reshape(-1, n)
    phi = op.phi.to(x.dtype)
    phi_t_phi = phi.t() @ phi                 # PhiTPhi (n × n)
    phi_t_b = y.reshape(-1, phi.shape[0]) @ phi  # PhiTb (blocks × n)
    zb = xb - rho * (xb @ phi_t_phi) + rho * phi_t_b
    return op.from_blocks(zb.reshape(blocks.shape), tuple(x.shape[-2:]))  # fold copy + crop


@dataclass
class Provider:
    name: str
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y, ρ) → z


def make_provider(name: str, prob: Problem, precision: str) -> Provider:
    op = prob.op
    if name == "eager":
        return Provider(name, op.gd_step)
    if name == "ista-mm":
        if prob.op_name != "cs":
            raise ValueError("provider ista-mm: CS only")
        return Provider(name, lambda x, y, rho: ista_mm_step(op, x, y, rho))
    # Fused providers: imported only when asked for (run() skips them without CUDA).
    if prob.op_name == "cs" and name in ("fused-two-gemm", "fused-one-gemm"):
        from lorun_fast.kernels.gd_step_cs import gd_step_cs
        algorithm = "two_gemm" if name == "fused-two-gemm" else "one_gemm"
        input_precision = "tf32" if precision == "tf32" else "ieee"
        return Provider(name, lambda x, y, rho: gd_step_cs(x, y, op.phi, rho, algorithm=algorithm,
                                                           input_precision=input_precision,
                                                           block_size=op.block_size))
    if prob.op_name == "cassi" and name == "fused":
        from lorun_fast.kernels.gd_step_cassi import gd_step_cassi
        return Provider(name, lambda x, y, rho: gd_step_cassi(x, y, op.mask, rho, step=op.step,
                                                              num_bands=op.num_bands))
    if prob.op_name == "sr" and name == "fused":
        from lorun_fast.kernels.gd_step_sr import gd_step_sr
        return Provider(name, lambda x, y, rho: gd_step_sr(x, y, op.kernel, rho, scale=op.scale))
    if prob.op_name == "bicubic" and name == "fused":
        from lorun_fast.kernels.gd_step_bicubic import gd_step_bicubic
        return Provider(name, lambda x, y, rho: gd_step_bicubic(x, y, rho, scale=op.scale))
    raise ValueError(f"provider: expected one of {OP_PROVIDERS[prob.op_name]} for op {prob.op_name!r}, "
                     f"got {name!r}")


def forward_fn(provider: Provider, prob: Problem) -> Callable[[], None]:
    def run_forward():
        with torch.no_grad():
            provider.step(prob.x, prob.y, prob.rho)
    return run_forward


def training_fn(provider: Provider, prob: Problem) -> Callable[[], None]:
    xg = prob.x.detach().requires_grad_()
    yg = prob.y.detach().requires_grad_()
    rg = prob.rho.detach().requires_grad_()

    def run_training():
        z = provider.step(xg, yg, rg)
        torch.autograd.grad(z, (xg, yg, rg), prob.g)
    return run_training


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------

def reference(prob: Problem) -> dict[str, torch.Tensor]:
    """float64 z and gradients (dx, dy, dρ) of the reference ``gd_step`` on the same rounded inputs."""
    x = prob.x.detach().double().requires_grad_()
    y = prob.y.detach().double().requires_grad_()
    rho = prob.rho.detach().double().requires_grad_()
    z = prob.ref_op.gd_step(x, y, rho)
    dx, dy, drho = torch.autograd.grad(z, (x, y, rho), prob.g.double())
    return {"z": z.detach(), "dx": dx, "dy": dy, "drho": drho}


def check_numerics(provider: Provider, prob: Problem, ref: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per pass: {"errors": {tensor: rel err}, "max": largest}."""
    with torch.no_grad():
        z = provider.step(prob.x, prob.y, prob.rho)
    forward_errors = {"z": harness.rel_err(z, ref["z"])}
    del z
    xg = prob.x.detach().requires_grad_()
    yg = prob.y.detach().requires_grad_()
    rg = prob.rho.detach().requires_grad_()
    z = provider.step(xg, yg, rg)
    dx, dy, drho = torch.autograd.grad(z, (xg, yg, rg), prob.g)
    rel_err = harness.rel_err
    train_errors = {"z": rel_err(z, ref["z"]), "dx": rel_err(dx, ref["dx"]), "dy": rel_err(dy, ref["dy"]),
                    "drho": rel_err(drho.reshape(()), ref["drho"].reshape(()))}
    return driver.numerics_summary(forward_errors, train_errors)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------

ROW_VALUE_KEYS = ("rel_err", "rel_errs", "tol", "p50_ms", "p20_ms", "p80_ms", "n", "round_spread", "gbps",
                  "frac_hbm_measured", "frac_hbm_datasheet", "tflops", "frac_peak_flops", "floor_ms", "frac_floor",
                  "peak_mem_bytes", "peak_mem_measure", "device_used_bytes", "t_over_eager")


def _precision(device: torch.device, dtype_name: str) -> str:
    return harness.precision_key(dtype_name, tf32=device.type == "cuda")


def _peak_key(op: str, precision: str) -> str:
    """CS runs its GEMMs on tensor cores at the row's precision; CASSI and SR are elementwise float32 arithmetic
    (16-bit inputs are upcast), so their compute ceiling is the non-tensor fp32 rate."""
    return precision if op == "cs" else "fp32"


def _shape_keys(op: str, side: int, batch: int, dtype_name: str, precision: str, m: int) -> dict:
    keys = {"op": op, "channels": op_channels(op), "height": side, "width": side, "batch": batch,
            "dtype": dtype_name, "precision": precision}
    if op == "cs":
        keys.update(m=m, ratio=CS_RATIO)
    elif op == "cassi":
        keys.update(bands=CASSI_BANDS)
    else:
        keys.update(scale=SR_SCALE)
    return keys


def run(device, quick: bool, *, ops: Sequence[str] | None = None, hw: Sequence[int] | None = None,
        batches: Sequence[int] | None = None, dtypes: Sequence[str] | None = None, rounds: int | None = None,
        warmup_ms: float | None = None, rep_ms: float | None = None, providers: Sequence[str] | None = None,
        passes: Sequence[str] | None = None, verbose: bool = False) -> list[dict]:
    """Run the benchmark; one row per op × provider × pass × size × dtype (see the module docstring).

    ``hw`` overrides the image sides of every op (CS included); ``passes`` times the named passes at every shape
    (by default the full GPU preset times forward+backward only at batch 16, 256²).

    Row keys: provider, op, pass, channels, height, width, batch, dtype, precision, m and ratio (cs), bands (cassi),
    scale (sr), operator (where Φ / the mask came from), layout, device, gpu, status ("ok", "skipped: needs CUDA",
    "failed numerics: ...", "error: ..."), numerics_ref, rel_err (largest), rel_errs (z; and dx, dy, drho), tol,
    p50_ms, p20_ms, p80_ms, n, round_spread, bytes_min, flops, gbps, frac_hbm_measured, frac_hbm_datasheet, tflops,
    frac_peak_flops, peak_key, floor_ms (max of bytes/datasheet bandwidth and FLOPs/datasheet peak), frac_floor
    (floor_ms / p50_ms), peak_mem_bytes, peak_mem_measure, device_used_bytes, t_over_eager (this row's p50 over
    eager's, same op, pass, size and dtype).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    preset = (GPU_QUICK if quick else GPU_FULL) if cuda else (CPU_QUICK if quick else CPU_FULL)
    cs_hw = tuple(hw) if hw is not None else preset.cs_hw  # an explicit hw applies to CS too
    sizes = Sizes(driver.pick(hw, preset.hw), cs_hw, driver.pick(batches, preset.batches),
                  driver.pick(dtypes, preset.dtypes),
                  rounds or preset.rounds, preset.warmup_ms if warmup_ms is None else warmup_ms,
                  preset.rep_ms if rep_ms is None else rep_ms,
                  None if passes is not None else preset.train_at)
    op_names = tuple(ops) if ops is not None else OPS
    driver.check_known("ops", op_names, OPS)
    if providers is not None:
        driver.check_known("providers", providers, PROVIDERS)
    pass_names = tuple(passes) if passes is not None else PASSES
    driver.check_known("passes", pass_names, PASSES)
    driver.check_known("dtypes", sizes.dtypes, DTYPES)

    gpu = torch.cuda.get_device_name(device) if cuda else None
    hbm = harness.hbm_bandwidth(device) if cuda else None
    rows: list[dict] = []
    # TF32 on for float32 on a GPU (cuBLAS and cuDNN; the fused CS rows ask for it explicitly); restored afterwards.
    with harness.tf32_mode(True) if cuda else contextlib.nullcontext():
        for op in op_names:
            names = tuple(p for p in OP_PROVIDERS[op] if providers is None or p in providers)
            if not names:
                continue
            sides = sizes.cs_hw if op == "cs" and sizes.cs_hw is not None else sizes.hw
            for dtype_name in sizes.dtypes:
                for side in sides:
                    for nb in sizes.batches:
                        shape_passes = tuple(p for p in pass_names if p == "forward" or sizes.train_at is None
                                             or (side, nb) == sizes.train_at)
                        try:
                            rows.extend(_run_shape(device, gpu, hbm, op, names, shape_passes, side, nb, dtype_name,
                                                   sizes, verbose))
                        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record it, go on
                            rows.extend(_error_rows(device, gpu, op, names, shape_passes, side, nb, dtype_name,
                                                    exc))
                            if cuda:
                                torch.cuda.empty_cache()
    return rows


def _cs_m() -> int:
    return _base_cs()[0].num_measurements


def _error_rows(device, gpu, op, names, passes, side, nb, dtype_name, exc) -> list[dict]:
    """Rows for a shape that could not be set up at all (the message says why)."""
    message = driver.error_status(exc)
    precision = _precision(device, dtype_name)
    shape = _shape_keys(op, side, nb, dtype_name, precision, _cs_m())
    return [dict({"provider": name, "pass": pass_, **shape, "operator": None, "layout": "contiguous",
                  "device": str(device), "gpu": gpu, "status": message, "numerics_ref": None,
                  "bytes_min": None, "flops": None, "peak_key": None},
                 **{k: None for k in ROW_VALUE_KEYS})
            for pass_ in passes for name in names]


def _run_shape(device, gpu, hbm, op, names, passes, side, nb, dtype_name, sizes: Sizes, verbose) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = DTYPES[dtype_name]
    precision = _precision(device, dtype_name)
    elem = torch.empty((), dtype=dtype).element_size()
    if verbose:
        print(f"[gd_step] {op} {side}x{side} N={nb} {dtype_name} ({precision}) on {device}", file=sys.stderr,
              flush=True)
    prob = make_problem(op, side, nb, dtype, device)
    m = prob.op.num_measurements if op == "cs" else _cs_m()
    peak_key = _peak_key(op, precision)
    spec = harness.gpu_spec(gpu) if cuda else None
    peak = spec[peak_key] if spec is not None else None
    counts = element_counts(op, nb, side, m=m)

    rows: dict[tuple[str, str], dict] = {}
    for name in names:
        for pass_ in passes:
            rows[(name, pass_)] = dict(
                {"provider": name, "pass": pass_, **_shape_keys(op, side, nb, dtype_name, precision, m),
                 "operator": prob.source, "layout": "contiguous", "device": str(device), "gpu": gpu,
                 "status": "ok", "numerics_ref": "float64 reference gd_step (x − ρ·Aᵀ(A x − y))",
                 "bytes_min": minimal_bytes(pass_, counts, elem),
                 "flops": flop_count(op, name, pass_, nb, side, m=m), "peak_key": peak_key},
                **{k: None for k in ROW_VALUE_KEYS})

    refs: dict[str, dict] = {}

    def build(name):
        provider = make_provider(name, prob, precision)
        if "ref" not in refs:
            refs["ref"] = reference(prob)
        return provider, check_numerics(provider, prob, refs["ref"])

    def fn_for(provider, pass_):
        return forward_fn(provider, prob) if pass_ == "forward" else training_fn(provider, prob)

    # The fused providers may also be off by up to 2× eager's error (docs/design.md, §7.3).
    driver.gate_and_measure(
        rows, names, passes, device=device, cuda_only=CUDA_ONLY, build=build,
        baseline_of=lambda name: "eager" if name in CUDA_ONLY else None,
        tolerance=BENCH_TOLERANCE[precision], fn_for=fn_for, sizes=sizes, hbm=hbm, spec=spec, peak=peak,
        ratios={"t_over_eager": "eager"})
    refs.clear()
    del prob
    if cuda:
        torch.cuda.empty_cache()
    return [rows[(name, pass_)] for pass_ in passes for name in names]


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    """A fixed-width table: one line per row; times p50 [p20, p80] ms; t/eager = this p50 over eager's p50."""
    head = (f"{'op':<8}{'provider':<15}{'pass':<8}{'C':>3}{'HxW':>8}{'N':>4} {driver.MEASUREMENT_HEADER}"
            f"{'t/eager':>8}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['height']}x{r['width']}"
        lines.append(
            f"{r['op']:<8}{r['provider']:<15}{driver.pass_label(r['pass']):<8}{r['channels']:>3}{size:>8}"
            f"{r['batch']:>4} {driver.measurement_cells(r, '.4f')}"
            f"{driver.fmt_ratio(r['t_over_eager']):>8}  {r['status']}")
    return "\n".join(lines)


def notes_for(device: torch.device, hbm: dict | None, rows: list[dict]) -> list[str]:
    sources = sorted({r["operator"] for r in rows if r.get("operator")})
    notes = ["Step z = x − ρ·Aᵀ(A x − y). cs: 33×33 blocks, m = 272 (25%), C = 1; cassi: 28 bands, step 2; "
             f"sr: ×{SR_SCALE}, {SR_KSIZE}×{SR_KSIZE} Gaussian σ={SR_SIGMA}, circular, C = {SR_CHANNELS}; "
             f"bicubic: ×{SR_SCALE} MATLAB imresize, C = {SR_CHANNELS}. "
             f"Operator data: {'; '.join(sources) if sources else '-'}.",
             "Times: interleaved rounds, median of per-round medians [p20, p80]; t/eager = p50 / eager's p50.",
             "bytes_min / flops: see minimal_bytes / flop_count docstrings; %HBM = bytes_min / time / measured copy "
             "bandwidth; %floor = max(bytes/datasheet BW, FLOPs/datasheet peak) / time (CS: tensor-core peak at "
             "the row's precision; CASSI, SR: the fp32 non-tensor rate).",
             "rel err: ‖out − ref‖/‖ref‖ against the float64 reference gd_step on the same inputs, largest over z "
             "(and dx, dy, dρ). fwd+bwd: grads of x, y and ρ given a random G.",
             "ista-mm forms ΦᵀΦ and y·Φ in every call (ISTA-Net does it once per network forward); fused-one-gemm's "
             "ΦᵀΦ is cached per Φ."]
    if device.type == "cuda":
        notes.append("float32 = TF32 (cudnn/matmul allow_tf32 True, fused CS input_precision='tf32'); timings are "
                     "CUDA events via triton.testing.do_bench (L2 flushed before each call: host-side launch cost "
                     "up to the flush's duration is hidden); mem = allocator peak above what was allocated before "
                     "the call. The full preset times fwd+bwd at batch 16, 256² only.")
        if hbm is not None:
            notes.append(driver.hbm_note(hbm))
    else:
        notes.append("CPU run at reduced sizes (CS 66×66 = 2×2 blocks, CASSI and SR 64×64) with host-clock "
                     "timings; the fused providers need CUDA (skipped); float32 is IEEE; mem = bytes autograd saves "
                     "for backward (fwd+bwd rows only), inputs included.")
    return notes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    driver.add_common_options(parser, quick_help="one shape (GPU: batch 16, 256²; CPU: batch 1)", dtypes=DTYPES,
                              providers=PROVIDERS)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=None, help="which steps (default: all)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=None,
                        help="time these passes at every shape (default: the preset's)")
    args = parser.parse_args(argv)
    driver.check_common_options(parser, args)
    if args.hw is not None and any(v % SR_SCALE for v in args.hw):
        parser.error(f"--hw: SR needs sides that are multiples of its scale {SR_SCALE}, got {args.hw}")
    if args.hw is not None and (args.ops is None or "cs" in args.ops) and any(v < CS_BLOCK for v in args.hw):
        parser.error(f"--hw: CS needs sides ≥ one {CS_BLOCK}×{CS_BLOCK} block, got {args.hw}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return driver.run_main(
        args, name="gd_step", title="one gradient-descent step (CS, CASSI, SR, bicubic SR)",
        format_table=format_table, notes=notes_for,
        run=lambda device: run(device, args.quick, ops=args.ops, hw=args.hw, batches=args.batch,
                               dtypes=args.dtypes, rounds=args.rounds, rep_ms=args.rep_ms,
                               providers=args.providers, passes=args.passes, verbose=True))


if __name__ == "__main__":
    sys.exit(main())

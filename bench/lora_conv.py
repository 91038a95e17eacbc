"""One LoRA convolution layer, five ways: plain conv, peft-style unfused, merge + cuDNN, fused Triton (two designs).

    python bench/lora_conv.py                 # GPU: C ∈ {16, 32, 64}, 256² and 512², batch 1 and 16, fp32/TF32 + bf16
    python bench/lora_conv.py --quick         # GPU: C=32, 256², batch 16, both dtypes (the NOTES.md shape)
    python bench/lora_conv.py --out DIR       # also write DIR/results.json and DIR/report.md

On a CPU it runs the CPU-capable providers (conv, peft-unfused, merged-cudnn — which is merge + F.conv2d on the CPU,
not cuDNN there) at reduced sizes in seconds, with host-clock timings, and reports the fused-triton rows as
"skipped: needs CUDA". ``run(device, quick)`` returns the rows for other scripts (``bench/run.py``).

Providers (the baselines come from ``lorun_fast.reference`` so they never drift from the tested reference):

- ``conv``: ``F.conv2d(x, W)`` without LoRA — the cost of the layer itself. Its forward+backward computes dx and dW
  (a trainable plain conv): the same gradient work as the LoRA providers, which need the full ``dW_eff`` reduction.
- ``peft-unfused``: ``LoRAConv2d.forward``: ``base(x) + s·B(A(x))``, three convolutions and an r-channel activation.
- ``merged-cudnn``: ``merged_conv``: ``W + s·B·A`` formed with torch, then one ``F.conv2d`` (cuDNN on a GPU);
  autograd through the merge gives dA and dB.
- ``fused-triton``: ``lorun_fast.kernels.lora_conv.fused_lora_conv2d`` with the v2 design (merge once per launch,
  haloed x tile read once per Ci chunk, all-taps dW with the ReLU mask inside the kernels); CUDA only here.
- ``fused-triton-v1``: the same function with the v1 design (merge per tile, nine shifted x loads, one tap per dW
  program), selected with ``lorun_fast.kernels.settings.use_conv_kernel("v1")``; CUDA only here. The two rows time
  the designs side by side in one run.

Passes: ``forward`` (inference, under ``torch.no_grad()``) and ``forward+backward`` (training with the base frozen and
the adapters trainable: ``torch.autograd.grad`` of ``y`` for x, A and B given a random ``dy``; conv: x and W).

Every tensor is channels_last (x, dy, the weights), for every provider. float32 runs with TF32 enabled on a GPU
(``torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True``, Triton
``input_precision="tf32"``; the previous settings are restored afterwards) and is recorded as precision "tf32";
on a CPU float32 is IEEE ("fp32"). bfloat16 multiplies in bf16 with float32 accumulation ("bf16").

Numerics before timing: each provider's output (and, for forward+backward, its gradients) on the benchmark inputs
is compared with a float64 computation of the same function on the same (already rounded) inputs — the merged
formula ``conv(x, W + s·B·A)`` for the LoRA providers, ``conv(x, W)`` for ``conv`` — as ‖out − ref‖ / ‖ref‖ (the
largest over y, dx, dA, dB / dW). A provider over its tolerance (fp32 1e-4, tf32 5e-3, bf16 3e-2, fp16 1e-2; for
the fused-triton rows also docs/design.md, §7.3's "2× the error of merged-cudnn", whichever is larger), or with a NaN, gets status
"failed numerics" and no timing, so a wrong kernel cannot produce a fast row silently.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import driver
import harness
from lorun_fast.testing import BENCH_TOLERANCE
from lorun_fast.reference import LoRAConv2d, lora_rank, merged_conv

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = ("conv", "peft-unfused", "merged-cudnn", "fused-triton", "fused-triton-v1")
CUDA_ONLY = ("fused-triton", "fused-triton-v1")
PASSES = ("forward", "forward+backward")
LORA_PROVIDERS = ("peft-unfused", "merged-cudnn", "fused-triton", "fused-triton-v1")
GAMMA = 10.0
KSIZE = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    channels: tuple[int, ...]
    hw: tuple[int, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    rounds: int
    warmup_ms: float
    rep_ms: float


GPU_FULL = Sizes((16, 32, 64), (256, 512), (1, 16), ("float32", "bfloat16"), rounds=5, warmup_ms=25, rep_ms=100)
GPU_QUICK = Sizes((32,), (256,), (16,), ("float32", "bfloat16"), rounds=3, warmup_ms=25, rep_ms=50)
CPU_FULL = Sizes((16, 32, 64), (64,), (1,), ("float32",), rounds=3, warmup_ms=10, rep_ms=40)
CPU_QUICK = Sizes((16,), (64,), (1,), ("float32",), rounds=3, warmup_ms=5, rep_ms=15)


# --------------------------------------------------------------------------------------------------------------------
# Counting: minimal bytes and FLOPs
# --------------------------------------------------------------------------------------------------------------------

def minimal_bytes(provider: str, pass_: str, n: int, c_in: int, c_out: int, h: int, w: int, rank: int,
                  elem: int, taps: int = KSIZE * KSIZE) -> int:
    """Fewest bytes the problem must move through device memory (each input read once, each output written once).

    With P = N·H·W pixels, e = bytes per element, |W| = Co·Ci·taps, |A| = r·Ci·taps, |B| = Co·r:

        forward,  LoRA providers:  e·(P·Ci [x read] + P·Co [y written] + |W| + |A| + |B|)
        forward,  conv:            e·(P·Ci + P·Co + |W|)
        fwd+bwd,  LoRA providers:  forward + e·(P·Co [dy read] + P·Ci [x re-read for dW_eff] + P·Ci [dx written]
                                              + |W| + |A| + |B| [weights re-read] + |A| + |B| [dA, dB written])
        fwd+bwd,  conv:            forward + e·(P·Co + P·Ci + P·Ci + |W| [W re-read] + |W| [dW written])

    The same number for every LoRA provider of a pass (it is the problem's floor, not what a provider moves), so the
    achieved GB/s of each row is an effective bandwidth and rows compare directly. For a 3×3 layer with Ci = Co = C
    the activations dominate: forward ≈ 2·P·C·e, forward+backward ≈ 5·P·C·e.
    """
    p = n * h * w
    weights = c_out * c_in * taps
    adapters = rank * c_in * taps + c_out * rank
    lora = provider != "conv"
    fwd = p * c_in + p * c_out + weights + (adapters if lora else 0)
    if pass_ == "forward":
        return elem * fwd
    bwd = p * c_out + 2 * p * c_in + (weights + 2 * adapters if lora else 2 * weights)
    return elem * (fwd + bwd)


def flop_count(provider: str, pass_: str, n: int, c_in: int, c_out: int, h: int, w: int, rank: int,
               taps: int = KSIZE * KSIZE) -> int:
    """Multiply-add FLOPs (×2) of the provider's algorithm; a conv is 2·N·H·W·Co·Ci·taps.

    With F = 2·P·Co·Ci·taps (the base conv), M = 2·Co·r·Ci·taps (forming B·A), Fa = 2·P·r·Ci·taps (x → r channels),
    Fb = 2·P·Co·r (r → Co, 1×1):

        conv:                 forward F;              fwd+bwd 3F (y, dx, dW)
        merged / fused:       forward F + M;          fwd+bwd 3F + 3M (y, dx, dW_eff; merge, dA = s·Bᵀ dW_eff,
                                                                        dB = s·dW_eff Aᵀ)
        peft-unfused:         forward F + Fa + Fb;    fwd+bwd 2F + 3·(Fa + Fb) (base frozen: no base dW; the
                                                                                 adapters' y, d-input and d-weight)

    The unfused form does *fewer* FLOPs in training (no full-size weight gradient) but moves far more bytes; the
    elementwise scale and add of the unfused form are not counted.
    """
    p = n * h * w
    base = 2 * p * c_out * c_in * taps
    merge = 2 * c_out * rank * c_in * taps
    fa = 2 * p * rank * c_in * taps
    fb = 2 * p * c_out * rank
    fwd_pass = pass_ == "forward"
    if provider == "conv":
        return base if fwd_pass else 3 * base
    if provider == "peft-unfused":
        return base + fa + fb if fwd_pass else 2 * base + 3 * (fa + fb)
    return base + merge if fwd_pass else 3 * base + 3 * merge


# --------------------------------------------------------------------------------------------------------------------
# Problem and providers
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Problem:
    layer: LoRAConv2d
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor  # frozen base weight
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


def make_problem(channels: int, hw: int, batch: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> Problem:
    """A 3×3 'same' LoRA conv (Ci = Co = C, rank by the paper's rule with γ=10) on fresh random channels_last data.

    B is drawn random (not peft's zero init) so the low-rank path contributes as much as the base and a wrong LoRA
    path cannot hide: W, A ~ kaiming-uniform (a=√5), B ~ N(0, 1/r), x, dy ~ N(0, 1).
    """
    rank = lora_rank(channels, channels, GAMMA)
    torch.manual_seed(seed)
    base = nn.Conv2d(channels, channels, KSIZE, padding=KSIZE // 2, bias=False)
    layer = LoRAConv2d(base, num_stages=1, rank=rank, gamma=GAMMA)
    with torch.no_grad():
        layer.lora_B["0"].weight.copy_(torch.randn(channels, rank, 1, 1) / math.sqrt(rank))
    layer.freeze_base()
    layer = layer.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    shape = (batch, channels, hw, hw)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    dy = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return Problem(layer=layer, x=x.contiguous(memory_format=torch.channels_last),
                   dy=dy.contiguous(memory_format=torch.channels_last), weight=layer.base_layer.weight,
                   lora_a=layer.lora_A["0"].weight, lora_b=layer.lora_B["0"].weight, scaling=layer.scaling)


@dataclass
class Provider:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: tuple[torch.Tensor, ...]  # trainable tensors whose gradients fwd+bwd computes, besides x
    grad_names: tuple[str, ...]       # names of (x, *params) gradients


def make_provider(name: str, prob: Problem, device: torch.device, precision: str) -> Provider:
    layer = prob.layer
    if name == "conv":
        w_train = prob.weight.detach().clone(memory_format=torch.channels_last).requires_grad_()
        return Provider(name, lambda x: F.conv2d(x, w_train, None, 1, KSIZE // 2), (w_train,), ("dx", "dW"))
    if name == "peft-unfused":
        return Provider(name, lambda x: layer(x, 0), (prob.lora_a, prob.lora_b), ("dx", "dA", "dB"))
    if name == "merged-cudnn":
        return Provider(name, lambda x: merged_conv(layer, x, 0), (prob.lora_a, prob.lora_b), ("dx", "dA", "dB"))
    if name in ("fused-triton", "fused-triton-v1"):
        from lorun_fast.kernels.lora_conv import fused_lora_conv2d  # imported only on CUDA (see run())
        from lorun_fast.kernels.settings import use_conv_kernel
        input_precision = "tf32" if precision == "tf32" else "ieee"
        version = "v1" if name.endswith("-v1") else "v2"

        def fused(x):
            # The backward runs the design its forward ran (the op remembers it).
            with use_conv_kernel(version):
                return fused_lora_conv2d(x, prob.weight, prob.lora_a, prob.lora_b, prob.scaling,
                                         padding=KSIZE // 2, input_precision=input_precision)
        return Provider(name, fused, (prob.lora_a, prob.lora_b), ("dx", "dA", "dB"))
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")


def forward_fn(provider: Provider, x: torch.Tensor) -> Callable[[], None]:
    def run_forward():
        with torch.no_grad():
            provider.forward(x)
    return run_forward


def training_fn(provider: Provider, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    xg = x.detach().requires_grad_()

    def run_training():
        y = provider.forward(xg)
        torch.autograd.grad(y, (xg, *provider.params), dy)
    return run_training


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------

def reference(prob: Problem, lora: bool) -> dict[str, torch.Tensor]:
    """float64 y and gradients of the same function on the same inputs (merged formula, or plain conv)."""
    x = prob.x.detach().double().requires_grad_()
    w = prob.weight.detach().double()
    pad = KSIZE // 2
    if lora:
        a = prob.lora_a.detach().double().requires_grad_()
        b = prob.lora_b.detach().double().requires_grad_()
        co, r = w.shape[0], a.shape[0]
        wk = w + prob.scaling * (b.reshape(co, r) @ a.reshape(r, -1)).view_as(w)
        y = F.conv2d(x, wk, None, 1, pad)
        dx, da, db = torch.autograd.grad(y, (x, a, b), prob.dy.double())
        return {"y": y.detach(), "dx": dx, "dA": da, "dB": db}
    w.requires_grad_()
    y = F.conv2d(x, w, None, 1, pad)
    dx, dw = torch.autograd.grad(y, (x, w), prob.dy.double())
    return {"y": y.detach(), "dx": dx, "dW": dw}


def check_numerics(provider: Provider, prob: Problem, ref: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per pass: {"errors": {tensor: rel err}, "max": largest}."""
    with torch.no_grad():
        y = provider.forward(prob.x)
    forward_errors = {"y": harness.rel_err(y, ref["y"])}
    del y
    xg = prob.x.detach().requires_grad_()
    y = provider.forward(xg)
    grads = torch.autograd.grad(y, (xg, *provider.params), prob.dy)
    train_errors = {"y": harness.rel_err(y, ref["y"])}
    train_errors.update({name: harness.rel_err(g, ref[name]) for name, g in zip(provider.grad_names, grads)})
    return driver.numerics_summary(forward_errors, train_errors)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------

def run(device, quick: bool, *, channels: Sequence[int] | None = None, hw: Sequence[int] | None = None,
        batches: Sequence[int] | None = None, dtypes: Sequence[str] | None = None, rounds: int | None = None,
        warmup_ms: float | None = None, rep_ms: float | None = None, providers: Sequence[str] | None = None,
        verbose: bool = False) -> list[dict]:
    """Run the benchmark; one row per provider × pass × size × dtype (see the module docstring).

    Row keys: provider, pass, channels, rank, height, width, batch, dtype, precision, layout, device, gpu, status
    ("ok", "skipped: needs CUDA", "failed numerics: ...", "error: ..."), numerics_ref, rel_err (largest), rel_errs
    (per tensor), tol, p50_ms, p20_ms, p80_ms, n, round_spread, bytes_min, flops, gbps, frac_hbm_measured,
    frac_hbm_datasheet, tflops, frac_peak_flops, floor_ms (max of bytes/datasheet bandwidth and FLOPs/datasheet peak),
    frac_floor (floor_ms / p50_ms), peak_mem_bytes, peak_mem_measure, device_used_bytes, t_over_conv, t_over_unfused,
    t_over_merged (this row's p50 over that provider's, same pass, size and dtype).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    preset = (GPU_QUICK if quick else GPU_FULL) if cuda else (CPU_QUICK if quick else CPU_FULL)
    sizes = Sizes(driver.pick(channels, preset.channels), driver.pick(hw, preset.hw),
                  driver.pick(batches, preset.batches), driver.pick(dtypes, preset.dtypes), rounds or preset.rounds,
                  preset.warmup_ms if warmup_ms is None else warmup_ms, preset.rep_ms if rep_ms is None else rep_ms)
    names = tuple(providers) if providers is not None else PROVIDERS
    driver.check_known("providers", names, PROVIDERS)
    driver.check_known("dtypes", sizes.dtypes, DTYPES)

    gpu = torch.cuda.get_device_name(device) if cuda else None
    hbm = harness.hbm_bandwidth(device) if cuda else None
    rows: list[dict] = []
    # TF32 on for float32 on a GPU (cuDNN and cuBLAS; the Triton rows ask for it explicitly); restored afterwards.
    with harness.tf32_mode(True) if cuda else contextlib.nullcontext():
        for dtype_name in sizes.dtypes:
            for c in sizes.channels:
                for side in sizes.hw:
                    for nb in sizes.batches:
                        try:
                            rows.extend(_run_shape(device, gpu, hbm, names, c, side, nb, dtype_name, sizes,
                                                   verbose))
                        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record it, go on
                            rows.extend(_error_rows(device, gpu, names, c, side, nb, dtype_name, exc))
                            if cuda:
                                torch.cuda.empty_cache()
    return rows


def _error_rows(device, gpu, names, c, side, nb, dtype_name, exc) -> list[dict]:
    """Rows for a shape that could not be set up at all (the message says why)."""
    message = driver.error_status(exc)
    rank = lora_rank(c, c, GAMMA)
    precision = harness.precision_key(dtype_name, tf32=device.type == "cuda")
    keys = ("rel_err", "rel_errs", "tol", "p50_ms", "p20_ms", "p80_ms", "n", "round_spread", "bytes_min", "flops",
            "gbps", "frac_hbm_measured", "frac_hbm_datasheet", "tflops", "frac_peak_flops", "floor_ms", "frac_floor",
            "peak_mem_bytes", "peak_mem_measure", "device_used_bytes", "t_over_conv", "t_over_unfused",
            "t_over_merged")
    return [dict({"provider": name, "pass": pass_, "channels": c, "rank": rank, "height": side, "width": side,
                  "batch": nb, "dtype": dtype_name, "precision": precision, "layout": "channels_last",
                  "device": str(device), "gpu": gpu, "status": message, "numerics_ref": None},
                 **{k: None for k in keys})
            for pass_ in PASSES for name in names]


def _run_shape(device, gpu, hbm, names, c, side, nb, dtype_name, sizes: Sizes, verbose) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = DTYPES[dtype_name]
    precision = harness.precision_key(dtype_name, tf32=cuda)
    rank = lora_rank(c, c, GAMMA)
    elem = torch.empty((), dtype=dtype).element_size()
    if verbose:
        print(f"[lora_conv] C={c} r={rank} {side}x{side} N={nb} {dtype_name} ({precision}) on {device}",
              file=sys.stderr, flush=True)
    prob = make_problem(c, side, nb, dtype, device)
    peak = harness.peak_flops(device, precision) if cuda else None
    spec = harness.gpu_spec(gpu) if cuda else None

    rows: dict[tuple[str, str], dict] = {}
    for name in names:
        for pass_ in PASSES:
            rows[(name, pass_)] = {
                "provider": name, "pass": pass_, "channels": c, "rank": rank, "height": side, "width": side,
                "batch": nb, "dtype": dtype_name, "precision": precision, "layout": "channels_last",
                "device": str(device), "gpu": gpu, "status": "ok",
                "numerics_ref": "float64 conv(x, W)" if name == "conv" else "float64 conv(x, W + s·B·A)",
                "rel_err": None, "rel_errs": None, "tol": None,
                "p50_ms": None, "p20_ms": None, "p80_ms": None, "n": None, "round_spread": None,
                "bytes_min": minimal_bytes(name, pass_, nb, c, c, side, side, rank, elem),
                "flops": flop_count(name, pass_, nb, c, c, side, side, rank),
                "gbps": None, "frac_hbm_measured": None, "frac_hbm_datasheet": None, "tflops": None,
                "frac_peak_flops": None, "floor_ms": None, "frac_floor": None,
                "peak_mem_bytes": None, "peak_mem_measure": None, "device_used_bytes": None,
                "t_over_conv": None, "t_over_unfused": None, "t_over_merged": None}

    refs: dict[bool, dict] = {}

    def build(name):
        provider = make_provider(name, prob, device, precision)
        lora = name != "conv"
        if lora not in refs:
            refs[lora] = reference(prob, lora)
        return provider, check_numerics(provider, prob, refs[lora])

    def fn_for(provider, pass_):
        return forward_fn(provider, prob.x) if pass_ == "forward" else training_fn(provider, prob.x, prob.dy)

    # The fused rows may also be off by up to 2× merged-cudnn's error (docs/design.md, §7.3).
    driver.gate_and_measure(
        rows, names, PASSES, device=device, cuda_only=CUDA_ONLY, build=build,
        baseline_of=lambda name: "merged-cudnn" if name.startswith("fused-triton") else None,
        tolerance=BENCH_TOLERANCE[precision], fn_for=fn_for, sizes=sizes, hbm=hbm, spec=spec, peak=peak,
        ratios={"t_over_conv": "conv", "t_over_unfused": "peft-unfused", "t_over_merged": "merged-cudnn"})
    refs.clear()
    del prob
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [rows[(name, pass_)] for pass_ in PASSES for name in names]


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    """A fixed-width table: one line per row; times p50 [p20, p80] ms; t/x = this p50 over provider x's p50."""
    ratio = driver.fmt_ratio
    head = (f"{'provider':<17}{'pass':<8}{'C':>3}{'r':>3}{'HxW':>8}{'N':>4} {driver.MEASUREMENT_HEADER}"
            f"{'t/conv':>7}{'t/unf':>7}{'t/mrg':>7}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['height']}x{r['width']}"
        lines.append(
            f"{r['provider']:<17}{driver.pass_label(r['pass']):<8}{r['channels']:>3}{r['rank']:>3}{size:>8}"
            f"{r['batch']:>4} {driver.measurement_cells(r, '.3f')}"
            f"{ratio(r['t_over_conv']):>7}{ratio(r['t_over_unfused']):>7}{ratio(r['t_over_merged']):>7}"
            f"  {r['status']}")
    return "\n".join(lines)


def notes_for(device: torch.device, hbm: dict | None) -> list[str]:
    notes = ["All tensors channels_last. Times: interleaved rounds, median of per-round medians [p20, p80].",
             "bytes_min / flops: see minimal_bytes / flop_count docstrings; %HBM = bytes_min / time / measured copy "
             "bandwidth; %floor = max(bytes/datasheet BW, FLOPs/datasheet peak) / time.",
             "rel err: ‖out − ref‖/‖ref‖ against float64 on the same inputs, largest over y (and dx, dA, dB / dW).",
             "fwd+bwd: grads of x, A, B (base frozen); conv: grads of x and W (same dW work as the LoRA paths)."]
    if device.type == "cuda":
        notes.append("float32 = TF32 (cudnn/matmul allow_tf32 True, Triton input_precision='tf32'); timings are "
                     "CUDA events via triton.testing.do_bench (L2 flushed before each call); mem = allocator peak "
                     "above what was allocated before the call.")
        if hbm is not None:
            notes.append(driver.hbm_note(hbm))
    else:
        notes.append("CPU run at reduced sizes with host-clock timings; 'merged-cudnn' is merge + F.conv2d on the "
                     "CPU (not cuDNN); fused-triton(-v1) need CUDA (skipped); float32 is IEEE; mem = bytes autograd "
                     "saves for backward (fwd+bwd rows only), inputs and weights included.")
    return notes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    driver.add_common_options(parser, quick_help="one shape (GPU: C=32, 256², batch 16; CPU: C=16, 64²)",
                              dtypes=DTYPES, providers=PROVIDERS)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="override C values")
    args = parser.parse_args(argv)
    driver.check_common_options(parser, args, ("channels", "hw", "batch"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return driver.run_main(
        args, name="lora_conv", title="single LoRA conv layer", format_table=format_table,
        run=lambda device: run(device, args.quick, channels=args.channels, hw=args.hw, batches=args.batch,
                               dtypes=args.dtypes, rounds=args.rounds, rep_ms=args.rep_ms,
                               providers=args.providers, verbose=True),
        notes=lambda device, hbm, rows: notes_for(device, hbm))


if __name__ == "__main__":
    sys.exit(main())

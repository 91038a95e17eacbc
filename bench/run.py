"""The benchmark report: LoRun against full-parameter DUNs, side by side in one run.

    python bench/run.py --stages 9                       # CS 25%, ResUNet; reduced sizes on a CPU (< 3 min)
    python bench/run.py --task cassi --compile --checkpointing --out DIR

Providers (one DUN shape, one strategy or implementation each; all timed interleaved):

- ``block``: K independent denoisers, eager (the full-parameter Block-K baseline);
- ``shared``: one weight-tied denoiser, eager;
- ``lorun-reference``: shared frozen base + per-stage adapters, peft-style unfused LoRA, eager;
- ``lorun-merged``: the same weights through ``FusedLoRunConv(backend="merged")``: merge with torch, then cuDNN
  (inference reuses each stage's merged weight from the layer's cache; training merges with autograd every step);
- ``lorun-fused``: the same weights through ``FusedLoRunConv(backend="auto")``: the fused Triton convolution
  (the design ``LORUN_FAST_CONV_KERNEL`` selects, v2 by default) for 3×3 layers (ReLU and skip fused into residual
  blocks), cuDNN for the 2×2 down/up layers; fast GD steps when available. CUDA only.

With ``--compile`` each provider also runs under ``torch.compile`` (``<name>+compile``); with ``--checkpointing``
training rows are also measured with per-stage activation checkpointing (``<name>+ckpt``).

Sections of the report: model rows (parameters; inference and training-step latency, throughput and peak memory
with a breakdown), a stage sweep 1..N (parameters and training memory of ``block`` vs ``lorun``), and the kernel
rows of the single-layer benchmarks (``bench/lora_conv.py``, ``bench/gd_step.py``). ``results.json`` follows
the schema in ``bench/report.py``; ``report.md`` and PNG plots sit beside it.

On a CPU the sizes are reduced (and the report says so), timings use the host clock, and memory is counted
exactly from what autograd saves plus parameters, gradients and Adam state; CUDA-only providers are listed as
skipped with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import driver
import harness
import report
from lorun_fast.io import data_root
from lorun_fast.models import ModelConfig, build_dun, lorun_from, to_fast
from lorun_fast.reference import CASSI, DUN, BlockCS, SuperResolution, gaussian_kernel

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = ("block", "shared", "lorun-reference", "lorun-merged", "lorun-fused")
CUDA_ONLY = ("lorun-fused",)
TASKS = ("cs", "cassi", "sr")


@dataclass(frozen=True)
class Size:
    """The DUN and input sizes of one run."""
    height: int
    width: int
    channels: int          # ResUNet width c (levels c, 2c, 4c, 8c)
    num_blocks: int        # residual blocks per level
    batches: tuple[int, ...]  # latency batch first, throughput batch last
    rounds: int
    rep_ms: float
    min_reps: int


FULL = Size(height=256, width=256, channels=16, num_blocks=2, batches=(1, 8), rounds=5, rep_ms=200, min_reps=5)
REDUCED = Size(height=66, width=66, channels=8, num_blocks=1, batches=(1, 2), rounds=3, rep_ms=30, min_reps=2)
CASSI_BANDS = 28


def make_task(task: str, size: Size):
    """The operator and the image channel count (shared data when present, seeded stand-ins otherwise)."""
    root = data_root()
    if task == "cs":
        phi = root / "cs_sampling" / "phi_0_25_1089.mat"
        return (BlockCS.from_mat(phi) if phi.is_file() else BlockCS.gaussian(0.25, seed=0)), 1
    if task == "cassi":
        mask_file = root / "cassi" / "mask.mat"
        if mask_file.is_file() and size.height <= 256 and size.width <= 256:
            mask = CASSI.from_mat(mask_file).mask[: size.height, : size.width]
        else:
            mask = torch.rand(size.height, size.width, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)
        return CASSI(mask, num_bands=CASSI_BANDS, step=2), CASSI_BANDS
    if task == "sr":
        return SuperResolution(gaussian_kernel(7, 1.6), scale=2), 1
    raise ValueError(f"--task: expected one of {TASKS}, got {task!r}")


def build_models(operator, in_channels: int, stages: int, size: Size, device, dtype) -> dict[str, DUN]:
    """Every provider's model, with shared weights where the strategies allow: ``block`` starts with K copies of
    the shared denoiser (so block == shared at start), the three ``lorun-*`` share one set of adapters (random B,
    so the low-rank path is really computed)."""
    config = ModelConfig(strategy="shared", num_stages=stages, backbone="resunet",
                         backbone_kwargs={"in_channels": in_channels, "channels": size.channels,
                                          "num_blocks": size.num_blocks})
    torch.manual_seed(0)
    shared = build_dun(operator, config)
    block = DUN(operator, [copy.deepcopy(shared.denoisers[0]) for _ in range(stages)], stages, "block")
    block.rho.data.copy_(shared.rho.data)
    block.config = ModelConfig(**{**config.to_dict(), "strategy": "block"})
    lorun = lorun_from(shared)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lorun.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    models = {"block": block, "shared": shared, "lorun-reference": lorun,
              "lorun-merged": to_fast(lorun, backend="merged"), "lorun-fused": to_fast(lorun, backend="auto")}
    return {name: m.to(device=device, dtype=dtype) for name, m in models.items()}


def _inputs(operator, in_channels, batch, size: Size, device, dtype):
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(batch, in_channels, size.height, size.width, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        return x, operator.A(x)


def model_bytes(model: DUN) -> dict:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"parameters": params, "gradients": grads, "optimizer": 2 * grads}  # Adam: exp_avg + exp_avg_sq


def make_step_fns(model, operator, x, y, image_size):
    """(inference, training step) callables for one model and batch."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def infer():
        with torch.no_grad():
            model(y, image_size)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(y, image_size), x).backward()
        optimizer.step()

    return infer, train_step


def measure_memory(name, model, fns, x, y, image_size, device) -> dict:
    """Peak memory of inference and of one training step, with a breakdown. On CUDA the peaks are the caching
    allocator's (absolute: parameters, gradients and Adam state included) and NVML's device-wide figure; on a CPU
    the training peak is the sum of the breakdown (exact byte counts) and inference is not measured."""
    infer, train_step = fns
    train_step()  # Adam state exists from here on, as in any step after the first
    breakdown = model_bytes(model)
    model.train()
    breakdown["activations"] = harness.saved_activation_bytes(lambda: model(y, image_size))
    out = {"breakdown": breakdown, "inference_peak": None, "train_peak": None, "device_used": None,
           "measure": "cpu-exact-sum (parameters + gradients + Adam state + saved activations)"}
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        out["inference_peak"] = before + harness.peak_memory(infer, device)["bytes"]
        train = harness.peak_memory(train_step, device)
        out["train_peak"] = before + train["bytes"]
        out["device_used"] = train["device_used_bytes"]
        out["measure"] = "cuda-allocator-peak (absolute, parameters and optimizer state included)"
    else:
        out["train_peak"] = sum(breakdown.values())
    return out


def run_models(models, operator, in_channels, size: Size, device, dtype, compile_: bool, checkpointing: bool,
               status: dict[str, str]) -> list[dict]:
    rows = []
    image_size = (size.height, size.width)
    variants = {}
    for name, model in models.items():
        if name in status:
            continue
        variants[name] = model
        if compile_:
            variants[f"{name}+compile"] = model  # compiled per batch below; same weights
    for batch in size.batches:
        x, y = _inputs(operator, in_channels, batch, size, device, dtype)
        infer_fns, train_fns, memory = {}, {}, {}
        for name, model in variants.items():
            target = torch.compile(model) if name.endswith("+compile") else model
            fns = make_step_fns(target, operator, x, y, image_size)
            infer_fns[name], train_fns[name] = fns
            memory[name] = measure_memory(name, model, fns, x, y, image_size, device)
            if checkpointing and not name.endswith("+compile"):
                ckpt = copy.deepcopy(model)
                ckpt.checkpoint_stages = True
                ckpt_fns = make_step_fns(ckpt, operator, x, y, image_size)
                train_fns[f"{name}+ckpt"] = ckpt_fns[1]
                memory[f"{name}+ckpt"] = measure_memory(name, ckpt, ckpt_fns, x, y, image_size, device)
        timing = {"rounds": size.rounds, "device": device, "rep_ms": size.rep_ms, "min_reps": size.min_reps,
                  "warmup_ms": 0.0}  # one warm-up call: every step already ran once in measure_memory
        timing_infer = harness.interleaved(infer_fns, **timing)
        timing_train = harness.interleaved(train_fns, **timing)
        for name in train_fns:
            base = name.split("+")[0]
            rows.extend(report.model_rows(name, models[base], batch, size, memory[name],
                                          timing_infer.get(name), timing_train[name]))
    for name, reason in status.items():
        rows.append(report.row("model", name, "skipped", None, "", {"batch": None}, status=reason))
    return rows


def stage_sweep(operator, in_channels, stages: int, size: Size, device, dtype) -> list[dict]:
    """Parameters and training memory vs number of stages for block and lorun (the paper's core claim)."""
    rows = []
    batch = size.batches[-1]
    x, y = _inputs(operator, in_channels, batch, size, device, dtype)
    for k in range(1, stages + 1):
        models = build_models(operator, in_channels, k, size, device, dtype)
        for name in ("block", "lorun-reference") + (("lorun-fused",) if device.type == "cuda" else ()):
            model = models[name]
            fns = make_step_fns(model, operator, x, y, (size.height, size.width))
            memory = measure_memory(name, model, fns, x, y, (size.height, size.width), device)
            counts = model.parameter_counts()
            shape = {"stages": k, "batch": batch, "height": size.height, "width": size.width}
            rows.append(report.row("sweep", name, "params_total", counts["total"], "count", shape))
            rows.append(report.row("sweep", name, "params_trainable", counts["trainable"], "count", shape))
            rows.append(report.row("sweep", name, "memory_train_peak", memory["train_peak"], "bytes", shape,
                                   extra={"measure": memory["measure"], **memory["breakdown"]}))
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def kernel_rows(device, quick: bool) -> tuple[list[dict], list[str]]:
    """The single-layer benchmarks' rows, converted to report rows; a benchmark that is missing or fails is said."""
    rows, notes = [], []
    for module_name, label in (("lora_conv", "lora-conv"), ("gd_step", "gd-step")):
        try:
            module = __import__(module_name)
        except ImportError as err:
            notes.append(f"kernel benchmark {module_name} not available ({err})")
            continue
        try:
            raw = module.run(device, quick=quick)
        except Exception as err:  # noqa: BLE001 - one failing benchmark must not hide the others
            notes.append(f"kernel benchmark {module_name} failed: {type(err).__name__}: {err}")
            continue
        rows.extend(report.kernel_rows(label, raw))
    return rows, notes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=9, help="DUN stages K (default 9)")
    parser.add_argument("--task", default="cs", help="cs (25%%, default), cassi or sr (×2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="model precision (float32 runs with TF32 allowed on a GPU)")
    parser.add_argument("--compile", action="store_true", help="also run every provider under torch.compile")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also measure training with per-stage activation checkpointing")
    parser.add_argument("--full", action="store_true", help="full sizes even on a CPU (slow)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the 1..N stage sweep")
    parser.add_argument("--no-kernels", action="store_true", help="skip the single-kernel rows")
    parser.add_argument("--kernel-grid", choices=("quick", "full"), default="quick",
                        help="single-kernel shapes: quick (the NOTES.md shape; default) or the full grid of "
                             "bench/lora_conv.py and bench/gd_step.py (minutes of autotuning on a GPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a small shared machine OpenMP threads that spin "
                             "against other processes made reduced runs 100× slower)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"), help="folder for results.json, report.md, plots")
    args = parser.parse_args(argv)
    driver.check_report_folder(parser, args.out, report.REPORT_FILES, marker="schema_version")
    if args.stages < 1:
        parser.error(f"--stages: expected a positive number of stages, got {args.stages}")
    if args.threads < 1:
        parser.error(f"--threads: expected ≥ 1, got {args.threads}")
    if args.task not in TASKS:
        parser.error(f"--task: expected one of {', '.join(TASKS)}, got {args.task!r}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: expected cpu or cuda, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device: cuda was asked for but no CUDA device is available")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device: expected cpu or cuda, got {args.device!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    reduced = device.type == "cpu" and not args.full
    size = REDUCED if reduced else FULL
    operator, in_channels = make_task(args.task, size)
    operator = operator.to(device=device, dtype=dtype)
    info = harness.machine_info(device)
    notes = []
    if reduced:
        notes.append(f"CPU run at reduced sizes: {size.height}×{size.width}, ResUNet c={size.channels} "
                     f"nb={size.num_blocks}, batches {size.batches} (full: {FULL.height}×{FULL.width}, "
                     f"c={FULL.channels} nb={FULL.num_blocks}, batches {FULL.batches}); host-clock timings on "
                     f"{args.threads} thread(s); "
                     "memory = exact byte counts (parameters + gradients + Adam state + saved activations).")
    status = {name: "skipped: needs CUDA" for name in CUDA_ONLY if device.type != "cuda"}
    if status:
        notes.append(f"Not run here: {', '.join(status)} (needs a CUDA GPU for the Triton kernels).")
    with harness.tf32_mode(True) if device.type == "cuda" else contextlib.nullcontext():
        models = build_models(operator, in_channels, args.stages, size, device, dtype)
        rows = run_models(models, operator, in_channels, size, device, dtype, args.compile, args.checkpointing,
                          status)
        del models
        if not args.no_sweep:
            rows += stage_sweep(operator, in_channels, args.stages, size, device, dtype)
        if not args.no_kernels:
            k_rows, k_notes = kernel_rows(device, quick=args.kernel_grid == "quick")
            rows += k_rows
            notes += k_notes
    config = {"task": args.task, "stages": args.stages, "dtype": args.dtype, "device": str(device),
              "reduced": reduced, "size": asdict(size), "compile": args.compile,
              "checkpointing": args.checkpointing, "kernel_grid": args.kernel_grid, "seconds": round(time.perf_counter() - started, 1)}
    results = report.assemble(info, config, notes, rows)
    report.validate(results)
    paths = report.write(results, Path(args.out))
    print(report.summary(results))
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

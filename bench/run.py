"""The benchmark report: LoRun against full-parameter DUNs, side by side in one run.

    python bench/run.py --stages 9            # CS 25%, ResUNet backbone; reduced sizes on a CPU
    python bench/run.py --task cassi --out DIR

Every provider builds the same DUN shape with one parameter strategy; rows are measured interleaved.
On a CPU the sizes are reduced (and the report says so); timings use the host clock, memory is the bytes that
autograd saves for backward plus parameters, gradients and Adam state, counted exactly.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorun_fast.io import atomic_write_text, data_root
from lorun_fast.models import ModelConfig, build_dun
from lorun_fast.reference import CASSI, BlockCS, SuperResolution, gaussian_kernel

from harness import machine_info, saved_activation_bytes  # bench/harness.py (bench/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = ("block", "shared", "lorun-reference")
GPU_ONLY = ("lorun-merged", "lorun-fused")  # land with the fused-convolution issue


@dataclass
class Size:
    batch: int
    height: int
    width: int
    channels: int
    num_blocks: int


FULL = Size(batch=8, height=256, width=256, channels=16, num_blocks=2)
REDUCED = Size(batch=1, height=66, width=66, channels=8, num_blocks=1)


def make_task(task: str, size: Size):
    """The operator and input channel count of a task (shared data when present, seeded stand-ins otherwise)."""
    root = data_root()
    if task == "cs":
        phi = root / "cs_sampling" / "phi_0_25_1089.mat"
        return (BlockCS.from_mat(phi) if phi.is_file() else BlockCS.gaussian(0.25, seed=0)), 1
    if task == "cassi":
        mask_file = root / "cassi" / "mask.mat"
        generator = torch.Generator().manual_seed(0)
        if mask_file.is_file():
            mask = CASSI.from_mat(mask_file).mask[: size.height, : size.width]
        else:
            mask = torch.rand(size.height, size.width, generator=generator, dtype=torch.float64)
        return CASSI(mask, num_bands=28, step=2), 28
    if task == "sr":
        return SuperResolution(gaussian_kernel(7, 1.6), scale=2), 1
    raise ValueError(f"--task: expected cs, cassi or sr, got {task!r}")


def build(provider: str, operator, in_channels: int, stages: int, size: Size):
    strategy = {"block": "block", "shared": "shared", "lorun-reference": "lorun"}[provider]
    config = ModelConfig(strategy=strategy, num_stages=stages, backbone="resunet",
                         backbone_kwargs={"in_channels": in_channels, "channels": size.channels,
                                          "num_blocks": size.num_blocks})
    torch.manual_seed(0)
    return build_dun(operator, config)


def time_it(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def percentiles(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"p50_ms": 1e3 * statistics.median(times), "p20_ms": 1e3 * q[1], "p80_ms": 1e3 * q[7]}


def measure(provider: str, model, operator, size: Size, in_channels: int, repeats: int, device) -> dict:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(size.batch, in_channels, size.height, size.width, generator=generator).to(device)
    image_size = (size.height, size.width)
    y = operator.A(x)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def infer():
        with torch.no_grad():
            model(y, image_size)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(y, image_size), x)
        loss.backward()
        optimizer.step()

    counts = model.parameter_counts()
    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    activations = saved_activation_bytes(model, y, image_size)
    return {
        "provider": provider, "params_total": counts["total"], "params_trainable": counts["trainable"],
        "params_shared": counts["shared"], "params_per_stage": counts["per_stage"],
        "memory_train_bytes": {"parameters": param_bytes, "gradients": grad_bytes, "optimizer": 2 * grad_bytes,
                               "activations": activations,
                               "total": param_bytes + 3 * grad_bytes + activations},
        "inference": percentiles(time_it(infer, repeats)),
        "train_step": percentiles(time_it(train_step, repeats)),
    }


def format_table(rows: list[dict]) -> str:
    mib = 1 / 2 ** 20
    head = (f"{'provider':<18}{'params':>11}{'trainable':>11}{'train mem MiB':>15}{'act MiB':>9}"
            f"{'infer ms p50 [p20,p80]':>26}{'train ms p50 [p20,p80]':>26}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = r["memory_train_bytes"]
        inf, tr = r["inference"], r["train_step"]
        lines.append(f"{r['provider']:<18}{r['params_total']:>11,}{r['params_trainable']:>11,}"
                     f"{mem['total'] * mib:>15.2f}{mem['activations'] * mib:>9.2f}"
                     f"{inf['p50_ms']:>10.1f} [{inf['p20_ms']:.1f}, {inf['p80_ms']:.1f}]".ljust(0)
                     + f"{tr['p50_ms']:>12.1f} [{tr['p20_ms']:.1f}, {tr['p80_ms']:.1f}]")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=9, help="DUN stages K (default 9)")
    parser.add_argument("--task", choices=("cs", "cassi", "sr"), default="cs")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    parser.add_argument("--full", action="store_true", help="full sizes even on a CPU (slow)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"), help="folder for results.json and report.md")
    args = parser.parse_args(argv)
    if args.stages < 1:
        parser.error(f"--stages: expected a positive number of stages, got {args.stages}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected ≥ 1, got {args.repeats}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reduced = device.type == "cpu" and not args.full
    size = REDUCED if reduced else FULL
    repeats = args.repeats or (5 if reduced else 30)
    operator, in_channels = make_task(args.task, size)
    operator = operator.to(device=device, dtype=torch.float32)
    info = machine_info(device)
    notes = []
    if reduced:
        notes.append(f"CPU run at reduced sizes: batch {size.batch}, {size.height}×{size.width}, ResUNet c="
                     f"{size.channels} nb={size.num_blocks} (full: batch {FULL.batch}, {FULL.height}×{FULL.width}, "
                     f"c={FULL.channels} nb={FULL.num_blocks}); host-clock timings.")
    notes.append(f"Providers not run here: {', '.join(GPU_ONLY)} (need the fused-convolution work and a GPU).")
    rows = []
    for provider in PROVIDERS:
        model = build(provider, operator, in_channels, args.stages, size).to(device)
        rows.append(measure(provider, model, operator, size, in_channels, repeats, device))
    block = next(r for r in rows if r["provider"] == "block")
    for r in rows:
        r["train_memory_vs_block"] = r["memory_train_bytes"]["total"] / block["memory_train_bytes"]["total"]
        r["params_vs_block"] = r["params_total"] / block["params_total"]
    report = {"machine": info, "task": args.task, "stages": args.stages, "size": asdict(size),
              "reduced": reduced, "notes": notes, "rows": rows}
    table = format_table(rows)
    out = Path(args.out)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", "\n".join([
        f"# lorun_fast benchmark — {args.task}, {args.stages} stages", "",
        f"Machine: {json.dumps(info)}", "", *[f"- {n}" for n in notes], "", "```", table, "```", ""]))
    print(f"lorun_fast benchmark: task {args.task}, {args.stages} stages, device {device}"
          f" (torch {info['torch']}, triton {info['triton']})")
    for n in notes:
        print(f"note: {n}")
    print(table)
    print(f"results written to {out}/results.json and report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

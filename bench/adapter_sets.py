"""Mixed adapter batches: one pass over a batch whose samples use K adapter sets, against K batched calls and a loop.

    python bench/adapter_sets.py                      # CPU: reduced sizes (66², c = 8); CUDA: 256², c = 16
    python bench/adapter_sets.py --sets 3 --batch 12 --out DIR

K ``lorun`` DUNs on one random shared base (ResUNet, 9 stages), one per CS ratio (10/25/40/…%, seeded Gaussian Φ,
random adapters at γ = 10), and a batch of B images assigned round-robin to the sets. Providers, all inference and
all timed interleaved (``harness.interleaved``):

- ``mixed``: ``AdapterSets(models)(ys, adapters=names)``: one pass per stage over the batch (each set's gradient step
  on its samples; one denoiser pass whose LoRA layers take a per-image adapter index: one launch per layer on CUDA,
  per-set merged convolutions on a CPU);
- ``separate``: each set's fast model (``to_fast``) on its own sub-batch: K batched calls;
- ``loop``: each set's fast model on one sample at a time: B calls.

Before timing, every provider's output is compared with ``AdapterSets.reference`` (each set's own DUN on its
samples); a provider over ``lorun_fast.testing``'s benchmark tolerance is reported as failed, not timed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import driver
import harness
from lorun_fast.adapter_sets import AdapterSets
from lorun_fast.models import ModelConfig, build_dun, lorun_from, to_fast
from lorun_fast.reference import BlockCS
from lorun_fast.testing import BENCH_TOLERANCE

PROVIDERS = ("mixed", "separate", "loop")
RATIOS = (0.10, 0.25, 0.40, 0.50, 0.30, 0.04, 0.01)


def build(num_sets: int, channels: int, stages: int, device, dtype):
    """K lorun DUNs (name → model) on one shared base, each with its own Φ and random adapters."""
    torch.manual_seed(0)
    shared = build_dun(BlockCS.gaussian(RATIOS[0], seed=0),
                       ModelConfig(strategy="shared", num_stages=stages,
                                   backbone_kwargs={"channels": channels, "num_blocks": 1}))
    models = {}
    for g in range(num_sets):
        model = lorun_from(shared)
        model.operator = BlockCS.gaussian(RATIOS[g], seed=g)
        generator = torch.Generator().manual_seed(100 + g)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        models[f"cs{round(RATIOS[g] * 100)}"] = model.to(device=device, dtype=dtype).eval()
    return models


def run(device, *, num_sets: int, batch: int, size: int, channels: int, stages: int, dtype, rounds: int,
        rep_ms: float) -> tuple[list[dict], list[str]]:
    models = build(num_sets, channels, stages, device, dtype)
    names = [list(models)[i % num_sets] for i in range(batch)]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, size, size, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        ys = [models[n].operator.A(x[i:i + 1]) for i, n in enumerate(names)]
    image = (size, size)
    sets = AdapterSets(models, backend="auto")
    fast = {n: to_fast(m, backend="auto").eval() for n, m in models.items()}
    groups = {n: [i for i, m in enumerate(names) if m == n] for n in models}
    group_y = {n: torch.cat([ys[i] for i in idx]) for n, idx in groups.items() if idx}

    def mixed():
        return sets(ys, names, image)

    def separate():
        out = [None] * batch
        for n, y in group_y.items():
            rec = fast[n](y, image)
            for row, i in enumerate(groups[n]):
                out[i] = rec[row:row + 1]
        return torch.cat(out)

    def loop():
        return torch.cat([fast[n](y, image) for n, y in zip(names, ys)])

    fns = {"mixed": mixed, "separate": separate, "loop": loop}
    with torch.no_grad():
        truth = sets.reference(ys, names, image).double()
    tolerance = BENCH_TOLERANCE["tf32" if device.type == "cuda" and dtype == torch.float32 else
                                {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]]
    rows, timed = [], {}
    for name, fn in fns.items():
        row = {"provider": name, "batch": batch, "sets": num_sets, "size": size, "channels": channels,
               "stages": stages, "dtype": str(dtype).removeprefix("torch."), "status": "ok"}
        try:
            with torch.no_grad():
                out = fn().double()
            row["rel_err"] = float((out - truth).norm() / truth.norm())
            if not row["rel_err"] <= tolerance:
                row["status"] = f"failed numerics: rel err {row['rel_err']:.3g} > {tolerance:g}"
        except Exception as err:  # noqa: BLE001 - one broken provider must not stop the others
            row["status"] = driver.error_status(err)
        rows.append(row)
        if row["status"] == "ok":
            timed[name] = lambda fn=fn: torch.no_grad()(fn)()
    timing = harness.interleaved(timed, rounds, device=device, rep_ms=rep_ms, min_reps=2)
    for row in rows:
        if row["provider"] in timing:
            t = timing[row["provider"]]
            row.update(p50_ms=t["p50_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], round_spread=t["round_spread"],
                       images_per_s=batch / t["p50_ms"] * 1e3)
    base = next((r["p50_ms"] for r in rows if r["provider"] == "mixed" and "p50_ms" in r), None)
    for row in rows:
        if base and "p50_ms" in row:
            row["vs_mixed"] = row["p50_ms"] / base
    notes = [f"{num_sets} adapter sets ({', '.join(models)}), batch {batch} round-robin, {size}², ResUNet c = "
             f"{channels}, {stages} stages, {row['dtype']} on {device}; inference",
             "mixed on CUDA: one indexed fused-conv launch per 3×3 layer and stage; on a CPU: per-set merged "
             "convolutions in one pass (the same work as separate, organised per layer)"]
    return rows, notes


def format_table(rows: list[dict]) -> str:
    lines = [f"{'provider':<10}{'p50 ms [p20, p80]':>26}{'img/s':>9}{'vs mixed':>10}{'spread':>8}{'rel err':>10}"
             f"  status"]
    for r in rows:
        if "p50_ms" in r:
            timing = f"{r['p50_ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]"
            rest = f"{r['images_per_s']:>9.1f}{r['vs_mixed']:>9.2f}×{r['round_spread']:>8.1%}"
        else:
            timing, rest = "—", f"{'—':>9}{'—':>10}{'—':>8}"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "—"
        lines.append(f"{r['provider']:<10}{timing:>26}{rest}{err:>10}  {r['status']}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=3, help=f"adapter sets K (≤ {len(RATIOS)})")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 6 on a CPU, 24 on CUDA)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 66 on a CPU, 256 on CUDA)")
    parser.add_argument("--channels", type=int, default=None, help="ResUNet width c (default 8 CPU, 16 CUDA)")
    parser.add_argument("--stages", type=int, default=9)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per provider per round")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--out", default=None, help="folder for results.json and report.md")
    args = parser.parse_args(argv)
    if not 1 <= args.sets <= len(RATIOS):
        parser.error(f"--sets: expected 1..{len(RATIOS)}, got {args.sets}")
    for name in ("batch", "size", "channels", "stages", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: expected ≥ 1, got {value}")
    if args.out:
        driver.check_report_folder(parser, args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = driver.device_and_threads(args)
    cuda = device.type == "cuda"
    rows, notes = run(device, num_sets=args.sets, batch=args.batch or (24 if cuda else 6),
                      size=args.size or (256 if cuda else 66), channels=args.channels or (16 if cuda else 8),
                      stages=args.stages, dtype=getattr(torch, args.dtype), rounds=args.rounds,
                      rep_ms=args.rep_ms or (200.0 if cuda else 100.0))
    return driver.report("adapter_sets", "mixed adapter batches", device, notes, rows, format_table(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())

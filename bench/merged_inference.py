"""Merged-backend inference against the full-parameter DUN, paired round by round, with the comparison's own noise.

    python bench/merged_inference.py                  # CPU: reduced sizes (66², c = 8), batches 1 and 2
    python bench/merged_inference.py --rounds 200 --out DIR

The models of ``bench/run.py`` (CS 25%, ResUNet, random adapters; ``run.build_models``), inference only, timed
interleaved (``harness.interleaved``) over many short rounds:

- ``block``: K independent plain denoisers (the full-parameter DUN);
- ``block-copy``: a second, independent copy of ``block``: what separates it from ``block`` is the noise of the
  comparison (memory placement, the machine), not the method;
- ``lorun-merged``: the LoRun DUN on ``FusedLoRunConv(backend="merged")``: each stage's merged weight from the
  layers' cache, checked once per forward (``StagedDUN.forward``);
- ``lorun-merged-per-call``: the same model through the reference ``DUN.forward``: every layer call checks its own
  cache entry (the path of a layer used outside a DUN).

Each provider's time is the median of its per-round medians; its ratio to ``block`` is the median of the per-round
ratios (both timed in the same round), with a 95% bootstrap interval over the rounds. Against the noise band (1 and
``block-copy``'s interval) a LoRun provider is "slower" when its whole interval lies above the band, "faster" when
it lies below, and "within noise" otherwise.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys

import torch

import driver
import harness
import run
from lorun_fast.reference import DUN
from lorun_fast.testing import BENCH_TOLERANCE

PROVIDERS = ("block", "block-copy", "lorun-merged", "lorun-merged-per-call")
BOOTSTRAP = 1000


def paired_ratio(times: list[float], base: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median of the per-round ratios times[r] / base[r] and its 95% bootstrap interval."""
    ratios = [t / b for t, b in zip(times, base)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(BOOTSTRAP))
    return statistics.median(ratios), medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]


def providers(stages: int, size: run.Size, device, dtype) -> tuple[dict, object, int]:
    """name → model (the reference lorun model last, for the numerics check), the operator and the channels."""
    operator, channels = run.make_task("cs", size)
    models = run.build_models(operator, channels, stages, size, device, dtype)
    chosen = {"block": models["block"], "block-copy": copy.deepcopy(models["block"]),
              "lorun-merged": models["lorun-merged"], "lorun-reference": models["lorun-reference"]}
    return {name: model.eval() for name, model in chosen.items()}, operator, channels


def measure(models: dict, operator, channels: int, batch: int, size: run.Size, device, dtype, rounds: int,
            rep_ms: float) -> list[dict]:
    x, y = run._inputs(operator, channels, batch, size, device, dtype)
    image = (size.height, size.width)
    merged = models["lorun-merged"]
    fns = {"block": lambda: models["block"](y, image), "block-copy": lambda: models["block-copy"](y, image),
           "lorun-merged": lambda: merged(y, image),
           "lorun-merged-per-call": lambda: DUN.forward(merged, y, image)}
    tolerance = BENCH_TOLERANCE[{torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]]
    rows, timed = [], {}
    with torch.no_grad():
        truth = {"block": models["block"](y, image).double(), "lorun": models["lorun-reference"](y, image).double()}
        for name, fn in fns.items():
            row = {"provider": name, "batch": batch, "height": size.height, "width": size.width,
                   "channels": size.channels, "dtype": str(dtype).removeprefix("torch."), "status": "ok"}
            want = truth["block" if name.startswith("block") else "lorun"]
            try:
                fn()  # the first call forms the merged weights
                row["rel_err"] = float((fn().double() - want).norm() / want.norm())
                if not row["rel_err"] <= tolerance:
                    row["status"] = f"failed numerics: rel err {row['rel_err']:.3g} > {tolerance:g}"
            except Exception as err:  # noqa: BLE001 - one broken provider must not stop the others
                row["status"] = driver.error_status(err)
            rows.append(row)
            if row["status"] == "ok":
                timed[name] = lambda fn=fn: torch.no_grad()(fn)()
    timing = harness.interleaved(timed, rounds, device=device, rep_ms=rep_ms, warmup_ms=0.0, min_reps=3)
    base = timing.get("block")
    for row in rows:
        t = timing.get(row["provider"])
        if t is None:
            continue
        row.update(p50_ms=t["p50_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], rounds=rounds,
                   round_spread=t["round_spread"])
        if base is not None:
            row["vs_block"], row["vs_block_lo"], row["vs_block_hi"] = paired_ratio(t["rounds_p50_ms"],
                                                                                  base["rounds_p50_ms"])
    noise = next((r for r in rows if r["provider"] == "block-copy" and "vs_block_hi" in r), None)
    for row in rows:
        if noise is not None and row["provider"].startswith("lorun") and "vs_block_hi" in row:
            row["verdict"] = ("slower" if row["vs_block_lo"] > max(noise["vs_block_hi"], 1.0) else
                              "faster" if row["vs_block_hi"] < min(noise["vs_block_lo"], 1.0) else "within noise")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5}  {'provider':<22}{'p50 ms [p20, p80]':>24}{'vs block [95%]':>26}{'verdict':>16}"
             f"{'rel err':>10}  status"]
    for r in rows:
        timing = f"{r['p50_ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]" if "p50_ms" in r else "—"
        ratio = (f"{r['vs_block']:.3f} [{r['vs_block_lo']:.3f}, {r['vs_block_hi']:.3f}]" if "vs_block" in r
                 else "—")
        verdict = r.get("verdict", "")
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "—"
        lines.append(f"{r['batch']:>5}  {r['provider']:<22}{timing:>24}{ratio:>26}{verdict:>16}{err:>10}  "
                     f"{r['status']}")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=_positive, default=9)
    parser.add_argument("--batches", type=_positive, nargs="+", default=None,
                        help="batch sizes (default: bench/run.py's, 1 and 2 on a CPU)")
    parser.add_argument("--full", action="store_true", help="the full sizes (256², c = 16) on a CPU too")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=_positive, default=100)
    parser.add_argument("--rep-ms", type=float, default=None,
                        help="timed milliseconds per provider per round (default: three calls' worth)")
    parser.add_argument("--threads", type=_positive, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--out", default=None, help="folder for results.json and report.md")
    args = parser.parse_args(argv)
    if args.out:
        driver.check_report_folder(parser, args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = driver.device_and_threads(args)
    dtype = getattr(torch, args.dtype)
    size = run.FULL if device.type == "cuda" or args.full else run.REDUCED
    models, operator, channels = providers(args.stages, size, device, dtype)
    rows = []
    for batch in args.batches or size.batches:
        rows += measure(models, operator, channels, batch, size, device, dtype, args.rounds,
                        args.rep_ms or (0.0 if device.type == "cpu" else 50.0))
    notes = [f"CS 25%, ResUNet c = {size.channels}, {args.stages} stages, {size.height}×{size.width}, "
             f"{args.dtype} on {device}, {args.threads} thread(s); inference; {args.rounds} interleaved rounds",
             "vs block: median of per-round ratios, 95% bootstrap interval; block-copy is the noise of the comparison"]
    return driver.report("merged_inference", "merged inference against block", device, notes, rows,
                         format_table(rows), args.out)

if __name__ == "__main__":
    sys.exit(main())
